"""variational/pipeline/progress.py: shards done of total, an ETA from this run's shards (engine starts left
out, resumed shards not counted as work of this run), the log line, and progress read from the records
Ray workers write."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from variational.pipeline import shardstats
from variational.pipeline.progress import StageProgress, format_seconds

LOG = logging.getLogger("test-progress")


def _record(shard: int, seconds: float, start: float | None = None) -> dict:
    return shardstats.new_record("rollouts", 1, shard, rows_out=4, seconds=seconds, engine_start_s=start)


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (7620, "2h07m")])
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_eta_from_this_runs_shards_without_engine_starts(caplog: pytest.LogCaptureFixture) -> None:
    progress = StageProgress("rollouts", 10, done=[0, 1], log=LOG)  # two shards reused from a killed run
    assert progress.eta_s() is None and progress.describe() == "rollouts: 2/10 shards"
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress.advance(_record(2, 25.0, start=20.0))  # 5 s of work after a 20 s engine start
        progress.advance(_record(3, 7.0))
    assert progress.eta_s() == pytest.approx(6.0 * 6)  # mean 6 s x 6 shards left
    assert progress.percent == 40.0
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "rollouts: 3/10 shards; ETA 35s; shard 2: 4 rows in 25.0s (engine start 20.0s)"
    assert lines[1].startswith("rollouts: 4/10 shards; ETA 36s; shard 3")


def test_eta_divides_by_the_groups_working_at_once() -> None:
    progress = StageProgress("logps", 9, done=[], log=LOG, parallel=3)
    progress.advance(_record(0, 6.0))
    assert progress.eta_s() == pytest.approx(6.0 * 8 / 3)


def test_no_eta_once_done() -> None:
    progress = StageProgress("verdicts", 1, done=[], log=LOG)
    progress.advance(_record(0, 1.0))
    assert progress.describe() == "verdicts: 1/1 shards"


def test_refresh_takes_the_records_workers_wrote(tmp_path: Path) -> None:
    progress = StageProgress("rollouts", 4, done=[0], log=LOG, parallel=2)
    progress.refresh(tmp_path, pending=[1, 2, 3])
    assert progress.done == {0}
    shardstats.write_record(tmp_path, _record(2, 3.0, start=1.0))
    shardstats.write_record(tmp_path, _record(0, 9.0))  # a reused shard's old record: already counted
    progress.refresh(tmp_path, pending=[1, 2, 3])
    progress.refresh(tmp_path, pending=[1, 2, 3])  # nothing new: counted once
    assert progress.done == {0, 2} and progress.seconds == [2.0]
