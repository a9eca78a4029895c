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
CPU. On CUDA the loop runs bf16 autocast over fp32 weights with gradient checkpointing; on CPU plain fp32.

Checkpoints. `out_dir/checkpoints/step-XXXXX/` every cfg.save_steps steps (0: each epoch end): accelerate's
state (model.safetensors, optimizer, RNG) + config, tokenizer and `trainer_state.json` (step), written to a
temp folder and renamed. The lr is a pure function of the step, so the step is the scheduler state. A new
`train` call on the same out_dir resumes from the last checkpoint with the same data order. Checkpoints are
deleted once the final model is saved. Under FSDP a checkpoint holds sharded weights (not an HF folder).

Multi-GPU (FSDP through accelerate; the same loop runs single-process):
    accelerate launch --config_file configs/accelerate_fsdp.yaml -m trainers.sft \\
        --model MODEL_DIR --data train.parquet --out OUT_DIR --config configs/full-17k.yaml --section final
Every process tokenises the whole set and plans the same steps; process r takes micro-batches r, r+W, ...
of each step (padded with empty micro-batches so all take the same number of forward/backward passes).
Gradients are averaged over processes, so each process scales its loss by W.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from variational.config import TrainConfig

CHECKPOINTS = "checkpoints"
METRICS = "train_metrics.json"
STATE = "trainer_state.json"
IGNORE = -100


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
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
    )
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


# ---------------------------------------------------------------- checkpoints
def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = out_dir / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if (p / STATE).exists()) if root.exists() else []


def save_checkpoint(accelerator, model, tokenizer, out_dir: Path, step: int, log: list[dict]) -> None:
    final = out_dir / CHECKPOINTS / f"step-{step:05d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STATE).write_text(json.dumps({"step": step, "log": log}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out_dir)[:-1]:  # keep only the newest complete one
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- the loop
def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    # `accelerate launch` sets the precision from its config file; a plain run follows cfg.mixed_precision
    # (auto: bf16 autocast on GPU, fp32 on CPU; bf16 on a CPU with AMX measured 1.6x faster per step)
    auto = "bf16" if cuda else "no"
    chosen = auto if cfg.mixed_precision == "auto" else cfg.mixed_precision
    precision = None if "ACCELERATE_MIXED_PRECISION" in os.environ else chosen
    return Accelerator(cpu=not cuda, mixed_precision=precision)


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


def train(
    model_dir: str | Path,
    examples: pl.DataFrame,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    progress: bool = True,
    packed: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Weighted SFT of `model_dir` on `examples` -> HF folder `out_dir`; returns the metrics.

    Resumes from `out_dir/checkpoints` and returns the saved metrics when `out_dir` is already complete.
    `packed=False` pads one example per row instead (for comparison); `stop_after=N` stops after step N
    without saving the final model, as a crash would (for tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / METRICS).exists():
        return json.loads((out_dir / METRICS).read_text())
    t_start = time.time()
    accelerator = _accelerator(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = tokenize_examples(tokenizer, examples, cfg)
    kept = [e for e in data if e.n_response > 0]
    if not kept:
        raise ValueError(f"no example has a response token within max_length={cfg.max_length}")
    avg_len = sum(e.n_response for e in kept) / len(kept)
    steps = plan_steps(len(kept), cfg)
    world, rank = accelerator.num_processes, accelerator.process_index

    attn = _attn(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    pad_to = _pad_multiple(attn, packed, cfg.micro_batch_tokens)
    save_dtype = getattr(model.config, "dtype", None) or torch.float32
    if torch.cuda.is_available():  # long traces: trade compute for activation memory
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on norms and biases, as HF Trainer
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    start, log = 0, []
    if done := checkpoints(out_dir):
        accelerator.load_state(str(done[-1]))
        state = json.loads((done[-1] / STATE).read_text())
        start, log = state["step"], state["log"]
    per_epoch = math.ceil(len(kept) / cfg.batch_size)
    save_every = cfg.save_steps or per_epoch
    ddp = accelerator.distributed_type.value == "MULTI_GPU"

    model.train()
    bar = tqdm(
        range(start, len(steps)),
        desc="sft",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
    )
    bar.update(0)
    for s in bar:
        t0 = time.perf_counter()
        step = [kept[i] for i in steps[s]]
        denom = normaliser(cfg.loss_normalizer, step, avg_len)
        micro = shard_step(step, cfg.micro_batch_tokens, world, rank, packed)
        lr = lr_at(s, len(steps), cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, n_tok, n_pos = torch.zeros((), device=accelerator.device), 0, 0
        for j, mb in enumerate(micro):
            # an empty micro-batch (padding for other ranks) runs one pad token with zero weight
            batch = collate(
                mb or [Example([tokenizer.pad_token_id or 0] * 2, 1, [0.0], False)],
                packed,
                tokenizer.pad_token_id or 0,
                pad_to,
            )
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = (
                contextlib.nullcontext() if (not ddp or j == len(micro) - 1) else accelerator.no_sync(model)
            )
            with sync:
                wsum, _ = micro_batch_loss(model, batch)
                accelerator.backward(wsum * (world / denom))
            loss_sum += wsum.detach()
            n_tok += sum(len(e.ids) for e in mb)
            n_pos += batch["input_ids"].numel() if mb else 0
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(loss_sum, "sum").item() / denom
        stats = torch.tensor([n_tok, n_pos], device=accelerator.device, dtype=torch.float64)
        n_tok, n_pos = accelerator.reduce(stats, "sum").tolist()
        dt = time.perf_counter() - t0
        entry = {
            "step": s + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(n_tok),
            "tokens_per_s": n_tok / dt,
            "padding_fraction": 1 - n_tok / max(1, n_pos),
        }
        log.append(entry)
        bar.set_postfix(
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tok_s=f"{n_tok / dt:.0f}",
            pad=f"{entry['padding_fraction']:.2f}",
        )
        if (s + 1) % save_every == 0 and s + 1 < len(steps):
            save_checkpoint(accelerator, model, tokenizer, out_dir, s + 1, log)
        if stop_after is not None and s + 1 >= stop_after:
            return {"steps": s + 1, "stopped": True, "log": log}

    state_dict = accelerator.get_state_dict(model)
    metrics = _metrics(log, data, kept, avg_len, len(steps), time.time() - t_start, packed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        state_dict = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        accelerator.unwrap_model(model).save_pretrained(
            out_dir, state_dict=state_dict, safe_serialization=True
        )
        tokenizer.save_pretrained(out_dir)
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
        (out_dir / METRICS).write_text(json.dumps(metrics, indent=1))  # the completion marker, written last
    accelerator.wait_for_everyone()
    return metrics


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
    parser = argparse.ArgumentParser(prog="python -m trainers.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model folder or hub id to start from")
    parser.add_argument("--data", required=True, help="Parquet with prompt, response, weight [, think_chars]")
    parser.add_argument("--out", required=True, help="output folder (resumes when it holds checkpoints)")
    parser.add_argument("--config", help="run config YAML (configs/*.yaml); default: TrainConfig defaults")
    parser.add_argument("--section", default="final", choices=["pi_theta0", "q_phi", "final"])
    parser.add_argument("--set", action="append", default=[], help="override a train field: key=value")
    args = parser.parse_args(argv)
    from variational.config import apply_overrides, load_config

    cfg = getattr(load_config(args.config), args.section) if args.config else TrainConfig()
    if args.set:
        cfg = TrainConfig.model_validate(apply_overrides(cfg.model_dump(), args.set))
    examples = pl.read_parquet(args.data)
    if "weight" not in examples.columns:
        examples = examples.with_columns(weight=pl.lit(1.0))
    metrics = train(args.model, examples, cfg, Path(args.out))
    print(json.dumps({k: v for k, v in metrics.items() if k != "loss_curve"}, indent=1))


if __name__ == "__main__":
    main()
