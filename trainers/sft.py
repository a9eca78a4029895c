"""Weighted SFT: the one training loop, used for π_θ0, q_φ and the final π_θ (method.md §6).

In:  an HF model folder, a polars frame of examples with columns `prompt` (str), `response` (str),
     `weight` (float) and optional `think_chars` (int: the response's first think_chars characters are the
     think span), and a `TrainConfig`.
Out: an HF folder at `out_dir` (safetensors + tokenizer + chat template, loadable by transformers and vLLM),
     `out_dir/train_metrics.json` (the completion marker) and the same metrics as the return value.

Loss. Prompt and response are tokenised separately and concatenated, so the boundary is exact; the loss
covers response tokens only. Token t of example i costs w_it · CE_it with w_it = weight_i, times
cfg.think_weight / cfg.answer_weight on think / answer tokens when set. Per optimizer step S (cfg.batch_size
examples, the last step of an epoch may hold fewer):
- `dr_sft`: Σ_{i∈S} Σ_t w_it CE_it / (L̄ · |S|), L̄ = the average response length in tokens of the whole
  (truncated) training set: Dr. SFT's constant `constant_loss_normalizer` (method.md §6). The sum of the
  step is divided by L̄ times the number of examples in the step, so the loss is a per-token scale that does
  not depend on the batch size and equals `token_mean` when every response has length L̄.
- `token_mean`: Σ w_it CE_it / (number of response tokens in the step): the usual per-batch token mean.
Both are exact over the whole step, whatever the micro-batching and the number of processes.

Packing. A step's examples are packed into micro-batches of at most cfg.micro_batch_tokens tokens, one row
of concatenated examples with position_ids restarting at 0 per example and no attention mask. transformers
5.x (masking_utils.find_packed_sequence_indices) detects the restarts and builds a block-diagonal causal
mask (dense for sdpa/eager, a BlockMask for flex_attention), provided use_cache=False (with a cache the
detection is skipped). tests/test_sft.py checks losses and gradients are equal packed and alone (on an
H200 too, 2026-11-26: flex_attention and sdpa, fp32 loss rel. diff 4e-8). attn_implementation "auto" is
flex_attention on CUDA (packed rows rounded up to a quarter of the budget, see `_pad_multiple`), sdpa on
CPU. Weights and optimizer state are fp32; the forward runs under bf16 autocast where the device has bf16
(trainers/distributed.py `choose_precision`, logged at start); on CUDA with gradient checkpointing.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainers import checkpoint, distributed
from trainers.checkpoint import CHECKPOINTS, checkpoints
from variational import shutdown
from variational.config import TrainConfig

__all__ = ["CHECKPOINTS", "METRICS", "checkpoints", "train"]
METRICS = "train_metrics.json"
IGNORE = -100
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- examples -> token ids
@dataclass
class Example:
    """One tokenised example: ids = prompt ids + response ids (truncated), per-response-token weights."""

    ids: list[int]
    n_prompt: int
    weights: list[float]  # one per response token in `ids`
    truncated: bool

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.n_prompt


def tokenize_examples(tokenizer, examples: pl.DataFrame, cfg: TrainConfig) -> list[Example]:
    """Frame -> Examples, truncated from the right to cfg.max_length. Rows keep their order."""
    missing = {"prompt", "response", "weight"} - set(examples.columns)
    if missing:
        raise ValueError(f"training examples lack columns {sorted(missing)} (have {examples.columns})")
    split = cfg.think_weight is not None or cfg.answer_weight is not None
    if split and "think_chars" not in examples.columns:
        raise ValueError("think_weight/answer_weight are set but the examples have no `think_chars` column")
    prompts = tokenizer(examples["prompt"].to_list(), add_special_tokens=False)["input_ids"]
    resp = tokenizer(examples["response"].to_list(), add_special_tokens=False, return_offsets_mapping=split)
    think_chars = examples["think_chars"].to_list() if split else [0] * examples.height
    think_w = 1.0 if cfg.think_weight is None else cfg.think_weight
    answer_w = 1.0 if cfg.answer_weight is None else cfg.answer_weight
    out = []
    for i, (p, r, w) in enumerate(zip(prompts, resp["input_ids"], examples["weight"].to_list(), strict=True)):
        if split:  # a token belongs to the think span when it starts inside it
            scale = [think_w if s < (think_chars[i] or 0) else answer_w for s, _ in resp["offset_mapping"][i]]
        else:
            scale = [1.0] * len(r)
        ids = (p + r)[: cfg.max_length]
        n_resp = max(0, len(ids) - len(p))
        out.append(
            Example(
                ids, min(len(p), len(ids)), [float(w) * s for s in scale[:n_resp]], len(p) + len(r) > len(ids)
            )
        )
    return out


# ---------------------------------------------------------------- step plan, packing, collation
def plan_steps(n: int, cfg: TrainConfig) -> list[list[int]]:
    """Example indices of every optimizer step: a seeded shuffle per epoch, cut into cfg.batch_size chunks
    (the last chunk of an epoch may be smaller); fractional epochs keep the first ceil(epochs·steps) steps."""
    per_epoch = math.ceil(n / cfg.batch_size)
    total = math.ceil(cfg.epochs * per_epoch)
    steps: list[list[int]] = []
    for epoch in range(math.ceil(cfg.epochs)):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n).tolist()
        steps += [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return steps[:total]


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Positions of `lengths` grouped into consecutive bins of at most `budget` tokens (a longer one alone)."""
    bins: list[list[int]] = []
    used = budget + 1
    for i, n in enumerate(lengths):
        if used + n > budget:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def collate(
    examples: list[Example], packed: bool = True, pad_id: int = 0, pad_to: int = 1
) -> dict[str, torch.Tensor]:
    """Packed: one row, position_ids restart per example, no attention mask. Padded: one row per example,
    right-padded, with an attention mask. labels = next-token targets (IGNORE outside responses).
    `pad_to`: round the width up to a multiple (the packed tail is a pad segment of its own, positions 0..)."""
    rows = [examples] if packed else [[e] for e in examples]
    width = max(sum(len(e.ids) for e in row) for row in rows)
    width = -(-width // pad_to) * pad_to
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    mask = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.ids)
            ids[r, at : at + n] = torch.tensor(e.ids)
            pos[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = 1
            # logits at position t predict token t+1: response token j (at n_prompt+j) is scored at n_prompt+j-1
            if e.n_response:
                lo = at + e.n_prompt - 1
                labels[r, lo : lo + e.n_response] = torch.tensor(e.ids[e.n_prompt :])
                weights[r, lo : lo + e.n_response] = torch.tensor(e.weights)
            at += n
        if packed:  # the pad tail restarts its positions, so it is a segment no example attends to
            pos[r, at:] = torch.arange(width - at)
    # only positions that predict a response token go through the lm-head (prompts are often most tokens)
    keep = (labels != IGNORE).any(0).nonzero().flatten()
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels, "loss_weights": weights, "keep": keep}
    if not packed:
        batch["attention_mask"] = mask
    return batch


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(Σ w·CE over the batch's response tokens, number of response tokens). Not normalised.

    The lm-head runs only at positions that predict a response token (`logits_to_keep`): prompt positions
    never build a vocab-sized row (measured on CPU, tiny config: the ~300-token system prompt is most of
    every example)."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    labels = batch["labels"]
    keep = (labels != IGNORE).any(0).nonzero().squeeze(1)
    # use_cache=False: with a cache transformers skips the packed-sequence detection (cross-contamination)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    labels, weights = labels[:, keep], batch["loss_weights"][:, keep]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays (tests)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return (ce * weights.flatten()).sum(), int((labels != IGNORE).sum())


def normaliser(kind: str, step: list[Example], avg_response_len: float) -> float:
    """Denominator of one optimizer step's loss (see the module docstring)."""
    if kind == "dr_sft":
        return avg_response_len * len(step)
    if kind == "token_mean":
        return float(max(1, sum(e.n_response for e in step)))
    raise ValueError(f"unknown loss_normalizer {kind!r}; use 'dr_sft' or 'token_mean'")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over ceil(warmup_ratio·total) steps, then cosine to 0 (or constant). `step` counts from 0."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.lr_scheduler == "constant":
        return cfg.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def shard_step(step: list[Example], budget: int, world: int, rank: int, packed: bool) -> list[list[Example]]:
    """This process's micro-batches of one step; every rank gets the same count (empty ones pad)."""
    if packed:
        bins = pack([len(e.ids) for e in step], budget)
    else:  # padded rows: as many examples as fit `budget` at the longest one's width
        bins, cur, width = [], [], 0
        for i, e in enumerate(step):
            w = max(width, len(e.ids))
            if cur and w * (len(cur) + 1) > budget:
                bins.append(cur)
                cur, w = [], len(e.ids)
            cur.append(i)
            width = w
        bins.append(cur)
    micro = [[step[i] for i in b] for b in bins]
    micro += [[] for _ in range(-len(micro) % world)]
    return micro[rank::world]


# ---------------------------------------------------------------- the loop
def _attn(cfg: TrainConfig) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "flex_attention" if torch.cuda.is_available() else "sdpa"


def _pad_multiple(attn: str, packed: bool, budget: int) -> int:
    """transformers compiles flex_attention with dynamic=False: every new row width recompiles, and past
    dynamo's recompile limit (8) it falls back to slow eager flex. Rounding packed rows up to a quarter of
    the budget (multiple of 128, flex's block size) keeps it to 4 widths; full bins lose almost nothing."""
    if attn != "flex_attention" or not packed:
        return 1
    return -(-budget // 4 // 128) * 128


def _load_model(model_dir: str | Path, cfg: TrainConfig, runtime: distributed.Runtime, attn: str):
    """fp32 weights on the runtime's device, sharded when there are several processes, and its AdamW."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.to(runtime.device)
    if runtime.device.type == "cuda":  # long traces: trade compute for activation memory
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = distributed.shard(model, runtime)  # before the optimizer: it must hold the sharded parameters
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on norms and biases, as HF Trainer
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )
    return model, optimizer


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
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / METRICS).exists():
        return json.loads((out_dir / METRICS).read_text())
    t_start = time.time()
    runtime = distributed.start(cfg.mixed_precision)
    main = runtime.is_main
    if main:
        log.info(
            "sft: %d process(es) on %s, precision %s (%s)",
            runtime.world,
            runtime.device,
            runtime.precision,
            runtime.reason,
        )
        if runtime.precision == "bf16" and distributed.SLOW_BF16_WARNING in runtime.reason:
            log.warning("sft: %s", distributed.SLOW_BF16_WARNING)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = tokenize_examples(tokenizer, examples, cfg)
    kept = [e for e in data if e.n_response > 0]
    if not kept:
        raise ValueError(f"no example has a response token within max_length={cfg.max_length}")
    avg_len = sum(e.n_response for e in kept) / len(kept)
    steps = plan_steps(len(kept), cfg)
    attn = _attn(cfg)
    pad_to = _pad_multiple(attn, packed, cfg.micro_batch_tokens)
    model, optimizer = _load_model(model_dir, cfg, runtime, attn)
    save_dtype = getattr(model.config, "dtype", None) or torch.float32

    start, step_log = 0, []
    if done := checkpoints(out_dir):
        start, step_log = checkpoint.load(model, optimizer, done[-1])
        if main:
            log.info("sft: resumed from %s (step %d of %d)", done[-1], start, len(steps))
    save_every = cfg.save_steps or math.ceil(len(kept) / cfg.batch_size)
    saved_at, last_save = start, time.monotonic()
    pad_example = Example([tokenizer.pad_token_id or 0] * 2, 1, [0.0], False)

    def save(completed: int) -> None:
        nonlocal saved_at, last_save
        checkpoint.save(runtime, model, optimizer, tokenizer, out_dir, completed, step_log)
        saved_at, last_save = completed, time.monotonic()

    def accumulate(micro: list[list[Example]], denom: float) -> tuple[float, int, int] | None:
        """Forward/backward of this process's micro-batches of one step: (Σ w·CE, tokens, positions), or
        None when a stop was requested at a micro-batch boundary (then nothing of the step is applied)."""
        loss_sum, n_tok, n_pos = torch.zeros((), device=runtime.device), 0, 0
        for j, mb in enumerate(micro):
            if runtime.any(shutdown.stop_requested()):  # every process must leave at the same boundary
                return None
            # an empty micro-batch (padding for other ranks) runs one pad token with zero weight
            batch = collate(mb or [pad_example], packed, tokenizer.pad_token_id or 0, pad_to)
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            distributed.gradient_sync(model, runtime, last_micro_batch=j == len(micro) - 1)
            with runtime.autocast():
                wsum, _ = micro_batch_loss(model, batch)
            (wsum * (runtime.world / denom)).backward()
            loss_sum += wsum.detach()
            n_tok += sum(len(e.ids) for e in mb)
            n_pos += batch["input_ids"].numel() if mb else 0
        return loss_sum.item(), n_tok, n_pos

    def stop_at(completed: int) -> None:
        """Abandon the partial step and keep the last complete one."""
        optimizer.zero_grad(set_to_none=True)
        if completed > saved_at:
            save(completed)
        if main:
            log.warning("sft: stopped; resumes from step %d of %d in %s", saved_at, len(steps), out_dir)

    model.train()
    bar = tqdm(range(start, len(steps)), desc="sft", unit="step", disable=not (progress and main))
    for s in bar:
        t0 = time.perf_counter()
        step = [kept[i] for i in steps[s]]
        denom = normaliser(cfg.loss_normalizer, step, avg_len)
        micro = shard_step(step, cfg.micro_batch_tokens, runtime.world, runtime.rank, packed)
        lr = lr_at(s, len(steps), cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            sums = accumulate(micro, denom)
        except shutdown.StopRequested:
            # raised inside a forward/backward (a second signal, or no safe point within the grace): the
            # weights and optimizer are still those after step s, but another process may be stuck in a
            # collective, so only a lone process saves them
            if runtime.world == 1:
                stop_at(s)
            raise
        if sums is None:  # every process saw the stop at the same micro-batch boundary
            stop_at(s)
            shutdown.check()
            raise shutdown.StopRequested("SIGTERM")  # another process was signalled, not this one
        loss_sum, n_tok, n_pos = sums
        grad_norm = distributed.clip_grad_norm(model, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timed = cfg.save_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.save_minutes
        # one collective for the step's totals and the time-based save (process 0's clock need not agree)
        loss_total, n_tok, n_pos, timed = runtime.sum([loss_sum, n_tok, n_pos, float(timed)])
        entry = _step_entry(s, loss_total / denom, lr, grad_norm, n_tok, n_pos, time.perf_counter() - t0)
        step_log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        if main and not (progress and sys.stderr.isatty()):
            log.info(
                "sft: step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s",
                s + 1, len(steps), entry["loss"], lr, entry["grad_norm"], entry["tokens_per_s"],
            )  # fmt: skip
        if s + 1 < len(steps) and ((s + 1) % save_every == 0 or timed > 0):
            save(s + 1)
        if stop_after is not None and s + 1 >= stop_after:
            return {"steps": s + 1, "stopped": True, "log": step_log}

    metrics = _metrics(step_log, data, kept, avg_len, len(steps), time.time() - t_start, packed)
    checkpoint.save_final(runtime, model, tokenizer, out_dir, save_dtype)
    if main:
        (out_dir / METRICS).write_text(json.dumps(metrics, indent=1))  # the completion marker, written last
        log.info("sft: %d steps, final loss %.4f -> %s", len(steps), metrics["final_loss"], out_dir)
    runtime.barrier()
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


def _metrics(
    log: list[dict],
    data: list[Example],
    kept: list[Example],
    avg_len: float,
    steps: int,
    wall: float,
    packed: bool,
) -> dict:
    tokens = sum(e["tokens"] for e in log)
    step_time = sum(e["tokens"] / e["tokens_per_s"] for e in log if e["tokens_per_s"])
    return {
        "steps": steps,
        "examples": len(data),
        "dropped_no_response": len(data) - len(kept),
        "truncated": sum(e.truncated for e in data),
        "avg_response_tokens": avg_len,
        "tokens": tokens,
        "response_tokens": sum(e.n_response for e in kept),
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
