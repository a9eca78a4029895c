"""variational/analysis/throughput.py, the `shard_stats` SQL view and sql/throughput.sql: a run computed by
the real runner (toy stages with a metered engine) shows one stats row per shard, a per-stage summary with
rates over the engines' working time, and a report section with its plot; a run without stats says so."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest

from variational.analysis import report, throughput
from variational.analysis.sql import connect, run_sql
from variational.config import parse_config
from variational.pipeline import runs, store
from variational.pipeline.runner import run_stage
from variational.pipeline.stage import Engine, Inputs, Stage


class Metered:
    """A toy engine: 10 tokens in and 4 out per row; it takes 0.3 s to start and says so."""

    def __init__(self, i: Inputs):
        t0 = time.perf_counter()
        time.sleep(0.3)
        self.tokens_in = self.tokens_out = 0
        self.start_s = time.perf_counter() - t0

    def counters(self) -> dict:
        return {
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "start_s": self.start_s,
            "device": "toy",
        }

    def close(self) -> None:
        pass


def _shard(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
    e = engine.get()
    time.sleep(0.05)  # the work
    e.tokens_in, e.tokens_out = e.tokens_in + 10 * part.height, e.tokens_out + 4 * part.height
    return part


def _problems(i: Inputs) -> pl.DataFrame:
    n = i.conf.K
    return pl.DataFrame(
        {"prompt_idx": range(n), "source": ["a/1"] * n, "think_ref": ["t"] * n, "gold": [["1"]] * n}
    )


NUMBERS = Stage(name="problems", fields=("K",), core=_problems)
SAMPLES = Stage(
    name="rollouts",
    inputs=("problems",),
    uses=("verify.shard_size",),
    plan=lambda i: i.table("problems"),
    shard=_shard,
    shard_size="verify.shard_size",
    engine=Metered,
)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    conf = {"name": "toy", "data_root": str(tmp_path), "base_model": "embedded:smollm2-135m", "K": 6}
    cfg = parse_config(conf | {"verify": {"shard_size": 2}}).model_dump(mode="json")
    runs.begin_run(tmp_path, "toy", cfg)
    run_stage(SAMPLES, cfg, {"problems": run_stage(NUMBERS, cfg, {})})
    return tmp_path


def test_shard_stats_view_has_a_row_per_shard(run: Path) -> None:
    stats = run_sql(run, "toy", "SELECT * FROM shard_stats ORDER BY stage, shard")
    assert stats.select("stage", "shard").rows() == [
        ("problems", 0),
        ("rollouts", 0),
        ("rollouts", 1),
        ("rollouts", 2),
    ]
    wanted = {"stage", "round", "shard", "tokens_in", "tokens_out", "seconds", "engine_start_s", "device"}
    assert wanted | {"host", "worker"} <= set(stats.columns)
    rollouts = stats.filter(pl.col("stage") == "rollouts")
    assert rollouts["tokens_in"].to_list() == [20, 20, 20]
    start = rollouts["engine_start_s"].to_list()
    assert start[0] >= 0.3 and start[1:] == [None, None]
    assert run_sql(run, "toy", "SELECT count(*) FROM run_stages").item() == 2  # no per-stage side views


def test_summary_rates_leave_engine_starts_out(run: Path) -> None:
    rows = {r["stage"]: r for r in throughput.summary(connect(run, "toy")).iter_rows(named=True)}
    r = rows["rollouts"]
    assert (r["shards"], r["rows_out"], r["tokens_in"], r["tokens_out"], r["engine_starts"]) == (
        3,
        6,
        60,
        24,
        1,
    )
    assert r["engine_start_s"] >= 0.3 and r["device"] == "toy"
    raw = run_sql(
        run,
        "toy",
        "SELECT sum(seconds) - sum(coalesce(engine_start_s, 0)) FROM shard_stats WHERE shard >= 0 AND stage = 'rollouts'",
    )
    work = raw.item()  # three shards of >= 0.05 s each, the start left out
    assert work >= 0.15 and r["tokens_per_s"] == pytest.approx(24 / work, abs=0.1)
    assert rows["problems"]["tokens_out"] is None and rows["problems"]["tokens_per_s"] is None


def test_report_shows_throughput_with_a_plot(run: Path) -> None:
    md = report.write_report(run, "toy").read_text()
    assert "## Throughput" in md and "![throughput](throughput.png)" in md
    assert (run / "toy" / "report" / "throughput.png").stat().st_size > 5000
    assert "opening 1 engines; device cpu, toy" in md
    assert "| rollouts | 1 | 3 | 6 | 60 | 24 |" in md


def test_a_run_without_stats_has_an_empty_view_and_says_so(tmp_path: Path) -> None:
    st = store.StageStore(tmp_path, "old", "problems", "fp")
    st.write_shard(
        0, pl.DataFrame({"prompt_idx": [0], "source": ["a/1"], "think_ref": ["t"], "gold": [["1"]]})
    )
    runs.record_stage(tmp_path, "old", st.finish(round_=1), computed=True)
    assert run_sql(tmp_path, "old", "SELECT count(*) FROM shard_stats").item() == 0
    assert throughput.summary(connect(tmp_path, "old")).is_empty()
    assert "_No shard stats in this run" in report.write_report(tmp_path, "old").read_text()
