"""The training loop's data side: examples -> token ids -> optimizer steps -> packed micro-batches.

In:  a polars frame of examples with columns `prompt` (str), `response` (str), `weight` (float) and optional
     `think_chars` (int: the response's first think_chars characters are the think span), the tokenizer and
     a `TrainConfig`.
Out: a `TrainingSet` (the tokenised examples and the example indices of every optimizer step), each step's
     micro-batches for this process (`shard_step`) as tensors (`collate`), and the step's loss denominator
     (`normaliser`). No model here: trainers/sft.py runs the forward/backward.

Tokens and weights. Prompt and response are tokenised separately and concatenated, so the boundary is exact;
the loss covers response tokens only. Token t of example i costs w_it · CE_it with w_it = weight_i, times
cfg.think_weight / cfg.answer_weight on think / answer tokens when set. Per optimizer step S (cfg.batch_size
examples, the last step of an epoch may hold fewer):
- `dr_sft`: Σ_{i∈S} Σ_t w_it CE_it / (L̄ · |S|), L̄ = the average response length in tokens of the whole
  (truncated) training set: Dr. SFT's constant `constant_loss_normalizer` (method.md §6). The sum of the
  step is divided by L̄ times the number of examples in the step, so the loss is a per-token scale that does
  not depend on the batch size and equals `token_mean` when every response has length L̄.
- `token_mean`: Σ w_it CE_it / (number of response tokens in the step): the usual per-batch token mean.
Both are exact over the whole step, whatever the micro-batching and the number of processes.

Packing. A step's examples are packed into micro-batches of at most cfg.micro_batch_tokens tokens, one row
of concatenated examples with position_ids restarting at 0 per example and no attention mask (trainers/sft.py
says how the model turns the restarts into a block-diagonal mask). Under N processes every process plans the
same steps; process r takes micro-batches r, r+W, ... of each step, padded with empty micro-batches so all
run the same number of forward/backward passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from variational.config import TrainConfig

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


@dataclass
class TrainingSet:
    """What every process derives alike from the frame: the examples and the plan of optimizer steps."""

    examples: list[Example]  # every row, in order (for the metrics)
    kept: list[Example]  # those with a response token within max_length: the ones trained on
    avg_len: float  # L̄: the average response length in tokens of `kept` (the Dr. SFT normaliser)
    steps: list[list[int]]  # indices into `kept` of every optimizer step

    def step(self, s: int) -> list[Example]:
        return [self.kept[i] for i in self.steps[s]]


def training_set(tokenizer, examples: pl.DataFrame, cfg: TrainConfig) -> TrainingSet:
    data = tokenize_examples(tokenizer, examples, cfg)
    kept = [e for e in data if e.n_response > 0]
    if not kept:
        raise ValueError(f"no example has a response token within max_length={cfg.max_length}")
    avg_len = sum(e.n_response for e in kept) / len(kept)
    return TrainingSet(data, kept, avg_len, plan_steps(len(kept), cfg))


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


def pad_example(pad_id: int) -> Example:
    """The stand-in for an empty micro-batch (padding for other ranks): one pad token with zero weight."""
    return Example([pad_id] * 2, 1, [0.0], False)


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


def normaliser(kind: str, step: list[Example], avg_response_len: float) -> float:
    """Denominator of one optimizer step's loss (see the module docstring)."""
    if kind == "dr_sft":
        return avg_response_len * len(step)
    if kind == "token_mean":
        return float(max(1, sum(e.n_response for e in step)))
    raise ValueError(f"unknown loss_normalizer {kind!r}; use 'dr_sft' or 'token_mean'")
