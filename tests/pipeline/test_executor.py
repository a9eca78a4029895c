"""variational/pipeline/executor.py: task runners, worker counts, shard groups, Ray resources, the shared-root check.

Fast tests use literal Node lists (no Ray); one slow test starts a real local Ray with 2 CPUs and runs a
Prefect flow on the RayTaskRunner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import procgroup
import pytest

from variational.config import ConfigError, ExecutorConfig, RunConfig, parse_config
from variational.pipeline.executor import (
    GROUP_RETRIES,
    RAY_TEMP_DIR,
    Node,
    SharedRootError,
    describe_unseen,
    ray_init_kwargs,
    read_marker,
    remote_options_for,
    resolve_workers,
    split_groups,
)
from variational.pipeline.orchestration import task_runner

REPO = Path(__file__).resolve().parents[2]


def conf(tp: int = 1, **executor: object) -> RunConfig:
    return parse_config(
        {
            "name": "t",
            "base_model": "embedded:smollm2-135m",
            "engine": {"tensor_parallel_size": tp},
            "executor": executor,
        }
    )


def gpu_node(i: int, gpus: int = 8, cpus: int = 96) -> Node:
    return Node(node_id=f"n{i}", address=f"10.0.0.{i}", hostname=f"gpu{i}", cpus=cpus, gpus=gpus)


def cpu_node(i: int, cpus: int) -> Node:
    return Node(node_id=f"c{i}", address=f"10.1.0.{i}", hostname=f"cpu{i}", cpus=cpus, gpus=0)


# ---------------------------------------------------------------- config


def test_executor_config_defaults_to_local_and_validates() -> None:
    assert RunConfig(name="t", base_model="b").executor == ExecutorConfig(kind="local", address=None)
    ok = conf(kind="ray", address="ray://head:10001", workers=3).executor
    assert (ok.kind, ok.address, ok.workers) == ("ray", "ray://head:10001", 3)
    assert conf(kind="ray", address="10.0.0.1:6379").executor.address == "10.0.0.1:6379"
    for bad, key in [
        ({"workers": 0}, "executor.workers"),
        ({"workers": "all"}, "executor.workers"),
        ({"kind": "slurm"}, "executor.kind"),
        ({"address": "http://head"}, "executor.address"),
        ({"nodes": 2}, "executor.nodes"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            conf(**bad)


# ---------------------------------------------------------------- task runner


def test_ray_init_kwargs_start_a_quiet_local_ray_or_join_the_given_one() -> None:
    local = ray_init_kwargs(ExecutorConfig(kind="ray"))
    assert local["address"] == "local" and local["num_cpus"] == len(os.sched_getaffinity(0))
    assert local["include_dashboard"] is False and local["_temp_dir"] == RAY_TEMP_DIR
    assert len(RAY_TEMP_DIR) < 20  # Ray's socket paths below it must stay under 107 bytes
    for address in ("auto", "ray://head:10001"):
        joined = ray_init_kwargs(ExecutorConfig(kind="ray", address=address))
        assert joined["address"] == address and joined["include_dashboard"] is False
        # a running cluster refuses these: they describe a Ray this process would start
        assert not {"num_cpus", "_temp_dir", "object_store_memory"} & joined.keys()


def test_local_task_runner_needs_no_ray() -> None:
    code = (
        "import sys; from variational.config import ExecutorConfig; from variational.pipeline import orchestration as executor; "
        "r = executor.task_runner(ExecutorConfig()); print(type(r).__name__, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ThreadPoolTaskRunner", "False"]


def test_ray_task_runner_is_configured_but_not_started() -> None:
    runner = task_runner(ExecutorConfig(kind="ray", address="auto"))
    assert type(runner).__name__ == "RayTaskRunner"
    assert runner.init_kwargs["address"] == "auto"
    import ray

    assert not ray.is_initialized()  # building the runner starts nothing; the flow does


# ---------------------------------------------------------------- workers and resources


def test_resolve_workers() -> None:
    eight = [gpu_node(0)]
    assert resolve_workers(conf(kind="local", workers=4), nodes=eight) == 1  # one engine in the flow
    assert resolve_workers(conf(kind="ray", workers=3), nodes=eight) == 3
    assert resolve_workers(conf(kind="ray"), nodes=eight) == 8  # one 8-GPU node, TP 1
    assert resolve_workers(conf(tp=4, kind="ray"), nodes=eight) == 2
    # TP groups never span nodes: 3 GPUs per node with TP 2 fit one engine each, not three in all
    assert resolve_workers(conf(tp=2, kind="ray"), nodes=[gpu_node(0, 3), gpu_node(1, 3)]) == 2
    assert resolve_workers(conf(kind="ray"), nodes=[gpu_node(0), gpu_node(1)]) == 16
    # CPU cluster: one engine per 4 CPUs, never fewer than one worker
    assert resolve_workers(conf(kind="ray"), nodes=[cpu_node(0, 16), cpu_node(1, 8)]) == 6
    assert resolve_workers(conf(kind="ray"), nodes=[cpu_node(0, 2)]) == 1
    # verify runs on CPUs even on a GPU node
    assert resolve_workers(conf(kind="ray"), engine_needed=False, nodes=eight) == 24


def test_remote_options_for() -> None:
    def resources(*args) -> dict:
        options = remote_options_for(*args)
        assert options.pop("max_retries") == GROUP_RETRIES  # a dead worker's group runs again
        return options

    eight = [gpu_node(0)]
    assert resources(conf(tp=2, kind="ray"), True, eight) == {"num_gpus": 2, "num_cpus": 1}
    assert "num_gpus" not in resources(conf(kind="ray"), False, eight)  # verify: CPU only
    assert resources(conf(kind="ray"), False, eight) == {"num_cpus": 4}
    # this machine: 2 CPUs, 2 workers -> one CPU each, so both groups run at once
    two = [cpu_node(0, 2)]
    assert resources(conf(kind="ray", workers=2), True, two) == {"num_cpus": 1}
    assert resources(conf(kind="ray", workers=1), True, two) == {"num_cpus": 2}
    # an even share, but never more than the largest node holds (else Ray could never place it)
    assert resources(conf(kind="ray", workers=1), True, [cpu_node(0, 8), cpu_node(1, 8)]) == {"num_cpus": 8}


def test_split_groups_is_balanced_contiguous_and_complete() -> None:
    assert split_groups([5, 0, 3, 1, 2, 4, 6], 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_groups([7, 2], 8) == [[2], [7]]  # no empty groups
    assert split_groups([], 4) == []
    for n_shards in range(0, 40):
        for workers in range(1, 10):
            pending = list(range(0, 3 * n_shards, 3))
            groups = split_groups(pending, workers)
            assert [i for g in groups for i in g] == pending
            sizes = [len(g) for g in groups]
            assert all(sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
            assert len(groups) == min(workers, n_shards)
            assert split_groups(list(reversed(pending)), workers) == groups
    with pytest.raises(ValueError, match="workers"):
        split_groups([0], 0)
    with pytest.raises(ValueError, match="duplicate"):
        split_groups([1, 1], 2)


# ---------------------------------------------------------------- shared data root


def test_read_marker(tmp_path: Path) -> None:
    marker = tmp_path / ".executor" / "shared-root-abc"
    assert "missing" in read_marker(str(marker), "abc")
    marker.parent.mkdir()
    marker.write_text("abc")
    assert read_marker(str(marker), "abc") == ""
    assert "different filesystem" in read_marker(str(marker), "xyz")


def test_unseen_root_error_names_node_and_path() -> None:
    msg = describe_unseen(Path("/scratch/vr"), [(gpu_node(3), "/scratch/vr/.executor/m is missing")])
    assert "/scratch/vr" in msg and "gpu3" in msg and "10.0.0.3" in msg and "--data-root" in msg
    assert issubclass(SharedRootError, RuntimeError)


# ---------------------------------------------------------------- a real local Ray


def _write_pid(out_dir: str, name: str) -> int:
    """A Prefect task body: write this process's pid to `name` atomically (temp + rename)."""
    path = Path(out_dir) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.replace(path)
    return os.getpid()


@pytest.mark.slow
def test_ray_task_runner_runs_tasks_in_ray_workers(tmp_path: Path) -> None:
    import ray
    import ray.cloudpickle
    from prefect import flow, task
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from variational.pipeline.executor import check_shared_root, cluster_nodes, unseen_nodes
    from variational.pipeline.orchestration import ray_remote_options as remote_options

    # Ray workers import functions by module name; tests/ is not on their path (the project's own task
    # bodies are, being installed), so this module's functions travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = conf(kind="ray", workers=2)
    write = task(_write_pid, name="write-pid", persist_result=False)

    @flow(name="executor-test", task_runner=task_runner(cfg.executor))
    def two_groups(out_dir: str) -> dict:
        nodes = cluster_nodes()
        root = check_shared_root(tmp_path)  # the driver's marker is visible on the (one) node
        missing = unseen_nodes(tmp_path / "never-written", "token")
        groups = split_groups([0, 1, 2, 3], resolve_workers(cfg, nodes=nodes))
        with remote_options(**remote_options_for(cfg, engine_needed=True, nodes=nodes)):
            futures = [write.submit(out_dir, f"group-{g}.txt") for g in range(len(groups))]
        return {"pids": [f.result() for f in futures], "root": root, "missing": missing, "nodes": nodes}

    quiet_and_patient = {  # no network here; the temporary API server starts slowly on a loaded 2-core box
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 600,
    }
    try:
        with temporary_settings(updates=quiet_and_patient):
            out = two_groups(str(tmp_path))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert not ray.is_initialized()  # the runner started Ray, so the flow's end stopped it
    assert out["root"] == tmp_path.resolve()
    assert len(out["nodes"]) == 1 and out["nodes"][0].cpus == len(os.sched_getaffinity(0))
    [(node, seen)] = out["missing"]
    assert node == out["nodes"][0] and "never-written is missing" in seen
    assert not list((tmp_path / ".executor").iterdir())  # the marker is cleaned up
    written = {int((tmp_path / f"group-{g}.txt").read_text()) for g in range(2)}
    assert written == set(out["pids"])
    assert os.getpid() not in written  # both ran in Ray worker processes, not in the flow's
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- a Ray worker killed mid-stage (issue 9 §3)


def _raytoy(root: Path, *flags: str) -> subprocess.Popen:
    """tests/raytoy.py in its own process group: the runner, a toy stage of 6 shards, Ray with 2 workers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    env |= {"PREFECT_HOME": str(root / ".prefect-home"), "PYTHONUNBUFFERED": "1"}
    (root / ".prefect-home").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "tests" / "raytoy.py"), str(root), *flags]
    return procgroup.start_in_new_group(cmd, cwd=REPO, env=env)


def _victim(root: Path, proc: subprocess.Popen) -> int:
    """The pid of the Ray worker inside the victim shard, once it is there (raytoy writes it)."""
    pid_file = root / "victim.pid"
    deadline = time.monotonic() + 300
    while not pid_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, procgroup.output(proc)
        time.sleep(0.1)
    return int(pid_file.read_text())


def _shards(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "raytoy" / "rollouts").glob("*/part-*.parquet")}


@pytest.mark.slow
def test_a_ray_worker_killed_mid_shard_loses_only_that_shard(tmp_path: Path) -> None:
    """SIGKILL to the Ray worker process writing shard 1 of group [0, 1, 2]: Ray runs the group again, which
    skips shard 0; the run finishes with the whole table, and no shard written before the kill is rewritten
    (then or by a rerun)."""
    import polars as pl
    import raytoy

    from variational.pipeline.store import read_stage

    root = tmp_path / "root"
    proc = _raytoy(root)
    victim = _victim(root, proc)
    before = _shards(root)
    assert "part-00000.parquet" in before and "part-00001.parquet" not in before, before
    os.kill(victim, signal.SIGKILL)
    rc = proc.wait(timeout=300)
    log = procgroup.output(proc, last=400)
    assert rc == 0, log
    assert procgroup.wait_group_gone(proc.pid) == []
    assert "will be retried" in log, log  # Ray's own report: the group ran again

    after = _shards(root)
    assert {k: after[k] for k in before} == before, "shards written before the kill were rewritten"
    assert sorted(after) == [f"part-{i:05d}.parquet" for i in range(6)]
    run = json.loads((root / "raytoy" / "run.json").read_text())["stages"]["rollouts"]["1"]
    rollouts = read_stage(root, {"stage": "rollouts", **run}).sort("x")
    assert rollouts["x"].to_list() == list(range(18)) and rollouts["y"].to_list() == [
        3 * x for x in range(18)
    ]
    pids = dict(zip(rollouts["x"], rollouts["pid"], strict=True))
    assert pids[0] == victim  # shard 0: the killed worker wrote it before it died
    assert pids[raytoy.VICTIM_ITEM] != victim  # shard 1: the retried group wrote it
    assert rollouts.filter(pl.col("pid") == victim).height == 3  # and nothing else of the dead worker

    rerun = _raytoy(root)  # everything finished: reused, nothing written
    assert rerun.wait(timeout=300) == 0, procgroup.output(rerun)
    assert _shards(root) == after
    assert (
        json.loads((root / "raytoy" / "run.json").read_text())["stages"]["rollouts"]["1"]["computed"] is False
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_cleanly_and_the_rerun_resumes(tmp_path: Path) -> None:
    """SIGTERM to the run's process group (what `timeout`, Slurm and Kubernetes send) while a Ray worker is
    inside a shard: Ray's own SIGTERM handler (it aborts the driver) must not win over ours; the run exits
    143 within 30 s, nothing of the group or the busy worker is left, and the rerun keeps every shard written
    before the stop."""
    root = tmp_path / "root"
    proc = _raytoy(root)
    victim = _victim(root, proc)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=60)
    stopped_in = time.monotonic() - t0
    log = procgroup.output(proc, last=200)
    assert rc == 143 and stopped_in < 30, f"rc {rc} after {stopped_in:.0f}s:\n{log}"
    assert "SIGTERM received" in log and "SIGTERM received at time" not in log, log  # ours, not Ray's
    assert procgroup.wait_group_gone(proc.pid) == []
    deadline = time.monotonic() + 30  # the worker runs in its own group: Ray's shutdown must end it
    while _alive(victim) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(victim), f"the Ray worker {victim} outlived the stopped run"
    before = _shards(root)
    assert "part-00000.parquet" in before and "part-00001.parquet" not in before, before

    rerun = _raytoy(root)
    assert rerun.wait(timeout=300) == 0, procgroup.output(rerun)
    after = _shards(root)
    assert {k: after[k] for k in before} == before and len(after) == 6


@pytest.mark.slow
def test_a_worker_with_other_code_stops_the_stage_before_writing(tmp_path: Path) -> None:
    """Stages defined in the driver's `__main__` hash differently in a worker (another `__main__`), as a
    node with another checkout would: the group refuses to write and no manifest is made."""
    root = tmp_path / "root"
    proc = _raytoy(root, "--as-main")
    rc = proc.wait(timeout=300)
    log = procgroup.output(proc, last=400)
    assert rc != 0 and "CodeMismatch" in log and "differ from the flow's" in log, log
    assert not list((root / "raytoy" / "rollouts").glob("*/part-*.parquet"))
    assert not list((root / "raytoy" / "rollouts").glob("*/manifest.json"))
