"""What a data root records, read without trust (issue 17 item 4): names, recorded paths, manifests, run.json.

In: the bytes of a manifest or run.json and the names and paths they hold. Out: checked values, or one-line
errors naming the file, the entry and what to do:
- run, stage and fingerprint names are one plain path component (`check_name`): a run named `..` cannot
  write into the data root's parent;
- a recorded path is relative to the data root and stays inside it (`recorded_rel`); a manifest's own
  `path` / `model_dir` are replaced by where it was found (`read_manifest`), and each file it lists must
  name a regular file inside its folder reached through no symlink (`entry_size`);
- a manifest or run.json that does not parse is `CorruptRecord`, naming the file and what to do.
The layout itself (which file is where) is variational/pipeline/store.py's; the bytes, storage.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from variational.pipeline.storage import CorruptRecord, Root, UnsafePath, check_relative, join, open_root

MANIFEST = "manifest.json"
RUN_JSON = "run.json"


def parse_record(raw: bytes, where: str, then: str) -> dict:
    """A manifest or run.json's JSON object; CorruptRecord naming the file and what to do otherwise."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        reason = f"not valid JSON: {str(err)[:80]}"
        raise CorruptRecord(f"{where} is damaged ({reason}); {then}", reason) from None
    if not isinstance(obj, dict):
        raise CorruptRecord(f"{where} is damaged (not a JSON object); {then}", "not a JSON object")
    return obj


def read_manifest(root: Root, folder: str) -> dict:
    """The checked manifest of the stage folder `folder` (relative to the root). FileNotFoundError when there
    is none; CorruptRecord when it does not parse; UnsafePath when a file entry could leave the folder. Its
    `path` and `model_dir` are where it was found, never what it says (a copied or forged manifest)."""
    rel = join(folder, MANIFEST)
    try:
        raw = root.read_bytes(rel)
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest in {root.display(folder)}") from None
    where = root.display(rel)
    manifest = parse_record(raw, where, f"run `variational verify-store` or delete {root.display(folder)}")
    files = manifest.get("files", [])
    if not isinstance(files, list) or not all(
        isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
        for r in files
    ):
        reason = "its file list is malformed"
        raise CorruptRecord(f"{where} is damaged ({reason}); delete {root.display(folder)}", reason)
    for rec in files:
        try:
            check_relative(rec.get("file"))
        except UnsafePath as err:
            raise _refused(root, folder, rec.get("file"), err) from None
    manifest["path"] = folder
    if "model_dir" in manifest:
        manifest["model_dir"] = join(folder, "model")
    return manifest


def _refused(root: Root, folder: str, entry: object, err: Exception) -> UnsafePath:
    return UnsafePath(
        f"{root.display(join(folder, MANIFEST))}: entry {entry!r} is refused ({err}); nothing was read or "
        f"moved, delete {root.display(folder)} to recompute the stage"
    )


def entry_size(root: Root, folder: str, name: str) -> int | None:
    """Size of a file a manifest lists (None: missing); UnsafePath naming the entry when it is not a regular
    file inside the folder (a symlink, a FIFO, a device)."""
    try:
        return root.file_size(join(folder, name))
    except UnsafePath as err:
        raise _refused(root, folder, name, err) from None


def check_name(name: str, what: str) -> str:
    """A run, stage or fingerprint name: one plain path component (never `..`, `/`, or hidden)."""
    try:
        if "/" in str(name):
            raise UnsafePath(name)
        check_relative(name)
    except UnsafePath:
        raise UnsafePath(
            f"{what} name {name!r} is not one plain name (letters, digits, _ . + = -, not starting with '.')"
        ) from None
    return name


def recorded_rel(data_root: str | Path, recorded: object, what: str) -> str:
    """A path a manifest, run.json or ref records, as a checked path relative to the data root (an absolute
    one only when it lies inside the root); UnsafePath naming `what` otherwise."""
    try:
        if not isinstance(recorded, str):
            raise TypeError(recorded)
        rel = recorded
        if os.path.isabs(rel):
            rel = Path(rel).resolve().relative_to(Path(data_root).resolve()).as_posix()
        return check_relative(rel)
    except (ValueError, TypeError, UnsafePath):
        raise UnsafePath(
            f"{what}: path {recorded!r} is outside the data root {data_root}; nothing was read or moved "
            "(rerun the flow to rewrite it)"
        ) from None


def resolve(data_root: str | Path, recorded: str | Path) -> Path:
    """A recorded path back to a real one: relative paths are checked and taken under the data root of the
    reader; an absolute one (a base model folder a ref carries, never a manifest) is returned as it is."""
    if os.path.isabs(recorded):
        return Path(recorded)
    return open_root(data_root).full(check_relative(str(recorded)))


def read_run(data_root: str | Path, run: str) -> dict:
    """run.json of `run`, checked: FileNotFoundError when absent, CorruptRecord (one line) when damaged."""
    root, rel = open_root(data_root), join(check_name(run, "run"), RUN_JSON)
    try:
        raw = root.read_bytes(rel)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no run {run!r} under {data_root} (expected {root.display(rel)}); list runs with `variational runs`"
        ) from None
    then = "rerun the flow of this run to rewrite it"
    current = parse_record(raw, root.display(rel), then)
    stages = current.get("stages")
    if not isinstance(stages, dict) or not all(
        isinstance(v, dict) and all(isinstance(e, dict) for e in v.values()) for v in stages.values()
    ):
        raise CorruptRecord(f"{root.display(rel)} is damaged (no `stages` mapping); {then}", "no stages")
    return current
