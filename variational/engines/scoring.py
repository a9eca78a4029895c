"""Teacher-forced per-token log-probs of given continuations under a transformers causal LM.

In:  a model folder (HF, safetensors + tokenizer); rows of (context ids, continuation ids).
Out: one float32 array per row, log p(continuation_t | context, continuation_<t), in input order.

How (design.md "Engines", method.md §8 points 3, 4, 9):
- rows are PACKED padding-free into one sequence per batch, up to `token_budget` tokens, position_ids restarting
  at 0 per row; rows are sorted by length first so batches are dense, and a row longer than the budget goes alone.
- rows never attend across each other: the default attention `variational_varlen` runs causal SDPA on each
  row's slice (flash kernel on CUDA, no L x L mask). With `attn_implementation="sdpa"|"eager"|"flex_attention"`
  transformers builds the block-causal mask itself from the restarting position_ids
  (`masking_utils.find_packed_sequence_indices`); tests check both against unpacked full-vocab scoring.
- only the backbone runs over all positions; the lm-head + log-softmax run on the continuation positions only,
  `chunk` positions at a time, so at most chunk x vocab fp32 logits exist (the official code materialised
  28k x 152k fp32, ~17 GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from variational import templates

VARLEN = "variational_varlen"


def _varlen_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Causal attention per packed row: q/k/v are (1, heads, T, d); rows are given by `cu_seq_lens_q`
    (CPU tensor, [0, l0, l0+l1, ..., T]) or else found where position_ids restart. Returns (1, T, heads, d)."""
    if kwargs.get("sliding_window"):
        raise ValueError(
            f"{VARLEN} does not implement sliding-window attention; use attn_implementation='sdpa'"
        )
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} expects one packed sequence per batch, got batch size {query.shape[0]}")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        pos = kwargs.get("position_ids")
        starts = [] if pos is None else torch.nonzero(pos.reshape(-1) == 0).reshape(-1).tolist()
        bounds = sorted({0, *starts, query.shape[2]})
    else:
        bounds = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{VARLEN} scores whole sequences: no KV cache (got {key.shape[2]} keys for {query.shape[2]} queries)"
        )
    # no mask + head_dim <= 256: SDPA's flash kernel takes grouped KV heads as they are (torch >= 2.5)
    gqa = key.shape[1] != query.shape[1]
    out = torch.empty_like(query)
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e > s:
            out[:, :, s:e] = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
    return out.transpose(1, 2).contiguous(), None


# A name not in transformers' mask registry: create_causal_mask returns None and our function sees raw q/k/v.
AttentionInterface.register(VARLEN, _varlen_sdpa)


def load_scorer(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = VARLEN,
    compile: bool | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) for scoring: fp32 on CPU, bf16 on CUDA unless `dtype` says otherwise; eval mode.
    `compile` (None: on CUDA) compiles each decoder layer and the chunked head, see `compile_for_scoring`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation
        )
    except OSError as err:
        raise OSError(f"cannot load a scoring model from {model_dir!r}: {err}") from err
    model.to(device).eval().requires_grad_(False)
    if compile if compile is not None else device.type == "cuda":
        compile_for_scoring(model)
    return model, tokenizer


def compile_for_scoring(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer (one graph reused by all layers; dynamic shapes, so a new packed
    length does not recompile) and the chunked head. Measured on an H200 at Qwen3-4B shape, 16 x 1024 tokens
    packed: eager 45k tok/s (46% of the 2·N·T floor), per-layer compile 63k tok/s (65%), ~12 s of compiling
    (bench/gpu_probe.py). The norms/rotary/SiLU between the matmuls are what eager mode loses."""
    backbone = _backbone(model)
    for layer in backbone.layers:
        layer.compile(dynamic=True)
    backbone.norm.compile(dynamic=True)
    model._variational_head = torch.compile(_head_logps, dynamic=True)


def _head_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """log p(target) for a chunk of positions: the chunk x vocab logits are the only vocab-sized tensor."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def encode_think(tokenizer: PreTrainedTokenizerBase, think: str) -> list[int]:
    """THE tokenisation of a think span, shared by both models (method.md §1, §8.9): the think text (already
    cut at the first `<|end_of`) with `<|end_of` re-appended. The sample stage's think_len is its length."""
    return tokenizer(think + templates.END_OF, add_special_tokens=False)["input_ids"]


def pack_rows(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Row indices grouped into batches of at most `token_budget` tokens, longest rows first; a row longer
    than the budget is a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


@torch.inference_mode()
def _score_batch(
    model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], chunk: int
) -> list[np.ndarray]:
    device = model.device
    ids: list[int] = []
    positions: list[int] = []
    gather: list[int] = []  # packed position whose hidden state predicts each continuation token
    targets: list[int] = []
    bounds = [0]
    for ctx, cont in rows:
        seq = (ctx + cont)[:-1]  # the last token predicts nothing we need
        start = len(ids)
        ids += seq
        positions += range(len(seq))
        gather += range(start + len(ctx) - 1, start + len(seq))
        targets += cont
        bounds.append(len(ids))
    kwargs: dict[str, object] = {}
    if model.config._attn_implementation == VARLEN:
        kwargs["cu_seq_lens_q"] = torch.tensor(bounds)  # CPU: read by _varlen_sdpa, no device sync
    hidden = _backbone(model)(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        use_cache=False,
        **kwargs,
    ).last_hidden_state[0]
    head = model.get_output_embeddings()
    gather_t = torch.tensor(gather, device=device)
    target_t = torch.tensor(targets, device=device)
    out = torch.empty(len(gather), dtype=torch.float32, device=device)
    head_logps = getattr(model, "_variational_head", _head_logps)
    for s in range(0, len(gather), chunk):
        e = min(s + chunk, len(gather))
        out[s:e] = head_logps(hidden[gather_t[s:e]], head.weight, head.bias, target_t[s:e])
    flat = out.cpu().numpy()
    result, k = [], 0
    for _, cont in rows:
        result.append(flat[k : k + len(cont)].copy())
        k += len(cont)
    return result


def score_continuations(
    model: torch.nn.Module,
    contexts: list[list[int]],
    continuations: list[list[int]],
    *,
    token_budget: int,
    chunk: int,
    progress: bool = True,
) -> list[np.ndarray]:
    """log p(continuation | context) per token, one float32 array per row (length len(continuation)), in input
    order. Every context needs at least one token (it predicts the first continuation token)."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported by the chunked scorer")
    lengths = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if not ctx and cont:
            raise ValueError(f"row {i}: empty context, nothing predicts the first continuation token")
        lengths.append(len(ctx) + len(cont) - 1)
    results: list[np.ndarray | None] = [None] * len(contexts)
    live = [i for i in range(len(contexts)) if continuations[i]]
    for i in set(range(len(contexts))) - set(live):
        results[i] = np.zeros(0, dtype=np.float32)
    bar = tqdm(total=sum(lengths[i] for i in live), unit="tok", desc="score", disable=not progress)
    for batch in pack_rows([lengths[i] for i in live], token_budget):
        rows = [live[j] for j in batch]
        scored = _score_batch(model, [(list(contexts[i]), list(continuations[i])) for i in rows], chunk)
        for i, arr in zip(rows, scored, strict=True):
            results[i] = arr
        bar.update(sum(lengths[i] for i in rows))
    bar.close()
    return results  # type: ignore[return-value]
