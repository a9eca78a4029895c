"""The one stage runner: given a `Stage` declaration (variational/pipeline/stage.py), everything else happens
here, once: the fingerprint, the lock, reuse and damage checks, reading inputs, shard planning (each shard a
Prefect task run `<stage>[i/n]`), the executor, writing, the manifest, run.json, the artifact.

Reuse. A stage folder is named by its fingerprint (variational/pipeline/fingerprint.py). The body's own check
(manifest present, every listed file of the recorded size) is the cache; it costs a few stat calls.

The flow's side: `start_run` (the config, once), `run(STAGE, cfg, round, **inputs)` (one Prefect task per
stage) and `step` (a plain step such as the report). `trace` runs a flow's body without computing anything
and returns the DAG it would run, with every stage's fingerprint (the planner and the tests read it).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

from variational import shutdown
from variational.config import RunConfig, load_config
from variational.pipeline import orchestration, shardstats
from variational.pipeline.fingerprint import stage_fingerprint
from variational.pipeline.orchestration import logger
from variational.pipeline.progress import StageProgress
from variational.pipeline.runs import begin_run, record_stage, writable
from variational.pipeline.stage import Engine, Inputs, Output, Ref, Stage
from variational.pipeline.storage import absolute_root, is_url, open_root
from variational.pipeline.store import DamagedStage, StageStore


# ================================================================ running one stage
def run_stage(stage: Stage, cfg: dict, refs: dict[str, Ref], round_: int = 1) -> Ref:
    """Reuse the finished stage or compute it; returns its manifest. Called inside the stage's task."""
    conf = RunConfig.model_validate(cfg)
    refs = {k: v for k, v in refs.items() if v is not None}
    inputs = Inputs(stage, conf, refs, round_)
    fp = stage_fingerprint(stage, conf, refs, round_)
    if stage.resolve:  # a model that is found, not made: no folder, nothing to reuse
        model_dir = stage.resolve(inputs)
        logger().info("%s -> %s", stage.name, model_dir)
        return {"stage": stage.name, "fingerprint": fp, "model_dir": model_dir}
    store = StageStore(conf.data_root, conf.name, stage.name, fp)
    log = logger()
    if (manifest := store.reusable()) is not None:  # reading only: no lock, so a read-only root reuses too
        return _reuse(conf, store, manifest)
    with store.lock():  # taken only to write
        if store.has_manifest() and (bad := store.problems()):
            moved = store.set_aside(bad)
            log.warning("%s: damaged (%s); set aside %s, recomputing", stage.name, "; ".join(bad), moved)
        if (manifest := store.reusable()) is not None:  # another run finished it meanwhile
            return _reuse(conf, store, manifest)
        if stage.verify_inputs:
            check_inputs(conf, refs, stage)
        manifest = _compute(stage, inputs, store)
    record_stage(conf.data_root, conf.name, manifest, computed=True)
    log.info(
        "%s done: rows in=%s out=%s, %.1fs -> %s",
        stage.name,
        manifest.get("rows_in"),
        manifest["rows"],
        manifest["wall_time_s"],
        store.dir,
    )
    publish(stage.name, manifest)
    return manifest


def _reuse(conf: RunConfig, store: StageStore, manifest: Ref) -> Ref:
    if writable(conf.data_root):  # a finished root on a read-only mount is reused as it is
        record_stage(conf.data_root, conf.name, manifest, computed=False)
    logger().info("%s: reusing finished stage %s (%s rows)", store.stage, store.fp, manifest["rows"])
    return manifest


def check_inputs(conf: RunConfig, refs: dict[str, Ref], stage: Stage) -> None:
    """Hash-check upstream files before an expensive or final step; set aside what is damaged."""
    for name in stage.inputs:
        ref = refs.get(name)
        if not ref or "path" not in ref:
            continue
        upstream = StageStore(conf.data_root, conf.name, ref["stage"], ref["fingerprint"])
        if bad := upstream.problems(deep=True):
            upstream.set_aside(bad)
            raise DamagedStage(
                f"{stage.name}: upstream {name!r} is damaged ({'; '.join(bad)}); it was set aside, "
                "rerun to recompute it"
            )


def _compute(stage: Stage, inputs: Inputs, store: StageStore) -> Ref:
    extra: dict[str, Any] = {}
    side: tuple[str, ...] = ()
    if stage.examples:  # a model stage: its training examples are its table, the model its product
        examples = stage.examples(inputs)
        if examples.is_empty():
            raise ValueError(
                f"{stage.name}: no training examples from {sorted(inputs.refs)}; nothing to train"
            )
        rows_in = examples.height
        _write_table(store, examples)
        logger().info("%s: %d examples -> %s", stage.name, examples.height, store.model_dir)
        extra.update(stage.train(inputs, examples, store.model_dir))  # metrics, summary
        if isinstance(metrics := extra.get("metrics"), dict):  # the stats of a model stage: its training
            shardstats.write_record(
                store, shardstats.training_record(stage.name, inputs.round, metrics, rows_in)
            )
    elif stage.plan:
        items = stage.plan(inputs)
        rows_in = items.height
        run_shards(stage, inputs, store, items)
    else:
        meter = shardstats.ShardMeter()
        out = stage.core(inputs)
        out = out if isinstance(out, Output) else Output(out)
        rows_in = None
        _write_table(store, out.table)
        for name, frame in out.side.items():
            store.write_side(name, frame)
        side, extra = tuple(f"{n}.parquet" for n in out.side), dict(out.meta)
        record = meter.record(stage.name, inputs.round, 0, None, out.table.height, shardstats.worker_name())
        shardstats.write_record(store, record)
    extra.setdefault("rows_in", rows_in)
    if stage.summary or stage.side:
        table = store.read()
        extra["summary"] = stage.summary(inputs, table) if stage.summary else extra.get("summary", "")
        for name, frame in (stage.side(inputs, table) if stage.side else {}).items():
            store.write_side(name, frame)
            side += (f"{name}.parquet",)
    stats = shardstats.gather(store, store.shard_files())
    if stats.height:  # beside the table, never in it: the stage's rows do not change
        store.write_side(shardstats.SIDE_TABLE, stats)
        side += (f"{shardstats.SIDE_TABLE}.parquet",)
    return store.finish(round_=inputs.round, extra_files=side, **extra)


def _write_table(store: StageStore, table: pl.DataFrame, rows_per_shard: int = 65_536) -> None:
    for i, chunk in enumerate(table.iter_slices(rows_per_shard) if table.height else [table]):
        store.write_shard(i, chunk)


# ================================================================ shards
def shard_count(items: pl.DataFrame, size: int) -> int:
    return max(1, math.ceil(items.height / size))


def _shard_size(stage: Stage, inputs: Inputs) -> int:
    if isinstance(stage.shard_size, int):
        return stage.shard_size
    node: Any = inputs.conf
    for part in stage.shard_size.split("."):
        node = getattr(node, part)
    return int(node)


def run_shards(stage: Stage, inputs: Inputs, store: StageStore, items: pl.DataFrame) -> None:
    """Shard i always holds items [i*size, (i+1)*size), so a rerun redoes only the shards not yet written.
    Local executor: one engine in this process, shards in order. Ray: the pending shards are split into
    `executor.workers` groups, one Ray task per group with its own engine (variational/pipeline/executor.py);
    per-request seeds make the rows independent of the grouping, so `executor` is in no fingerprint."""
    size = _shard_size(stage, inputs)
    n = shard_count(items, size)
    pending = [i for i in range(n) if not store.has_shard(i)]
    for i in pending:  # the record of a shard set aside or never finished is not this run's
        shardstats.remove_record(store, i)
    if len(pending) < n:
        logger().info("%s: %d/%d shards already done, resuming", stage.name, n - len(pending), n)
    else:
        logger().info("%s: computing %d shards of %d items", stage.name, n, items.height)
    done = [i for i in range(n) if i not in pending]
    if pending and inputs.run_config.executor.kind == "ray":
        _run_groups(stage, inputs, store, pending, done)
    else:
        progress = StageProgress(stage.name, n, done, logger(), round_=inputs.round)
        compute_shards(stage, inputs, store, items, size, n, pending, progress=progress)
    if missing := [i for i in range(n) if not store.has_shard(i)]:  # never a manifest over a partial table
        raise RuntimeError(
            f"{stage.name}: shards {missing} of {n} are missing in {store.dir} after every worker returned; "
            "rerun to compute them"
        )


def _run_groups(stage: Stage, inputs: Inputs, store: StageStore, pending: list[int], done: list[int]) -> None:
    from variational.pipeline import executor

    conf = inputs.run_config
    engine_needed = stage.engine is not None and stage.needs_gpu  # verify: CPU groups
    groups = executor.split_groups(pending, executor.resolve_workers(conf, engine_needed=engine_needed))
    logger().info("%s: %d shards on %d Ray workers", stage.name, len(pending), len(groups))
    cfg = conf.model_dump(mode="json")
    futures = []
    options = executor.remote_options_for(conf, engine_needed=engine_needed)
    with orchestration.ray_remote_options(**options):
        for g, ids in enumerate(groups):
            name = f"{stage.name}[group {g + 1}/{len(groups)}]"
            args = (stage, cfg, inputs.refs, inputs.round, ids, store.fp, f"ray group {g + 1}/{len(groups)}")
            futures.append(orchestration.task_in_run(compute_group, name).submit(*args))
    progress = StageProgress(stage.name, len(pending) + len(done), done, logger(), len(groups), inputs.round)
    try:  # the first worker's error, or a stop, ends the wait; the records workers write show progress
        executor.wait_all(futures, on_poll=lambda: progress.refresh(store, pending))
    except BaseException:
        executor.cancel(futures)  # the other groups stop too: a rerun redoes only missing shards
        raise


def compute_shards(
    stage: Stage,
    inputs: Inputs,
    store: StageStore,
    items: pl.DataFrame,
    size: int,
    n: int,
    ids: list[int],
    as_tasks: bool = True,
    progress: StageProgress | None = None,
    worker: str = "local",
) -> None:
    """Compute and write the shards `ids` with one engine in this process, each shard a task run
    `<stage>[i/n]` (in a Ray worker the group is the task run; its shards are logged), each with its stats
    record; `progress` (the flow's, local executor) is advanced as each shard finishes."""
    engine = Engine(stage.engine, inputs)
    try:
        for i in ids:
            shutdown.check()  # a stop request abandons the next shard, never half a file
            name = f"{stage.name}[{i + 1}/{n}]"
            run_one = orchestration.task_in_run(compute_one, name) if as_tasks else compute_one
            record = run_one(stage, inputs, store, engine, items.slice(i * size, size), i, worker)
            if progress is not None:
                progress.advance(record)
            else:
                logger().info(
                    "%s: shard %d, %d rows in %.1fs", stage.name, i, record["rows_out"], record["seconds"]
                )
    finally:
        engine.close()


def compute_one(
    stage: Stage,
    inputs: Inputs,
    store: StageStore,
    engine: Engine,
    items: pl.DataFrame,
    i: int,
    worker: str = "local",
) -> dict[str, Any]:
    """One shard: computed, written, then its stats record beside it (the record of a written shard)."""
    meter = shardstats.ShardMeter(engine)
    out = stage.shard(inputs, engine, items)
    store.write_shard(i, out)
    record = meter.record(
        stage.name, inputs.round, i, items.height, out.height, shardstats.worker_name(worker)
    )
    shardstats.write_record(store, record)
    return record


class CodeMismatch(RuntimeError):
    """A worker computes another fingerprint for a stage than the flow: its code or packages differ."""


def compute_group(
    stage: Stage,
    cfg: dict,
    refs: dict[str, Ref],
    round_: int,
    ids: list[int],
    fingerprint: str,
    worker: str = "ray",
) -> int:
    """A Ray worker's share of a stage: plan again (cheap, deterministic), open one engine, write `ids`.
    A worker killed mid-shard loses only that shard: the others are written, atomically, one by one, and
    Ray's retry of the group (or a rerun) skips them. The worker must fingerprint the stage as the flow did
    (`fingerprint`), or it would write its shards into another folder than the one the flow finishes."""
    conf = RunConfig.model_validate(cfg)
    inputs = Inputs(stage, conf, refs, round_)
    if (here := stage_fingerprint(stage, conf, refs, round_)) != fingerprint:
        raise CodeMismatch(
            f"{stage.name}: the worker on {socket.gethostname()} fingerprints this stage {here}, the flow "
            f"{fingerprint}: its code or packages differ from the flow's; run every node from the same "
            "checkout and environment"
        )
    store = StageStore(conf.data_root, conf.name, stage.name, fingerprint)
    items = stage.plan(inputs)
    size = _shard_size(stage, inputs)
    todo = [i for i in ids if not store.has_shard(i)]
    n = shard_count(items, size)
    compute_shards(stage, inputs, store, items, size, n, todo, as_tasks=False, worker=worker)
    return len(ids)


# ================================================================ the flow's side
@dataclass(frozen=True)
class Call:
    """One stage the flow runs: its declaration, round, upstream stages (by input name) and fingerprint."""

    stage: Stage
    round: int
    inputs: dict[str, str]  # input name -> the upstream call's key
    fingerprint: str

    @property
    def key(self) -> str:
        return f"{self.stage.name}@{self.round}"


_TRACE: contextvars.ContextVar[list[Call] | None] = contextvars.ContextVar("trace", default=None)


@contextlib.contextmanager
def tracing() -> Iterator[list[Call]]:
    """Inside this block `start_run`, `run` and `step` compute nothing: `run` records the call and returns a
    ref carrying the stage's real fingerprint, so the wiring and the folders of a whole run are known."""
    calls: list[Call] = []
    token = _TRACE.set(calls)
    try:
        yield calls
    finally:
        _TRACE.reset(token)


def trace(
    flow_body: Callable[..., Any], config: str | dict, overrides: list[str] | None = None
) -> list[Call]:
    """The DAG `flow_body` (a flow's undecorated function) runs for this config, in order, fingerprinted."""
    with tracing() as calls:
        flow_body(config, overrides or [])
    return calls


def start_run(config: str | dict, overrides: list[str] | None = None) -> dict:
    """The run's config, loaded once: a path (a deployment) or the dict the CLI validated. Makes the data
    root absolute (workers may run elsewhere) and resets run.json."""
    conf = (
        RunConfig.model_validate(config) if isinstance(config, dict) else load_config(config, overrides or [])
    )
    if _TRACE.get() is not None:
        return conf.model_dump(mode="json")
    shutdown.install()  # Prefect's flow engine installs its own SIGTERM handler: ours must win (issue #12)
    conf.data_root = absolute_root(conf.data_root)  # a URL stays a URL (never a local folder `s3:`)
    open_root(conf.data_root)  # an unknown scheme, a missing package or credentials: one line, now
    if conf.executor.kind == "ray" and not is_url(conf.data_root):  # every node must see the data root
        from variational.pipeline.executor import check_shared_root

        check_shared_root(conf.data_root)
    cfg = conf.model_dump(mode="json")
    if writable(conf.data_root):
        begin_run(conf.data_root, conf.name, cfg)
    else:  # a finished root on a read-only mount: every stage must be reused (a compute stops, one line)
        logger().warning("data root %s is read-only: run.json is left as it is", conf.data_root)
    return cfg


def publish(stage: str, manifest: dict) -> None:
    """A markdown artifact per stage (inside a flow run only: outside, the manifest has it all)."""
    md = (
        f"### {stage} ({manifest['fingerprint']})\n\n"
        f"| rows | shards | wall time (s) | path |\n|---|---|---|---|\n"
        f"| {manifest['rows']} | {manifest.get('shards', 0)} | {manifest['wall_time_s']} | `{manifest['path']}` |\n\n"
        f"{manifest.get('summary', '')}"
    )
    orchestration.publish_markdown(stage.replace("_", "-"), md, f"{stage} summary")


_TASKS: dict[str, Callable[..., Ref]] = {}


def stage_task(stage: Stage) -> Callable[..., Ref]:
    """The Prefect task of a stage (one per stage name), run name `<stage>` or `<stage>[round r]`."""
    if stage.name not in _TASKS:

        def body(cfg: dict, refs: dict[str, Ref], round_: int = 1) -> Ref:
            return run_stage(stage, cfg, refs, round_)

        def run_name() -> str:
            r = orchestration.task_parameter("round_", 1)
            return stage.name + (f"[round {r}]" if r != 1 else "")

        _TASKS[stage.name] = orchestration.as_task(body, stage.name, run_name)
    return _TASKS[stage.name]


def run(stage: Stage, cfg: dict, round_: int = 1, **refs: Ref | None) -> Ref:
    """The flow's one verb: run `stage` on these upstream refs (None = absent)."""
    refs = {k: v for k, v in refs.items() if v is not None}
    if (calls := _TRACE.get()) is not None:
        conf = RunConfig.model_validate(cfg)
        fp = stage_fingerprint(stage, conf, refs, round_)
        calls.append(Call(stage, round_, {k: v["key"] for k, v in refs.items()}, fp))
        return {"stage": stage.name, "fingerprint": fp, "key": calls[-1].key, "model_dir": ""}
    return stage_task(stage)(cfg, refs, round_)


def step(name: str, fn: Callable[[dict], str], cfg: dict) -> str | None:
    """A step of the flow that is not a stage (the report): a task run; nothing while tracing."""
    if _TRACE.get() is not None:
        return None
    return orchestration.as_task(fn, name)(cfg)
