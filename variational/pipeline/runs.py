"""A run as recorded: run.json (begun by the flow, one entry per stage and round as each finishes) and the
stages it points at on this data root, read without trust (variational/pipeline/store.py owns a stage's
folder; variational/pipeline/records.py checks every name and path a data root records).

In: a data root (a folder or an object-store URL) and a run name. Out: `run_stages` (the raw entries),
`recorded_stages` (each entry opened: folder, shards, side tables, or why it cannot be read), `read_record`,
`unrecorded_folders` (stage folders being computed or crashed), `verify_run` (hash-check every stage).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from variational.pipeline.records import (
    MANIFEST,
    RUN_JSON,
    check_name,
    entry_size,
    read_manifest,
    read_run,
    recorded_rel,
)
from variational.pipeline.storage import Root, StoreError, UnsafePath, join, open_root
from variational.pipeline.store import DamagedStage, StageStore, json_bytes, read_files


# ---------------------------------------------------------------- run.json
def run_json(data_root: str | Path, run: str) -> Path | str:
    return open_root(data_root).full(join(check_name(run, "run"), RUN_JSON))


def run_folder(data_root: str | Path, run: str) -> Path | str:
    """<data_root>/<run>: a Path, or a URL on object storage."""
    return open_root(data_root).full(check_name(run, "run"))


def writable(data_root: str | Path) -> bool:
    """Whether this process can write the data root (a finished root may be mounted read-only)."""
    return open_root(data_root).writable()


def begin_run(data_root: str | Path, run: str, config: dict) -> None:
    """A new flow run of `run`: run.json starts empty and each stage records itself as it finishes."""
    started = {"run": run, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config, "stages": {}}
    open_root(data_root).write(
        join(check_name(run, "run"), RUN_JSON), lambda fh: fh.write(json_bytes(started))
    )


def record_stage(data_root: str | Path, run: str, manifest: dict, *, computed: bool) -> None:
    """Point run.json's entry for (stage, round) at this manifest; `computed` tells a fresh result from a
    reused one (what the resume tests check). Only the flow process writes run.json."""
    try:
        current = read_run(data_root, run)
    except FileNotFoundError:
        current = {"run": run, "stages": {}}
    current["stages"].setdefault(manifest["stage"], {})[str(manifest.get("round", 1))] = {
        "fingerprint": manifest["fingerprint"],
        "path": manifest["path"],
        "rows": manifest.get("rows"),
        "wall_time_s": manifest.get("wall_time_s"),
        "computed": computed,
    }
    open_root(data_root).write(join(run, RUN_JSON), lambda fh: fh.write(json_bytes(current)))


def run_stages(data_root: str | Path, run: str) -> dict[str, dict[str, dict]]:
    """stage -> round -> {fingerprint, path, rows, computed} of the latest flow run of `run`, as recorded
    (each entry is checked when its stage is opened: `recorded_stages`)."""
    return read_run(data_root, run)["stages"]


def run_names(data_root: str | Path) -> list[str]:
    """The runs under a data root: plain folders (no symlinks) with a run.json file."""
    root = open_root(data_root)
    entries = root.listdir("")
    out = []
    for name, kind in sorted(entries.items()):
        with contextlib.suppress(UnsafePath):
            if kind == "dir" and check_name(name, "run") and root.listdir(name).get(RUN_JSON) == "file":
                out.append(name)
    return out


@dataclass(frozen=True)
class StageRecord:
    """One stage and round as run.json records it, and its files on this data root."""

    stage: str
    round: int
    entry: dict  # fingerprint, path, rows, wall_time_s, computed
    folder: Path | str  # a Path, or a URL on object storage (what DuckDB reads)
    complete: bool  # its manifest exists
    parts: list[
        Path | str
    ]  # the shards to read: those the manifest lists (without a manifest: those present)
    sides: list[
        Path | str
    ]  # side tables beside the shards (rejects, summary), never read as the stage's table
    problem: str | None = None  # why it cannot be read (a damaged or unsafe record): nothing of it is read
    data_root: str = ""  # the root it was read from (read_record opens its files there)


def _files_of(root: Root, folder: str) -> tuple[bool, list[Path | str], list[Path | str]]:
    """(manifest present, shard files, side tables) of a stage folder; every file checked regular."""
    if root.exists(join(folder, MANIFEST)):
        names = [r["file"] for r in read_manifest(root, folder).get("files", [])]
        tables = [n for n in names if "/" not in n and n.endswith(".parquet")]
        for name in tables:
            entry_size(root, folder, name)
        complete = True
    else:
        listing = root.listdir(folder)
        tables = sorted(n for n, kind in listing.items() if kind == "file" and n.endswith(".parquet"))
        complete = False
    parts = [root.full(join(folder, n)) for n in tables if n.startswith("part-")]
    sides = [root.full(join(folder, n)) for n in tables if not n.startswith("part-")]
    return complete, parts, sides


def _record_of(root: Root, run: str, stage: str, round_: str, entry: dict) -> StageRecord:
    """One run.json entry opened: its folder (checked inside the data root) and files, or its problem."""
    where = f"{root.display(join(run, 'run.json'))}: stage {stage!r} round {round_}"
    number = int(round_) if round_.isdigit() else 0
    try:
        try:
            check_name(stage, "stage")
            check_name(str(entry.get("fingerprint")), "fingerprint")
            if not round_.isdigit():
                raise UnsafePath(f"round {round_!r} is not a number")
        except UnsafePath as err:
            raise UnsafePath(f"{where}: {err}; rerun the flow to rewrite it") from None
        folder = recorded_rel(root.full(""), entry.get("path"), where)
        complete, parts, sides = _files_of(root, folder)
    except (StoreError, OSError) as err:
        return StageRecord(stage, number, entry, root.full(""), False, [], [], str(err), str(root.full("")))
    return StageRecord(
        stage, number, entry, root.full(folder), complete, parts, sides, None, str(root.full(""))
    )


def read_record(
    record: StageRecord, columns: list[str] | None = None, *, side: str | None = None
) -> pl.DataFrame:
    """The table of a recorded stage as its manifest lists it, or its side table `side` (e.g. "summary")."""
    if record.problem:
        raise DamagedStage(record.problem)
    root = open_root(record.data_root)
    prefix = str(root.full("")).rstrip("/") + "/"
    files = (
        [f for f in record.sides if str(f).rsplit("/", 1)[-1] == f"{side}.parquet"] if side else record.parts
    )
    rels = [str(f).removeprefix(prefix) for f in files]
    return read_files(root, rels, record.stage, columns)


def recorded_stages(data_root: str | Path, run: str) -> list[StageRecord]:
    """Every stage and round of the latest flow run of `run`, in name and round order. A stage whose record
    or manifest is damaged or unsafe comes back with `problem` set and nothing to read: it hides no other."""
    root = open_root(data_root)
    return sorted(
        (
            _record_of(root, run, stage, round_, entry)
            for stage, rounds in run_stages(data_root, run).items()
            for round_, entry in rounds.items()
        ),
        key=lambda r: (r.stage, r.round),
    )


def unrecorded_folders(data_root: str | Path, run: str) -> list[tuple[str, str, int]]:
    """(stage, fingerprint, shards present) of stage folders without a manifest that run.json does not point
    at: a stage being computed now, or one that crashed before finishing."""
    root = open_root(data_root)
    recorded = {r.folder for r in recorded_stages(data_root, run) if r.problem is None}
    out = []
    for stage, kind in sorted(root.listdir(check_name(run, "run")).items()):
        if kind != "dir":
            continue
        for fp, fkind in sorted(root.listdir(join(run, stage)).items()):
            folder = join(run, stage, fp)
            if fkind != "dir" or root.full(folder) in recorded:
                continue
            names = root.listdir(folder)
            if names.get(MANIFEST):
                continue
            out.append((stage, fp, sum(1 for n, k in names.items() if k == "file" and n.startswith("part-"))))
    return out


def verify_run(
    data_root: str | Path, run: str, *, set_aside: bool = True
) -> list[tuple[str, str, list[str], bool]]:
    """Hash-check every stage of the latest flow run of `run`: [(stage, round, problems, refused)]
    (problems [] = intact). Damaged files are set aside (and their stage's manifest dropped) so the next run
    recomputes them. A stage whose record or manifest points outside its folder is `refused`: reported and
    left alone, nothing read or moved there. The other stages are checked whatever one of them holds."""
    out = []
    for stage, rounds in sorted(run_stages(data_root, run).items()):
        for round_, entry in sorted(rounds.items()):
            try:
                st = StageStore(data_root, run, stage, str(entry.get("fingerprint")))
                bad = st.problems(deep=True) if st.has_manifest() else [f"{MANIFEST}: missing"]
            except UnsafePath as err:
                out.append((stage, round_, [str(err)], True))
                continue
            if bad and set_aside and st.has_manifest():
                st.set_aside(bad)
            out.append((stage, round_, bad, False))
    return out
