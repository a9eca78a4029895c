"""Model folders of a data root: where training writes a model and where stages read one.

A model stage's product is `<stage folder>/model` (Hugging Face files; the manifest lists each with its size
and sha256). On a local root that folder is used as it is. On object storage (issue 20):
- training writes into a local staging folder, $VARIATIONAL_HOME/staging/<run>/<stage>/<fingerprint>/model
  (its checkpoints live there too, so a killed training resumes on the same machine); `upload` puts its
  files under the stage's `model/` before the manifest is written;
- readers (training from an upstream model, vLLM, the scorer) get a local copy from the cache
  $VARIATIONAL_HOME/model-cache/<fingerprint>: downloaded once per machine into a temp folder, each file
  checked against the manifest's size and sha256, then renamed into place whole. `model_folder` (called by
  the runner's Inputs.model_dir, the one place that hands model folders to stages) returns it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from variational.pipeline.records import check_name, recorded_rel, resolve
from variational.pipeline.storage import LocalRoot, Root, StoreError, home, join, open_root

MARKER = ".files.json"  # name -> sha256 of the files of a complete cache entry, written last


def staging_dir(run: str, stage: str, fp: str) -> Path:
    return home() / "staging" / run / stage / fp / "model"


def cache_dir(fingerprint: str) -> Path:
    return home() / "model-cache" / check_name(fingerprint, "fingerprint")


def upload(root: Root, local: Path, rel: str) -> None:
    """Put the model files of `local` (its top level: checkpoints are gone when training ends) under `rel`."""
    for path in sorted(local.iterdir()):
        if path.is_file() and not path.is_symlink():
            root.put_file(path, join(rel, path.name))


def _model_files(manifest: dict) -> dict[str, dict]:
    return {
        r["file"].removeprefix("model/"): r
        for r in manifest.get("files", [])
        if r["file"].startswith("model/")
    }


def _is_cached(folder: Path, files: dict[str, dict]) -> bool:
    """A complete entry holding exactly these files (by the marker's sha256 and each file's size)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    for name, rec in files.items():
        path = folder / name
        if marker.get(name) != rec["sha256"] or not path.is_file() or path.stat().st_size != rec["bytes"]:
            return False
    return True


def _install(tmp: Path, target: Path, files: dict[str, dict]) -> None:
    """Mark `tmp` complete and rename it to `target` (replacing a stale entry); a concurrent winner stays."""
    (tmp / MARKER).write_text(json.dumps({n: r["sha256"] for n, r in files.items()}))
    if target.exists() and not _is_cached(target, files):
        shutil.rmtree(target, ignore_errors=True)  # a stale entry (another root's model of this fingerprint)
    try:
        os.rename(tmp, target)
    except OSError:  # another process installed it first
        shutil.rmtree(tmp, ignore_errors=True)


def adopt(staging: Path, manifest: dict) -> None:
    """After the upload, the staging folder is this machine's cache entry for the model (no download)."""
    files = _model_files(manifest)
    target = cache_dir(manifest["fingerprint"])
    target.parent.mkdir(parents=True, exist_ok=True)
    if _is_cached(target, files):
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    _install(staging, target, files)


def model_folder(data_root: str | Path, ref: dict) -> str:
    """The local folder of the model a ref names: a base model's own folder, a local root's stage folder, or
    for an object-store root the local cache copy (downloaded and checked on first use on this machine)."""
    recorded = str(ref["model_dir"])
    root = open_root(data_root)
    if os.path.isabs(recorded) or root.local:
        return str(resolve(data_root, recorded))
    folder = recorded_rel(data_root, recorded, f"model of stage {ref.get('stage')!r}")
    files = _model_files(ref)
    target = cache_dir(ref["fingerprint"])
    if _is_cached(target, files):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, rec in files.items():
            root.get_file(join(folder, name), tmp / name)
            if (tmp / name).stat().st_size != rec["bytes"] or LocalRoot(tmp).sha256(name) != rec["sha256"]:
                raise StoreError(
                    f"model file {root.display(join(folder, name))} differs from its manifest; run "
                    "`variational verify-store` and rerun"
                )
        _install(tmp, target, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
