"""The glue every stage task shares: Prefect task with our fingerprint as cache key, logging, artifacts.

A stage task has the signature `(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict`:
`cfg` is `RunConfig.model_dump()`, `upstream` maps stage names to their manifests (small dicts with
`fingerprint` and `path`), and the task returns its own manifest. Its fingerprint comes from the module's
`fingerprint_of(cfg, upstream, round_)`, which is also the Prefect cache key, so a new flow run of the same
config reuses every finished stage; inside the task, `StageStore.is_complete()` gives the same answer when
Prefect's result cache was wiped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext, TaskRunContext
from tqdm.auto import tqdm

from variational.config import RunConfig
from variational.store import StageStore, record_stage

FingerprintFn = Callable[[dict, dict[str, dict], int], str]


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task, the plain `variational` logger elsewhere (tests, CLI)."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("variational")


def stage_task(name: str, fingerprint_of: FingerprintFn) -> Callable:
    """Decorator: a Prefect task named `name` whose cache key is the stage fingerprint (never the run id)."""

    def cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        cfg, round_ = params["cfg"], params.get("round_", 1)
        fp = fingerprint_of(cfg, params.get("upstream") or {}, round_)
        # A cached result is only good while its tables exist: a wiped stage folder must miss the cache.
        done = (Path(cfg["data_root"]) / cfg["name"] / name / fp / "manifest.json").exists()
        return f"{name}-{fp}" if done else f"{name}-{fp}-pending"

    def run_name() -> str:
        from prefect.runtime import task_run

        r = task_run.parameters.get("round_", 1)
        return f"{name}" + (f"[round {r}]" if r != 1 else "")

    return task(name=name, cache_key_fn=cache_key, persist_result=True, task_run_name=run_name)


def open_store(cfg: dict, stage: str, fp: str) -> StageStore:
    conf = RunConfig.model_validate(cfg)
    return StageStore(conf.data_root, conf.name, stage, fp)


def finish_stage(
    store: StageStore,
    round_: int,
    *,
    rows_in: int | None = None,
    summary: str = "",
    **extra: Any,
) -> dict:
    """Write the manifest, point run.json at it, log rows in/out and wall time, publish a markdown artifact."""
    manifest = store.finish(rows_in=rows_in, round=round_, **extra)
    record_stage(store.data_root, store.run, store.stage, manifest, round_)
    log = logger()
    log.info(
        "%s done: rows in=%s out=%s, %.1fs -> %s",
        store.stage,
        rows_in,
        manifest["rows"],
        manifest["wall_time_s"],
        store.dir,
    )
    publish(store.stage, manifest, summary)
    return manifest


def reuse_stage(store: StageStore, round_: int) -> dict:
    """The stage already finished (manifest present): record it for this run and return its manifest."""
    manifest = store.manifest()
    record_stage(store.data_root, store.run, store.stage, manifest, round_)
    logger().info("%s: reusing finished stage %s (%s rows)", store.stage, store.fp, manifest["rows"])
    return manifest


def publish(stage: str, manifest: dict, summary: str = "") -> None:
    md = (
        f"### {stage} ({manifest['fingerprint']})\n\n"
        f"| rows | shards | wall time (s) | path |\n|---|---|---|---|\n"
        f"| {manifest['rows']} | {manifest.get('shards', 0)} | {manifest['wall_time_s']} | `{manifest['path']}` |\n\n"
        f"{summary}"
    )
    # outside a flow run there is nowhere to publish; the manifest has it all (and calling Prefect there
    # would start a throwaway local server: ~15 s per test that runs a task's .fn)
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    with contextlib.suppress(Exception):
        create_markdown_artifact(key=stage.replace("_", "-"), markdown=md, description=f"{stage} summary")


def run_shards(
    store: StageStore,
    items: pl.DataFrame,
    shard_size: int,
    compute: Callable[[pl.DataFrame], pl.DataFrame],
) -> tuple[int, int]:
    """Split `items` into fixed shards, compute and persist each missing one; finished shards are skipped.

    Shard i always holds rows [i*shard_size, (i+1)*shard_size) of `items`, so a rerun after a crash redoes
    only the shards that were not yet written. `compute` should open expensive engines lazily (first call).
    Returns (shards computed, shards reused)."""
    n = max(1, math.ceil(items.height / shard_size))
    todo = [i for i in range(n) if not store.has_shard(i)]
    log = logger()
    if len(todo) < n:
        log.info("%s: %d/%d shards already done, resuming", store.stage, n - len(todo), n)
    for i in tqdm(todo, desc=store.stage, unit="shard", disable=not todo):
        t0 = time.perf_counter()
        out = compute(items.slice(i * shard_size, shard_size))
        store.write_shard(i, out)
        log.info(
            "%s: shard %d/%d, %d rows in %.1fs", store.stage, i + 1, n, out.height, time.perf_counter() - t0
        )
    return len(todo), n - len(todo)


def record_run(cfg: dict, manifests: list[dict]) -> None:
    """Point run.json at every manifest of this flow run, including stages served from Prefect's cache
    (a cache hit skips the task body, so the body cannot record itself)."""
    for m in manifests:
        if m and "stage" in m and "path" in m and "rows" in m:
            record_stage(cfg["data_root"], cfg["name"], m["stage"], m, m.get("round", 1))
