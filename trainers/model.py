"""The model under training: its attention kernel, fp32 weights and AdamW, its loss on a micro-batch, the lr.

In:  an HF model folder, a `TrainConfig`, the process's `Runtime` (trainers/distributed.py) and collated
     micro-batches (trainers/batches.py).
Out: the (sharded) model and its optimizer (`load`), Σ w·CE of a micro-batch (`micro_batch_loss`), the lr of a
     step (`lr_at`).

Packing. A packed micro-batch is one row of concatenated examples with position_ids restarting at 0 per
example and no attention mask. transformers 5.x (masking_utils.find_packed_sequence_indices) detects the
restarts and builds a block-diagonal causal mask (dense for sdpa/eager, a BlockMask for flex_attention),
provided use_cache=False (with a cache the detection is skipped). tests/trainers/test_model.py checks losses
and gradients are equal packed and alone (on an H200 too, 2026-11-26: flex_attention and sdpa, fp32 loss
rel. diff 4e-8). attn_implementation "auto" is flex_attention on CUDA (packed rows rounded up to a quarter of
the budget, see `pad_multiple`), sdpa on CPU. Weights and optimizer state are fp32; the forward runs under
bf16 autocast where the device has bf16 (trainers/distributed.py `choose_precision`, logged at start); on
CUDA with gradient checkpointing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers import distributed
from trainers.batches import IGNORE
from variational.config import TrainConfig


def attn_implementation(cfg: TrainConfig) -> str:
    """cfg.attn_implementation; "auto": flex_attention on CUDA, sdpa on CPU."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "flex_attention" if torch.cuda.is_available() else "sdpa"


def pad_multiple(attn: str, packed: bool, budget: int) -> int:
    """transformers compiles flex_attention with dynamic=False: every new row width recompiles, and past
    dynamo's recompile limit (8) it falls back to slow eager flex. Rounding packed rows up to a quarter of
    the budget (multiple of 128, flex's block size) keeps it to 4 widths; full bins lose almost nothing."""
    if attn != "flex_attention" or not packed:
        return 1
    return -(-budget // 4 // 128) * 128


def load(model_dir: str | Path, cfg: TrainConfig, runtime: distributed.Runtime, attn: str):
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


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over ceil(warmup_ratio·total) steps, then cosine to 0 (or constant). `step` counts from 0."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.lr_scheduler == "constant":
        return cfg.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
