"""Weighted SFT: the one training loop, used for π_θ0, q_φ and the final π_θ (method.md §6).

In:  an HF model folder, a polars frame of examples with columns `prompt` (str), `response` (str),
     `weight` (float) and optional `think_chars` (int: the response's first think_chars characters are the
     think span), and a `TrainConfig`.
Out: an HF folder at `out_dir` (safetensors + tokenizer + chat template, loadable by transformers and vLLM),
     `out_dir/train_metrics.json` (the completion marker) and the same metrics as the return value.

Loss. Token t of example i costs w_it · CE_it over response tokens only; each optimizer step's sum is
divided by the step's normaliser (`dr_sft` or `token_mean`), exactly over the whole step, whatever the
micro-batching and the number of processes. trainers/batches.py turns the examples into tokens, per-token
weights, steps and packed micro-batches, and defines the normalisers; trainers/model.py loads the model
(attention kernel, precision) and computes a micro-batch's loss and the lr of a step.

Checkpoints (trainers/checkpoint.py). Every cfg.save_steps optimizer steps (0: each epoch end) and after
cfg.save_minutes of training since the last one, so a killed run keeps its work. A stop request
(variational.shutdown: SIGTERM/SIGINT) is polled at every micro-batch boundary: the partial step is
abandoned, a checkpoint of the last complete step is written and StopRequested is raised. The lr is a pure
function of the step and the data order of (seed, epoch), so the step is the whole schedule state: a new
`train` call on the same out_dir resumes from the last checkpoint and ends with the same weights.

Processes (trainers/distributed.py). One loop for 1 and N processes. Under torchrun (trainers/launch.py
starts it from the fine-tune stages when num_processes > 1; by hand:
    torchrun --standalone --nproc_per_node 8 -m trainers.sft \\
        --model MODEL_DIR --data train.parquet --out OUT_DIR --config configs/full-17k.yaml --section final
) the model is sharded with FSDP2 `fully_shard` (NCCL on GPU, gloo on CPU). Every process tokenises the
whole set and plans the same steps; process r takes micro-batches r, r+W, ... of each step (padded with
empty micro-batches so all run the same number of forward/backward passes). FSDP2 averages gradients over
processes, so each process scales its loss by W; the result equals one process on the same global batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from trainers import checkpoint, distributed, model
from trainers.batches import (
    Example,
    TrainingSet,
    collate,
    normaliser,
    pad_example,
    shard_step,
    training_set,
)
from trainers.checkpoint import CHECKPOINTS, checkpoints
from trainers.model import lr_at, micro_batch_loss
from variational import shutdown
from variational.config import TrainConfig

# Example, collate, micro_batch_loss: bench/gpu_check.py imports them from here
__all__ = ["CHECKPOINTS", "METRICS", "Example", "checkpoints", "collate", "micro_batch_loss", "train"]
METRICS = "train_metrics.json"
logger = logging.getLogger(__name__)


def train(
    model_dir: str | Path,
    examples: pl.DataFrame,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    progress: bool = True,
    packed: bool = True,
    stop_after: int | None = None,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> dict:
    """Weighted SFT of `model_dir` on `examples` -> HF folder `out_dir`; returns the metrics.

    Resumes from `out_dir/checkpoints` and returns the saved metrics when `out_dir` is already complete.
    `packed=False` pads one example per row instead (for comparison); `stop_after=N` stops after step N
    without saving the final model, as a crash would (for tests). Raises shutdown.StopRequested after
    checkpointing when a stop is requested. Under torchrun every process calls this."""
    out_dir = Path(out_dir)
    if (out_dir / METRICS).exists():
        return json.loads((out_dir / METRICS).read_text())
    t_start = time.time()
    run = _setup(model_dir, examples, cfg, out_dir, packed, log)
    if (stopped := _run_steps(run, progress, stop_after)) is not None:
        return stopped
    return _finish(run, t_start)


# ---------------------------------------------------------------- setup: processes, data, model, optimizer
@dataclass
class _Run:
    """What one `train` call's step loop, checkpoints and stop handling share."""

    cfg: TrainConfig
    runtime: distributed.Runtime
    tokenizer: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    save_dtype: torch.dtype  # the final folder's weights are cast to it (the loaded config's dtype)
    data: TrainingSet
    out_dir: Path
    packed: bool
    pad_to: int
    log: logging.Logger | logging.LoggerAdapter
    start: int = 0  # the first step to run: > 0 when resumed
    step_log: list[dict] = field(default_factory=list)
    saved_at: int = 0  # the step of the newest checkpoint (or `start`)
    last_save: float = 0.0  # time.monotonic() of that checkpoint (or of the setup)

    @property
    def save_every(self) -> int:
        return self.cfg.save_steps or math.ceil(len(self.data.kept) / self.cfg.batch_size)


def _setup(
    model_dir: str | Path,
    examples: pl.DataFrame,
    cfg: TrainConfig,
    out_dir: Path,
    packed: bool,
    log: logging.Logger | logging.LoggerAdapter,
) -> _Run:
    """Processes and precision, the tokenised set and its steps, the model and its optimizer, resumed from
    the newest checkpoint in `out_dir` when there is one."""
    from transformers import AutoTokenizer

    runtime = _start(cfg, log)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = training_set(tokenizer, examples, cfg)
    attn = model.attn_implementation(cfg)
    pad_to = model.pad_multiple(attn, packed, cfg.micro_batch_tokens)
    net, optimizer = model.load(model_dir, cfg, runtime, attn)
    save_dtype = getattr(net.config, "dtype", None) or torch.float32
    run = _Run(cfg, runtime, tokenizer, net, optimizer, save_dtype, data, out_dir, packed, pad_to, log)
    if done := checkpoints(out_dir):
        run.start, run.step_log = checkpoint.load(net, optimizer, done[-1])
        if runtime.is_main:
            log.info("sft: resumed from %s (step %d of %d)", done[-1], run.start, len(data.steps))
    run.saved_at, run.last_save = run.start, time.monotonic()
    return run


def _start(cfg: TrainConfig, log: logging.Logger | logging.LoggerAdapter) -> distributed.Runtime:
    """This process's runtime (rank, device, precision), its precision choice logged by process 0."""
    runtime = distributed.start(cfg.mixed_precision)
    if runtime.is_main:
        log.info(
            "sft: %d process(es) on %s, precision %s (%s)",
            runtime.world,
            runtime.device,
            runtime.precision,
            runtime.reason,
        )
        if runtime.precision == "bf16" and distributed.SLOW_BF16_WARNING in runtime.reason:
            log.warning("sft: %s", distributed.SLOW_BF16_WARNING)
    return runtime


# ---------------------------------------------------------------- the step loop
def _run_steps(run: _Run, progress: bool, stop_after: int | None) -> dict | None:
    """Every step from run.start, with its log line and the checkpoints that fall due. Returns the partial
    result when `stop_after` ends the run early, else None."""
    total, main = len(run.data.steps), run.runtime.is_main
    run.model.train()
    bar = tqdm(range(run.start, total), desc="sft", unit="step", disable=not (progress and main))
    for s in bar:
        entry, timed = _step(run, s)
        run.step_log.append(entry)
        lr = entry["lr"]
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        if main and not (progress and sys.stderr.isatty()):
            run.log.info(
                "sft: step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s",
                s + 1, total, entry["loss"], lr, entry["grad_norm"], entry["tokens_per_s"],
            )  # fmt: skip
        if s + 1 < total and ((s + 1) % run.save_every == 0 or timed > 0):
            _save(run, s + 1)
        if stop_after is not None and s + 1 >= stop_after:
            return {"steps": s + 1, "stopped": True, "log": run.step_log}
    return None


def _step(run: _Run, s: int) -> tuple[dict, float]:
    """Optimizer step s: (its log entry, > 0 when any process finds a timed checkpoint due)."""
    t0 = time.perf_counter()
    step = run.data.step(s)
    denom = normaliser(run.cfg.loss_normalizer, step, run.data.avg_len)
    micro = shard_step(step, run.cfg.micro_batch_tokens, run.runtime.world, run.runtime.rank, run.packed)
    lr = lr_at(s, len(run.data.steps), run.cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, n_tok, n_pos = _accumulate_or_stop(run, s, micro, denom)
    grad_norm = distributed.clip_grad_norm(run.model, run.cfg.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    timed = run.cfg.save_minutes > 0 and time.monotonic() - run.last_save >= 60 * run.cfg.save_minutes
    # one collective for the step's totals and the time-based save (process 0's clock need not agree)
    loss_total, n_tok, n_pos, timed = run.runtime.sum([loss_sum, n_tok, n_pos, float(timed)])
    entry = _step_entry(s, loss_total / denom, lr, grad_norm, n_tok, n_pos, time.perf_counter() - t0)
    return entry, timed


def _accumulate(run: _Run, micro: list[list[Example]], denom: float) -> tuple[float, int, int] | None:
    """Forward/backward of this process's micro-batches of one step: (Σ w·CE, tokens, positions), or
    None when a stop was requested at a micro-batch boundary (then nothing of the step is applied)."""
    runtime, pad_id = run.runtime, run.tokenizer.pad_token_id or 0
    loss_sum, n_tok, n_pos = torch.zeros((), device=runtime.device), 0, 0
    for j, mb in enumerate(micro):
        if runtime.any(shutdown.stop_requested()):  # every process must leave at the same boundary
            return None
        # an empty micro-batch (padding for other ranks) runs one pad token with zero weight
        batch = collate(mb or [pad_example(pad_id)], run.packed, pad_id, run.pad_to)
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        distributed.gradient_sync(run.model, runtime, last_micro_batch=j == len(micro) - 1)
        with runtime.autocast():
            wsum, _ = micro_batch_loss(run.model, batch)
        (wsum * (runtime.world / denom)).backward()
        loss_sum += wsum.detach()
        n_tok += sum(len(e.ids) for e in mb)
        n_pos += batch["input_ids"].numel() if mb else 0
    return loss_sum.item(), n_tok, n_pos


# ---------------------------------------------------------------- checkpoints and stop requests
def _save(run: _Run, completed: int) -> None:
    checkpoint.save(
        run.runtime, run.model, run.optimizer, run.tokenizer, run.out_dir, completed, run.step_log
    )
    run.saved_at, run.last_save = completed, time.monotonic()


def _accumulate_or_stop(
    run: _Run, s: int, micro: list[list[Example]], denom: float
) -> tuple[float, int, int]:
    """`_accumulate`; on a stop request, checkpoint the last complete step (s) and raise StopRequested."""
    try:
        sums = _accumulate(run, micro, denom)
    except shutdown.StopRequested:
        # raised inside a forward/backward (a second signal, or no safe point within the grace): the
        # weights and optimizer are still those after step s, but another process may be stuck in a
        # collective, so only a lone process saves them
        if run.runtime.world == 1:
            _stop_at(run, s)
        raise
    if sums is None:  # every process saw the stop at the same micro-batch boundary
        _stop_at(run, s)
        shutdown.check()
        raise shutdown.StopRequested("SIGTERM")  # another process was signalled, not this one
    return sums


def _stop_at(run: _Run, completed: int) -> None:
    """Abandon the partial step and keep the last complete one."""
    run.optimizer.zero_grad(set_to_none=True)
    if completed > run.saved_at:
        _save(run, completed)
    if run.runtime.is_main:
        steps = len(run.data.steps)
        run.log.warning("sft: stopped; resumes from step %d of %d in %s", run.saved_at, steps, run.out_dir)


# ---------------------------------------------------------------- the finished model and its metrics
def _finish(run: _Run, t_start: float) -> dict:
    """The metrics, the final HF folder, then the completion marker (written last, by process 0)."""
    metrics = _metrics(run.step_log, run.data, time.time() - t_start, run.packed)
    checkpoint.save_final(run.runtime, run.model, run.tokenizer, run.out_dir, run.save_dtype)
    if run.runtime.is_main:
        # the completion marker, written last
        (run.out_dir / METRICS).write_text(json.dumps(metrics, indent=1))
        final = metrics["final_loss"]
        run.log.info("sft: %d steps, final loss %.4f -> %s", metrics["steps"], final, run.out_dir)
    run.runtime.barrier()
    return metrics


def _step_entry(
    s: int, loss: float, lr: float, grad_norm: float, n_tok: float, n_pos: float, dt: float
) -> dict:
    return {
        "step": s + 1,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": int(n_tok),
        "tokens_per_s": n_tok / dt,
        "padding_fraction": 1 - n_tok / max(1, n_pos),
    }


def _metrics(log: list[dict], data: TrainingSet, wall: float, packed: bool) -> dict:
    tokens = sum(e["tokens"] for e in log)
    step_time = sum(e["tokens"] / e["tokens_per_s"] for e in log if e["tokens_per_s"])
    return {
        "steps": len(data.steps),
        "examples": len(data.examples),
        "dropped_no_response": len(data.examples) - len(data.kept),
        "truncated": sum(e.truncated for e in data.examples),
        "avg_response_tokens": data.avg_len,
        "tokens": tokens,
        "response_tokens": sum(e.n_response for e in data.kept),
        "tokens_per_s": tokens / step_time if step_time else None,
        "padding_fraction": float(np.mean([e["padding_fraction"] for e in log])) if log else 0.0,
        "packed": packed,
        "loss_curve": [e["loss"] for e in log],
        "final_loss": log[-1]["loss"] if log else None,
        "wall_time_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m trainers.sft` (one process) or `torchrun ... -m trainers.sft` (N): the same loop.

    Exits 143 / 130 after checkpointing on SIGTERM / SIGINT (torchrun forwards its SIGTERM to every
    process), so a rerun of the same command resumes."""
    parser = argparse.ArgumentParser(prog="python -m trainers.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model folder or hub id to start from")
    parser.add_argument("--data", required=True, help="Parquet with prompt, response, weight [, think_chars]")
    parser.add_argument("--out", required=True, help="output folder (resumes when it holds checkpoints)")
    parser.add_argument("--config", help="run config YAML (configs/*.yaml); default: TrainConfig defaults")
    parser.add_argument("--section", default="final", choices=["pi_theta0", "q_phi", "final"])
    parser.add_argument("--train-config", help="a TrainConfig as JSON (trainers/launch.py passes this)")
    parser.add_argument("--set", action="append", default=[], help="override a train field: key=value")
    args = parser.parse_args(argv)
    from variational.config import apply_overrides, load_config

    if args.train_config:
        cfg = TrainConfig.model_validate_json(Path(args.train_config).read_text())
    else:
        cfg = getattr(load_config(args.config), args.section) if args.config else TrainConfig()
    if args.set:
        cfg = TrainConfig.model_validate(apply_overrides(cfg.model_dump(), args.set))
    examples = pl.read_parquet(args.data)
    if "weight" not in examples.columns:
        examples = examples.with_columns(weight=pl.lit(1.0))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s"
        if "WORLD_SIZE" in os.environ
        else "%(asctime)s %(message)s",
        stream=sys.stdout,
    )
    shutdown.install()
    try:
        metrics = train(args.model, examples, cfg, Path(args.out), progress=sys.stderr.isatty())
    except shutdown.StopRequested as stop:
        sys.exit(stop.exit_code)
    finally:
        distributed.close()
    if rank == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "loss_curve"}))  # one line in a log


if __name__ == "__main__":
    main()
