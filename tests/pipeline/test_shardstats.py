"""variational/pipeline/shardstats.py with the real runner on toy stages: every shard gets a stats record
(tokens from the engine's counters, seconds, the engine start on the shard that opened it, device, host,
worker), the records survive a resume, the stage's table never holds them, and the finished stage lists
them as `shard_stats.parquet`."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import polars as pl
import pytest

from variational.config import parse_config
from variational.pipeline import shardstats, store
from variational.pipeline.runner import run_stage
from variational.pipeline.stage import Engine, Inputs, Output, Stage


class Counting:
    """A toy engine that meters itself as a sampler does: 3 tokens in and 5 out per row, a 2 s start."""

    opened = 0

    def __init__(self, i: Inputs):
        Counting.opened += 1
        self.tokens_in = self.tokens_out = 0

    def run(self, rows: int) -> None:
        self.tokens_in += 3 * rows
        self.tokens_out += 5 * rows

    def counters(self) -> dict:
        return {"tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "start_s": 2.0, "device": "toy"}

    def close(self) -> None:
        pass


def _shard(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
    engine.get().run(part.height)
    return part.with_columns(y=pl.col("x") + 1)


NUMBERS = Stage(name="problems", fields=("K",), core=lambda i: Output(pl.DataFrame({"x": range(i.conf.K)})))
METERED = Stage(
    name="rollouts",
    inputs=("problems",),
    uses=("verify.shard_size",),
    plan=lambda i: i.table("problems"),
    shard=_shard,
    shard_size="verify.shard_size",
    engine=Counting,
)


def _cfg(root: Path) -> dict:
    conf = {"name": "toy", "data_root": str(root), "base_model": "embedded:smollm2-135m", "K": 10}
    return parse_config(conf | {"verify": {"shard_size": 4}}).model_dump(mode="json")


def _run(root: Path) -> dict:
    cfg = _cfg(root)
    return run_stage(METERED, cfg, {"problems": run_stage(NUMBERS, cfg, {})})


def test_each_shard_records_its_own_work(tmp_path: Path) -> None:
    ref = _run(tmp_path)
    folder = tmp_path / ref["path"]
    records = shardstats.read_records(folder)
    assert [r["shard"] for r in records] == [0, 1, 2]  # 10 rows, 4 per shard
    assert [r["rows_in"] for r in records] == [r["rows_out"] for r in records] == [4, 4, 2]
    assert [r["tokens_in"] for r in records] == [12, 12, 6]  # deltas, not the engine's running totals
    assert [r["tokens_out"] for r in records] == [20, 20, 10]
    assert [r["engine_start_s"] for r in records] == [
        2.0,
        None,
        None,
    ]  # the start: on the shard that opened it
    assert {r["device"] for r in records} == {"toy"} and {r["host"] for r in records} == {
        socket.gethostname()
    }
    assert all(r["worker"].startswith("local pid ") and r["seconds"] >= 0 for r in records)
    assert all(r["stage"] == "rollouts" and r["round"] == 1 for r in records)


def test_stats_live_beside_the_table_and_the_manifest_lists_them(tmp_path: Path) -> None:
    ref = _run(tmp_path)
    assert store.read_stage(tmp_path, ref).columns == ["x", "y"]  # the rows are untouched
    files = {f["file"] for f in ref["files"]}
    assert "shard_stats.parquet" in files
    side = pl.read_parquet(tmp_path / ref["path"] / "shard_stats.parquet")
    assert side["shard"].to_list() == [0, 1, 2] and side.schema == pl.Schema(shardstats.SCHEMA)
    problems = json.loads((tmp_path / "toy" / "problems").glob("*/manifest.json").__next__().read_text())
    assert "shard_stats.parquet" in {f["file"] for f in problems["files"]}  # a core stage: one record


def test_resumed_stage_keeps_the_stats_of_the_shards_it_reuses(tmp_path: Path) -> None:
    ref = _run(tmp_path)
    folder = tmp_path / ref["path"]
    kept = {r["shard"]: r for r in shardstats.read_records(folder)}
    (folder / "manifest.json").unlink()
    (folder / "part-00002.parquet").unlink()  # as if killed while writing the last shard
    again = _run(tmp_path)
    records = {r["shard"]: r for r in shardstats.read_records(folder)}
    assert records[0] == kept[0] and records[1] == kept[1]  # reused shards: their own first measurement
    assert records[2]["engine_start_s"] == 2.0  # the rerun opened the engine for shard 2
    side = pl.read_parquet(tmp_path / again["path"] / "shard_stats.parquet")
    assert side["shard"].to_list() == [0, 1, 2]


def test_a_record_without_its_shard_is_not_gathered(tmp_path: Path) -> None:
    ref = _run(tmp_path)
    folder = tmp_path / ref["path"]
    shardstats.write_record(folder, shardstats.new_record("rollouts", 1, 7, rows_out=1))
    assert shardstats.gather(folder, sorted(folder.glob("part-*.parquet")))["shard"].to_list() == [0, 1, 2]
    (folder / shardstats.STATS_DIR / "part-00001.json").write_text("{not json")  # a damaged record
    assert shardstats.gather(folder, sorted(folder.glob("part-*.parquet")))["shard"].to_list() == [0, 2]


def test_planted_records_are_skipped_and_never_fail_the_stage(tmp_path: Path) -> None:
    """A record is a measurement a stage folder holds, not trusted input: wrong types, a list, a symlink to a
    file outside, a folder in a record's place are skipped. (Old code: a string in a number field made the
    stage's finish fail in polars.)"""
    ref = _run(tmp_path)
    folder = tmp_path / ref["path"]
    stats = folder / shardstats.STATS_DIR
    (stats / "part-00000.json").write_text('{"shard": 0, "rows_out": "x", "seconds": 1.0}')
    (stats / "part-00001.json").unlink()
    (stats / "part-00001.json").symlink_to("/etc/hostname")
    (stats / "part-00003.json").mkdir()
    (stats / "part-00004.json").write_text("[4]")
    assert [r["shard"] for r in shardstats.read_records(folder)] == [2]
    assert shardstats.gather(folder, sorted(folder.glob("part-*.parquet")))["shard"].to_list() == [2]


def test_training_record_reads_the_trainer_metrics() -> None:
    metrics = {"examples": 8, "tokens": 2400, "wall_time_s": 12.5, "tokens_per_s": 240.0, "device": "cpu"}
    metrics |= {"step_time_s": 2.5, "peak_memory_gib": 3.1, "mfu": None, "processes": 1}
    record = shardstats.training_record("pi_theta0", 1, metrics, rows_in=8)
    assert record["tokens_in"] == 2400 and record["seconds"] == 12.5 and record["tokens_per_s"] == 240.0
    assert record["step_time_s"] == 2.5 and record["peak_memory_gib"] == 3.1 and record["mfu"] is None
    assert record["tokens_out"] is None and record["shard"] == 0
    assert shardstats.frame([record]).height == 1


@pytest.mark.parametrize(
    "before, after, delta", [(None, 5, 5), (3, 5, 2), (None, None, None), (1, "x", None)]
)
def test_delta(before: object, after: object, delta: object) -> None:
    assert shardstats._delta(after, before) == delta
