"""How far a sharded stage is: shards done of total and an ETA from the rate measured in this run.

In:  the shard count, the shards already done when the stage started (resumed ones), and each shard's
     stats record as it finishes (variational/pipeline/shardstats.py). Out: one log line per finished
     shard, `rollouts: 2/3 shards, 48 rows in 10.9s; ETA 11s`, and a Prefect progress artifact per stage
     (`progress-rollouts`, updated as shards finish; orchestration.publish_progress).

The ETA is the mean time of the shards computed in this run, engine starts left out (a start happens once
per group, not per shard), times the shards left, divided by the groups working in parallel.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from variational.pipeline import orchestration, shardstats


def format_seconds(seconds: float) -> str:
    """42s, 3m05s, 2h07m: short enough for a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StageProgress:
    """Progress of one sharded stage: `advance(record)` as each shard finishes (local executor) or
    `refresh(stage_dir)` from the records workers wrote (Ray groups, polled by the flow)."""

    def __init__(
        self,
        stage: str,
        total: int,
        done: list[int],
        log: logging.Logger | logging.LoggerAdapter,
        parallel: int = 1,
        round_: int = 1,
    ):
        self.stage, self.total, self.log, self.parallel = stage, total, log, max(1, parallel)
        self.done: set[int] = set(done)
        self.seconds: list[float] = []  # this run's shards, engine starts left out
        self.t0 = time.monotonic()
        suffix = f"-round-{round_}" if round_ != 1 else ""
        self.key = f"progress-{stage.replace('_', '-')}{suffix}"
        self.artifact: Any = orchestration.publish_progress(self.key, self.percent, self.describe())

    @property
    def percent(self) -> float:
        return 100.0 * len(self.done) / max(1, self.total)

    def eta_s(self) -> float | None:
        """Seconds left at this run's measured rate; None before a shard of this run has finished."""
        if not self.seconds:
            return None
        left = self.total - len(self.done)
        return sum(self.seconds) / len(self.seconds) * left / self.parallel

    def describe(self) -> str:
        eta = self.eta_s()
        text = f"{self.stage}: {len(self.done)}/{self.total} shards"
        return text + (
            f"; ETA {format_seconds(eta)}" if eta is not None and len(self.done) < self.total else ""
        )

    def advance(self, record: dict[str, Any]) -> None:
        """A shard of this run finished with this stats record: log it and update the artifact."""
        self.done.add(record["shard"])
        seconds = record.get("seconds") or 0.0
        self.seconds.append(max(0.0, seconds - (record.get("engine_start_s") or 0.0)))
        start = record.get("engine_start_s")
        started = f" (engine start {start:.1f}s)" if start else ""
        tokens = f", {record['tokens_out']} tokens" if record.get("tokens_out") is not None else ""
        self.log.info(
            "%s; shard %d: %s rows%s in %.1fs%s",
            self.describe(),
            record["shard"],
            record.get("rows_out"),
            tokens,
            seconds,
            started,
        )
        self.artifact = orchestration.publish_progress(self.key, self.percent, self.describe(), self.artifact)

    def refresh(self, stage: Any, pending: list[int]) -> None:
        """Take in the records of `pending` shards that workers have written since the last call."""
        new = [r for r in shardstats.read_records(stage, pending) if r["shard"] not in self.done]
        for record in sorted(new, key=lambda r: r.get("finished_at") or ""):
            self.advance(record)
