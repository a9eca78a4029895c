"""Shard stats: what each shard of a stage cost, recorded by the runner beside the shard (issue 21).

In:  the stage's engine (variational/pipeline/stage.py `Engine`), read before and after each shard through
     its `counters()`; a model stage's training metrics (trainers/sft.py `train_metrics.json`).
Out: one record per shard, `<stage dir>/stats/part-00000.json` beside `part-00000.parquet`, written when the
     shard is (so a resumed stage keeps the stats of the shards it reuses), gathered when the stage finishes
     into the side table `shard_stats.parquet` that its manifest lists (the `shard_stats` SQL view,
     variational/analysis/throughput.py). Stats never enter a stage's table: its rows do not change.

The counters an engine may expose (`counters()` -> dict, cumulative since it opened):
    tokens_in   prompt / context tokens it read (a prompt of n samples counts once)
    tokens_out  tokens it generated or scored
    start_s     seconds spent opening engines (an engine that reopens per model adds each start)
    device      "cpu" or the accelerator's name
An engine without `counters()` (or a stage without an engine) gets rows and seconds only; its start time is
the time the runner's `Engine` wrapper spent opening it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl

from variational.pipeline.storage import Root, join, open_root

STATS_DIR = "stats"
RECORD_NAME = re.compile(r"part-\d{5}\.json")
SIDE_TABLE = "shard_stats"  # the side table's name (shard_stats.parquet) and the SQL view's
SCHEMA: dict[str, Any] = {
    "stage": pl.String,
    "round": pl.Int64,
    "shard": pl.Int64,
    "rows_in": pl.Int64,
    "rows_out": pl.Int64,
    "tokens_in": pl.Int64,
    "tokens_out": pl.Int64,
    "seconds": pl.Float64,
    "engine_start_s": pl.Float64,
    "device": pl.String,
    "host": pl.String,
    "worker": pl.String,
    "finished_at": pl.String,
    # model stages only (trainers/sft.py metrics): null for the others
    "tokens_per_s": pl.Float64,
    "step_time_s": pl.Float64,
    "peak_memory_gib": pl.Float64,
    "mfu": pl.Float64,
}
TRAINING_FIELDS = ("tokens_per_s", "step_time_s", "peak_memory_gib", "mfu")


def _place(stage: Any) -> tuple[Root, str]:
    """(root, folder) of a stage folder: a StageStore's own, or a folder given as a path or URL."""
    if hasattr(stage, "root") and hasattr(stage, "rel"):
        return stage.root, stage.rel
    return open_root(stage), ""


def _record_rel(folder: str, shard: int) -> str:
    return join(folder, STATS_DIR, f"part-{shard:05d}.json")


def worker_name(label: str = "local") -> str:
    """Who computed a shard: the executor's label (local, or the Ray group) and the process id."""
    return f"{label} pid {os.getpid()}"


def _delta(after: Any, before: Any) -> Any:
    if isinstance(after, int | float) and not isinstance(after, bool):
        return after - (before if isinstance(before, int | float) else 0)
    return None


class ShardMeter:
    """Times one shard and reads the engine's counters before and after it.

    `engine` is the runner's `Engine` wrapper (or None for a stage without one)."""

    def __init__(self, engine: Any = None):
        self.engine = engine
        self.before = engine.counters() if engine is not None else {}
        self.t0 = time.perf_counter()

    def record(
        self, stage: str, round_: int, shard: int, rows_in: int | None, rows_out: int, worker: str
    ) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t0
        after = self.engine.counters() if self.engine is not None else {}
        started = after.get("start_s", after.get("open_s"))
        start = _delta(started, self.before.get("start_s", self.before.get("open_s")))
        return new_record(
            stage,
            round_,
            shard,
            rows_in=rows_in,
            rows_out=rows_out,
            tokens_in=_delta(after.get("tokens_in"), self.before.get("tokens_in")),
            tokens_out=_delta(after.get("tokens_out"), self.before.get("tokens_out")),
            seconds=seconds,
            engine_start_s=start if start else None,  # no engine opened during this shard
            device=after.get("device") or "cpu",
            worker=worker,
        )


def new_record(stage: str, round_: int, shard: int, **fields: Any) -> dict[str, Any]:
    """A stats record with every SCHEMA column (absent ones null), host and time filled in."""
    record: dict[str, Any] = dict.fromkeys(SCHEMA)
    record |= {"stage": stage, "round": round_, "shard": shard, "host": socket.gethostname()}
    record |= {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": "cpu"}
    record |= {k: v for k, v in fields.items() if k in SCHEMA}
    for key in ("tokens_in", "tokens_out", "rows_in", "rows_out"):
        if record[key] is not None:
            record[key] = int(record[key])
    return record


def training_record(stage: str, round_: int, metrics: dict[str, Any], rows_in: int) -> dict[str, Any]:
    """A model stage's one record from its training metrics (trainers/sft.py): tokens trained on, wall
    time, tokens/s, mean step time, peak memory, MFU (null where the device's peak FLOP rate is unknown)."""
    return new_record(
        stage,
        round_,
        0,
        rows_in=rows_in,
        rows_out=metrics.get("examples", rows_in),
        tokens_in=metrics.get("tokens"),
        seconds=metrics.get("wall_time_s"),
        device=metrics.get("device") or "cpu",
        worker=worker_name(f"{metrics.get('processes', 1)} process(es)"),
        **{k: metrics.get(k) for k in TRAINING_FIELDS},
    )


def write_record(stage: Any, record: dict[str, Any]) -> None:
    """The record beside its shard, in the stage's folder (a StageStore, or its path / URL), written whole
    or not at all (the root's write: temp file then rename, or one PUT)."""
    root, folder = _place(stage)
    data = json.dumps(record).encode()
    root.write(_record_rel(folder, record["shard"]), lambda fh: fh.write(data))


def remove_record(stage: Any, shard: int) -> None:
    root, folder = _place(stage)
    root.remove(_record_rel(folder, shard))


def read_records(stage: Any, shards: list[int] | None = None) -> list[dict[str, Any]]:
    """The records in a stage folder (only those of `shards` when given), in shard order; an unreadable
    record is skipped (stats are a measurement, never a reason to fail a stage)."""
    root, folder = _place(stage)
    names = root.listdir(join(folder, STATS_DIR))
    out = []
    for name in sorted(n for n, kind in names.items() if kind == "file" and RECORD_NAME.fullmatch(n)):
        try:
            record = json.loads(root.read_bytes(join(folder, STATS_DIR, name)))
        except (OSError, ValueError):
            continue
        if _well_formed(record) and (shards is None or record["shard"] in shards):
            out.append(record)
    return out


def _well_formed(record: Any) -> bool:
    """A dict whose fields have the schema's types (a number where a number goes, text where text goes) and
    with its shard number: a record written by another program or damaged on disk is skipped."""
    if not isinstance(record, dict):
        return False
    for key, dtype in SCHEMA.items():
        value = record.get(key)
        if value is None:
            continue
        if dtype == pl.String:
            ok = isinstance(value, str)
        elif dtype == pl.Float64:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 62
        if not ok:
            return False
    return record.get("shard") is not None


def frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    rows = [{k: r.get(k) for k in SCHEMA} for r in records]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row") if rows else pl.DataFrame(schema=SCHEMA)


def gather(stage: Any, shard_files: list[Path | str]) -> pl.DataFrame:
    """The stats of the shards a finished stage holds (the side table the manifest lists)."""
    shards = [int(PurePosixPath(str(p)).stem.split("-")[1]) for p in shard_files]
    return frame(read_records(stage, shards))
