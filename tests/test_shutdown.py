"""variational/shutdown.py: SIGTERM / SIGINT stop a process at a safe point (or at once inside a blocking
call), every engine and worker process ends, and the process exits 143 / 130.

Each case runs in a child process of its own group (signals and handlers are process-wide), which the test
signals and then checks with tests/procgroup.py. The fast ones use only the standard library and the
DeadlinePool; the slow ones run the real vLLM CPU engine, math-verify workers and the trainer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from procgroup import output, start_in_new_group, wait_for_line, wait_group_gone

REPO = Path(__file__).resolve().parents[1]
# generous: a liveness bound on a loaded 2-core machine, not a speed claim (the issue asks for 30 s)
EXIT_WITHIN_S = 60

PRELUDE = """
import os, sys, threading, time
sys.path.insert(0, {repo!r})
from variational import shutdown

def report(fn):
    try:
        fn()
    except shutdown.StopRequested as stop:
        print("stopped", stop.signal_name, flush=True)
        sys.exit(stop.exit_code)
    print("finished", flush=True)
"""


def start(body: str, **env: str) -> subprocess.Popen:
    code = PRELUDE.format(repo=str(REPO)) + textwrap.dedent(body)
    return start_in_new_group([sys.executable, "-c", code], env={**os.environ, **env}, cwd=REPO)


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout_s: float = EXIT_WITHIN_S) -> int:
    proc.send_signal(signum)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {timeout_s}s after {signum!r}:\n{output(proc)}") from None


# ---------------------------------------------------------------- the flag and the handler (fast)


def test_first_sigterm_sets_the_flag_and_the_loop_stops_at_its_next_safe_point() -> None:
    proc = start(
        """
        shutdown.install()
        def loop():
            print("ready", flush=True)
            for i in range(100000):
                time.sleep(0.05)  # one 'micro-batch'
                if shutdown.stop_requested():
                    print("safe point", i, flush=True)  # a trainer saves its checkpoint here
                    shutdown.check()
        report(loop)
        """
    )
    wait_for_line(proc, "ready", 30)
    assert stop(proc) == 143
    text = output(proc)
    assert "safe point" in text and "stopped SIGTERM" in text, text
    assert wait_group_gone(proc.pid) == []


def test_sigint_exits_130() -> None:
    proc = start(
        """
        shutdown.install()
        def loop():
            print("ready", flush=True)
            while True:
                time.sleep(0.05)
                shutdown.check()
        report(loop)
        """
    )
    wait_for_line(proc, "ready", 30)
    assert stop(proc, signal.SIGINT) == 130, output(proc)
    assert "stopped SIGINT" in output(proc)


def test_a_second_signal_raises_at_once_where_nothing_polls() -> None:
    proc = start(
        """
        shutdown.install()
        def loop():
            print("ready", flush=True)
            while True:
                try:
                    time.sleep(3600)  # never polls
                except Exception:  # generic handlers must not swallow the stop
                    print("swallowed", flush=True)
        report(loop)
        """,
        VARIATIONAL_STOP_GRACE_S="3600",  # no watchdog here: only the second signal can end it
    )
    wait_for_line(proc, "ready", 30)
    proc.send_signal(signal.SIGTERM)
    wait_for_line(proc, "stopping at the next safe point", 30)
    assert proc.poll() is None  # the first signal only asked
    assert stop(proc) == 143
    assert "swallowed" not in output(proc) and "stopped SIGTERM" in output(proc)


def test_interruptible_region_raises_on_the_first_signal() -> None:
    proc = start(
        """
        shutdown.install()
        def blocked():
            with shutdown.interruptible():
                print("ready", flush=True)
                threading.Event().wait(3600)  # a blocking call, as a vLLM generate waits on its engine
        report(blocked)
        """,
        VARIATIONAL_STOP_GRACE_S="3600",
    )
    wait_for_line(proc, "ready", 30)
    assert stop(proc) == 143, output(proc)
    assert "stopped SIGTERM" in output(proc)


def test_watchdog_interrupts_code_that_never_polls() -> None:
    proc = start(
        """
        shutdown.install()
        def stuck():
            print("ready", flush=True)
            time.sleep(3600)
        report(stuck)
        """,
        VARIATIONAL_STOP_GRACE_S="1",
    )
    wait_for_line(proc, "ready", 30)
    assert stop(proc) == 143, output(proc)
    assert "no safe point reached" in output(proc)


def test_a_poller_that_saw_the_flag_is_not_interrupted_while_it_saves() -> None:
    proc = start(
        """
        shutdown.install()
        def loop():
            print("ready", flush=True)
            while not shutdown.stop_requested():
                time.sleep(0.05)
            time.sleep(3)  # a checkpoint that takes longer than the grace
            print("saved", flush=True)
            shutdown.check()
        report(loop)
        """,
        VARIATIONAL_STOP_GRACE_S="1",
    )
    wait_for_line(proc, "ready", 30)
    assert stop(proc) == 143
    assert "saved" in output(proc), output(proc)


def test_signals_after_the_stop_do_not_break_the_cleanup() -> None:
    proc = start(
        """
        shutdown.install()
        def run():
            try:
                with shutdown.interruptible():
                    print("ready", flush=True)
                    time.sleep(3600)
            finally:  # an engine's close(): the group may be signalled again meanwhile
                print("cleaning", flush=True)
                time.sleep(2)
                print("cleaned", flush=True)
        report(run)
        """
    )
    wait_for_line(proc, "ready", 30)
    proc.send_signal(signal.SIGTERM)
    wait_for_line(proc, "cleaning", 30)
    assert stop(proc) == 143
    assert "cleaned" in output(proc) and "already stopping" in output(proc), output(proc)


def test_install_is_idempotent_and_a_no_op_off_the_main_thread() -> None:
    proc = start(
        """
        import signal
        shutdown.install(); shutdown.install()
        assert shutdown.installed()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a library took SIGTERM over (Prefect's flow engine)
        assert not shutdown.installed()
        shutdown.install()
        assert shutdown.installed()
        t = threading.Thread(target=shutdown.install); t.start(); t.join()
        assert not shutdown.stop_requested() and shutdown.requested_signal() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert shutdown.stop_requested() and shutdown.requested_signal() == "SIGTERM"
        assert shutdown.exit_code() == 143
        shutdown.reset()
        assert not shutdown.stop_requested()
        print("ok", flush=True)
        """
    )
    assert proc.wait(timeout=EXIT_WITHIN_S) == 0, output(proc)
    assert "ok" in output(proc)


def test_exit_codes() -> None:
    from variational import shutdown

    assert shutdown.EXIT_CODES == {"SIGTERM": 143, "SIGINT": 130}
    assert issubclass(shutdown.StopRequested, BaseException)
    assert not issubclass(shutdown.StopRequested, Exception)
    assert shutdown.StopRequested("SIGINT").exit_code == 130


# ---------------------------------------------------------------- the worker pool


def test_sigterm_to_the_group_stops_a_pool_map_and_ends_its_workers() -> None:
    """The whole group gets SIGTERM (as from `timeout` or Slurm): workers die of it, the parent abandons the
    map instead of replacing them, and no worker or forkserver is left."""
    proc = start(
        """
        from variational.verifiers.procpool import DeadlinePool
        shutdown.install()
        def run():
            with DeadlinePool(time.sleep, 2) as pool:
                print("mapping", flush=True)
                pool.run([(3600,)] * 8, timeout_s=7200)
        report(run)
        """
    )
    wait_for_line(proc, "mapping", 60)
    time.sleep(3)  # workers started and busy
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=EXIT_WITHIN_S) == 143, output(proc)
    assert wait_group_gone(proc.pid) == [], output(proc)


def test_sigterm_to_the_parent_alone_ends_a_pool_map_and_its_workers() -> None:
    proc = start(
        """
        from variational.verifiers.procpool import DeadlinePool
        shutdown.install()
        def run():
            with DeadlinePool(time.sleep, 2) as pool:
                pool.run([(0.01,)] * 2, timeout_s=60)  # workers up
                print("mapping", flush=True)
                pool.run([(3600,)] * 8, timeout_s=7200)
        report(run)
        """
    )
    wait_for_line(proc, "mapping", 90)
    assert stop(proc) == 143, output(proc)
    assert wait_group_gone(proc.pid) == [], output(proc)


# ---------------------------------------------------------------- real engines (slow)


@pytest.mark.slow
def test_sigterm_during_vllm_sampling_ends_the_engine(embedded_model_dir: Path) -> None:
    pytest.importorskip("vllm")
    proc = start(
        f"""
        from variational.config import EngineConfig, SamplingConfig
        from variational.engines.sampling import Sampler
        shutdown.install()
        engine = EngineConfig(backend="vllm", dtype="float32", max_model_len=1024, max_num_seqs=32,
                              kv_cache_gib=0.5)
        sampling = SamplingConfig(temperature=1.0, max_tokens=900)
        prompt = "<|im_start|>user\\nWrite a long story about the sea.<|im_end|>\\n<|im_start|>assistant\\n"
        def run():
            with Sampler({str(embedded_model_dir)!r}, engine) as sampler:
                for shard in range(1000):
                    print("generating", shard, flush=True)
                    sampler.generate([prompt] * 8, n=4, sampling=sampling)
                    shutdown.check()
        report(run)
        """
    )
    wait_for_line(proc, "generating", 600)
    time.sleep(5)  # inside the generate call
    assert stop(proc, timeout_s=30) == 143, output(proc)
    assert wait_group_gone(proc.pid) == [], output(proc)


@pytest.mark.slow
def test_sigterm_during_verify_ends_the_math_workers() -> None:
    proc = start(
        """
        import polars as pl
        from tasks.verify import check_answers
        shutdown.install()
        texts = [f"so the answer is $\\\\boxed{{{i}/7 + {i}^2}}$" for i in range(200000)]
        df = pl.DataFrame({"text": texts, "gold": [[str(i)] for i in range(len(texts))]})
        def run():
            print("verifying", flush=True)
            check_answers(df, timeout_s=5.0, workers=2)
        report(run)
        """
    )
    wait_for_line(proc, "verifying", 120)
    time.sleep(20)  # workers warmed up (sympy imports) and parsing
    assert stop(proc, timeout_s=30) == 143, output(proc)
    assert wait_group_gone(proc.pid) == [], output(proc)


@pytest.mark.slow
def test_sigterm_during_training_saves_a_checkpoint_and_exits_143(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sft"
    proc = start(
        f"""
        import polars as pl
        from trainers.sft import train
        from variational.config import TrainConfig
        shutdown.install()
        rows = [("<|im_start|>user\\nQ{{i}}<|im_end|>\\n<|im_start|>assistant\\n".format(i=i),
                 "A long answer " * 20 + "<|im_end|>", 1.0) for i in range(64)]
        examples = pl.DataFrame(rows, schema=["prompt", "response", "weight"], orient="row")
        cfg = TrainConfig(epochs=1000, batch_size=8, micro_batch_tokens=256, max_length=128, save_steps=1,
                          mixed_precision="no")
        def run():
            print("training", flush=True)
            train({str(tiny_model_dir)!r}, examples, cfg, {str(out)!r}, progress=False)
        report(run)
        """
    )
    wait_for_line(proc, "training", 120)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)  # at least one step done
    assert stop(proc, timeout_s=30) == 143, output(proc)
    assert "stopped SIGTERM" in output(proc)
    assert any((out / "checkpoints").iterdir()), "no checkpoint written"
    assert wait_group_gone(proc.pid) == [], output(proc)
