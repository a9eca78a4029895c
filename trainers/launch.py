"""Run the one training loop from the flow: in this process, or as N processes under torchrun (FSDP2).

In:  the same arguments as trainers.sft.train (model folder, examples frame, TrainConfig, out_dir) and the
     caller's logger.
Out: the training metrics; `out_dir` holds the finished HF folder (full gathered weights + tokenizer).

`num_processes` 1 (auto on CPU) trains in this process. More: the examples and the config go to a work
folder beside `out_dir`, `torchrun --nproc_per_node N -m trainers.sft` runs as a child whose output lines
are streamed into the caller's logger, and a failure raises with the tail of that output. The child is tied
to this process: a stop request here (variational.shutdown) is forwarded as SIGTERM (torchrun passes it to
every trainer process, which checkpoints at the next micro-batch boundary and exits), and if this process
dies, even by SIGKILL, the kernel sends torchrun SIGTERM (PR_SET_PDEATHSIG), so no orphan keeps training
into the folder a rerun will resume from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

import polars as pl

from variational import shutdown
from variational.config import TrainConfig

logger = logging.getLogger(__name__)
TAIL_LINES = 40

# torchrun, started by a Python that first asks the kernel for SIGTERM when its parent dies (prctl
# PR_SET_PDEATHSIG = 1) and exits if that parent is already gone; no preexec_fn, which is unsafe in a
# threaded caller such as a Prefect worker.
_BOOTSTRAP = (
    "import ctypes, os, runpy, signal, sys; "
    "parent = int(sys.argv.pop(1)); "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
    "os.getppid() == parent or sys.exit('parent gone'); "
    "runpy.run_module('torch.distributed.run', run_name='__main__', alter_sys=True)"
)


def torchrun_command(
    nproc: int, nodes: int, trainer_args: list[str], rdzv_endpoint: str | None = None
) -> list[str]:
    """The argv that runs `python -m trainers.sft trainer_args` as nproc processes per node (through
    trainers.perf, which also writes each process's peak memory for the metrics).

    One node: --standalone (a private rendezvous on a free local port). Several: a c10d rendezvous at
    `rdzv_endpoint` (host:port), and the same command must run on every node."""
    cmd = [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), "--nproc-per-node", str(nproc)]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint:
            raise ValueError(f"nodes={nodes}: set VARIATIONAL_RDZV_ENDPOINT=host:port (node 0's address)")
        cmd += ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    return [*cmd, "-m", "trainers.perf", *trainer_args]  # trainers.sft.main, its peak memory recorded


def child_env(nproc: int) -> dict[str, str]:
    """Unbuffered output without progress bars (lines arrive as they are printed) and the CPU cores split
    between the processes (torchrun would set OMP_NUM_THREADS=1 and warn)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # no bars in a log
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    repo = str(Path(__file__).resolve().parents[1])  # `-m trainers.sft` from any working directory
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    return env


def stream(cmd: list[str], log: logging.Logger | logging.LoggerAdapter, env: dict[str, str]) -> None:
    """Run `cmd`, each output line into `log`, until it exits. A stop request is forwarded as SIGTERM and
    raises StopRequested once the child has exited; a non-zero exit raises RuntimeError with the tail."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    )
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def pump() -> None:  # a thread: a blocking readline must not delay the stop polling below
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            log.info("%s", tail[-1])

    reader = threading.Thread(target=pump, name="torchrun-log", daemon=True)
    reader.start()
    stopping = False
    try:
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            if not stopping and shutdown.stop_requested():
                stopping = True
                log.warning("stop requested: the training processes checkpoint and exit")
                proc.send_signal(signal.SIGTERM)
    except BaseException:  # a second signal (stop at once) or an error here: torchrun ends its workers
        proc.send_signal(signal.SIGTERM)
        raise
    finally:
        reader.join(timeout=10)
    if stopping:
        raise shutdown.StopRequested(shutdown.requested_signal() or "SIGTERM")
    if proc.returncode != 0:
        last = "\n".join(tail)
        raise RuntimeError(
            f"training under torchrun failed (exit {proc.returncode}); its last lines:\n{last}"
        )


def launch(
    model_dir: str | Path,
    examples: pl.DataFrame,
    cfg: TrainConfig,
    out_dir: Path,
    nproc: int,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> dict:
    """Train under torchrun with `nproc` processes per node; resumes from out_dir's checkpoints."""
    from trainers import perf, sft  # here, not at the top: importing the stage modules must not load torch

    out_dir = Path(out_dir)
    if (out_dir / sft.METRICS).exists():
        return json.loads((out_dir / sft.METRICS).read_text())
    work = out_dir.with_name(f".{out_dir.name}.launch")  # beside out_dir: on the data root all nodes see
    work.mkdir(parents=True, exist_ok=True)
    examples.write_parquet(work / "examples.parquet")
    (work / "train_config.json").write_text(cfg.model_dump_json())
    args = ["--model", str(model_dir), "--data", str(work / "examples.parquet"), "--out", str(out_dir)]
    args += ["--train-config", str(work / "train_config.json")]
    cmd = torchrun_command(nproc, cfg.nodes, args, os.environ.get("VARIATIONAL_RDZV_ENDPOINT"))
    log.info("sft: %d processes x %d node(s): %s", nproc, cfg.nodes, shlex.join(cmd[:2] + ["…"] + cmd[3:]))
    stream(cmd, log, child_env(nproc) | {perf.PEAK_DIR_ENV: str(work)})
    metrics = json.loads((out_dir / sft.METRICS).read_text())
    metrics = perf.complete(out_dir, metrics, nproc * cfg.nodes, _precision(cfg), perf.children_peak(work))
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def run_training(
    model_dir: str | Path,
    examples: pl.DataFrame,
    cfg: TrainConfig,
    out_dir: Path,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> dict:
    """trainers.sft.train in this process when cfg asks for one process on one node, else under torchrun."""
    from trainers import perf, sft  # here, not at the top: importing the stage modules must not load torch
    from trainers.distributed import resolve_processes

    nproc = resolve_processes(cfg.num_processes)
    if (Path(out_dir) / sft.METRICS).exists():  # trained already: its metrics as they were recorded
        return json.loads((Path(out_dir) / sft.METRICS).read_text())
    if nproc == 1 and cfg.nodes == 1:
        device = perf.training_device()
        perf.reset_peak(device)
        metrics = sft.train(model_dir, examples, cfg, out_dir, log=log)
        return perf.complete(out_dir, metrics, 1, _precision(cfg), perf.peak_memory_gib(device))
    return launch(model_dir, examples, cfg, out_dir, nproc, log)


def _precision(cfg: TrainConfig) -> str:
    """The precision the trainer picks for cfg.mixed_precision here (trainers/distributed.py)."""
    from trainers import distributed

    cuda = distributed.torch.cuda.is_available()
    native = distributed.torch.cuda.is_bf16_supported() if cuda else distributed.cpu_has_native_bf16()
    return distributed.choose_precision(cfg.mixed_precision, cuda, native)[0]
