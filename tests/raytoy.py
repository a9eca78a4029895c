"""A toy sharded stage run by the real runner on the Ray executor, for tests/test_ray_executor.py.

    PYTHONPATH=tests python tests/raytoy.py DATA_ROOT [--as-main]

runs the flow `raytoy` (problems -> rollouts, 6 shards of 3 items) with `executor.kind=ray, workers=2`.
Ray workers import this module by name (PYTHONPATH holds tests/), so a stage's fingerprint is the same in
the driver and in every worker. The shard holding item VICTIM_ITEM writes its worker's pid to
DATA_ROOT/victim.pid the first time it runs and then waits, so the test can SIGKILL that worker mid-shard;
when the pid file exists it computes at once.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from variational.config import parse_config
from variational.pipeline.runner import run
from variational.pipeline.stage import Engine, Inputs, Stage

# shard 1 of group 1 ([0, 1, 2] | [3, 4, 5]): shard 0 is written before it (another item: RAYTOY_VICTIM_ITEM)
VICTIM_ITEM = int(os.environ.get("RAYTOY_VICTIM_ITEM", "3"))
HOLD_S = 600.0  # how long the victim shard waits to be killed


def _numbers(i: Inputs) -> pl.DataFrame:
    return pl.DataFrame({"x": list(range(i.conf.K))})


class Multiplier:
    def __init__(self, i: Inputs):
        self.factor = i.conf.M

    def close(self) -> None:
        pass


def _shard(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
    pid_file = Path(os.environ.get("RAYTOY_PID_DIR") or i.data_root) / "victim.pid"  # a local folder
    if VICTIM_ITEM in part["x"] and not pid_file.exists():
        tmp = pid_file.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(pid_file)
        time.sleep(HOLD_S)
    time.sleep(0.5)  # a shard takes a moment, so both groups are busy at once
    return part.with_columns(y=pl.col("x") * engine.get().factor, pid=pl.lit(os.getpid()))


NUMBERS = Stage(name="problems", fields=("K",), core=_numbers, per_round=False)
MULTIPLIED = Stage(
    name="rollouts",
    inputs=("numbers",),
    fields=("M",),
    uses=("verify.shard_size",),
    plan=lambda i: i.table("numbers"),
    shard=_shard,
    shard_size="verify.shard_size",
    engine=Multiplier,
)


def config(root: Path) -> dict:
    conf = {
        "name": "raytoy",
        "data_root": str(root),
        "base_model": "embedded:smollm2-135m",
        "K": 18,
        "M": 3,
        "verify": {"shard_size": 3},
        "executor": {"kind": "ray", "workers": 2},
    }
    return parse_config(conf).model_dump(mode="json")


def main(root: Path, stages: Any) -> int:
    """Run the flow with the stages of module `stages` (this module imported by name, or `__main__`)."""
    from prefect import flow

    from variational import shutdown
    from variational.pipeline import orchestration
    from variational.pipeline.orchestration import task_runner
    from variational.pipeline.runs import begin_run

    cfg = config(root)
    shutdown.install()
    orchestration.start_shielded_server()  # the Ray workers report to it (else each starts its own)

    @flow(name="raytoy", task_runner=task_runner(parse_config(cfg).executor))
    def raytoy() -> dict:
        shutdown.install()  # again, as start_run does: Ray's init replaced the SIGTERM handler
        begin_run(root, cfg["name"], cfg)
        numbers = run(stages.NUMBERS, cfg)
        return run(stages.MULTIPLIED, cfg, numbers=numbers)

    try:
        raytoy()
    except BaseException as err:  # as the CLI: after a stop signal, whatever surfaced means "stopped"
        if shutdown.requested_signal() is None:
            raise
        return shutdown.exit_code(err)
    return 0


if __name__ == "__main__":  # Ray and Prefect start processes: nothing runs at import time
    # By default the stages come from `raytoy` imported by name, as the workers import it. With --as-main
    # they are this script's `__main__` functions, which a worker hashes as another module (its own
    # __main__): the flow must then stop with the worker's CodeMismatch, never finish a wrong folder.
    import raytoy

    sys.exit(main(Path(sys.argv[1]), sys.modules[__name__] if "--as-main" in sys.argv else raytoy))
