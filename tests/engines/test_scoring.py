"""variational.engines.scoring: packed, chunked scoring equals naive full-vocabulary log_softmax row by row (fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tasks.score import summarize_logps as summarize
from variational import templates
from variational.engines.scoring import (
    VARLEN,
    encode_think,
    load_scorer,
    pack_rows,
    score_continuations,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def naive_model(tiny_model_dir: Path) -> torch.nn.Module:
    # eager attention, unpacked: an implementation independent of the scorer's attention path
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def naive_logps(model: torch.nn.Module, ctx: list[int], cont: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return logp[pos, torch.tensor(cont)].numpy()


def random_rows(vocab: int, shapes: list[tuple[int, int]], seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    ctxs = [rng.integers(0, vocab, c).tolist() for c, _ in shapes]
    conts = [rng.integers(0, vocab, n).tolist() for _, n in shapes]
    return ctxs, conts


# (context, continuation) lengths: 3, 40 and 700 tokens in one batch, plus single-token rows
SHAPES = [(2, 1), (25, 15), (300, 400), (1, 2), (10, 30), (50, 7)]


@pytest.fixture(scope="module")
def rows_and_refs(naive_model: torch.nn.Module) -> tuple[list, list, list[np.ndarray]]:
    ctxs, conts = random_rows(naive_model.config.vocab_size, SHAPES)
    return ctxs, conts, [naive_logps(naive_model, c, y) for c, y in zip(ctxs, conts, strict=True)]


@pytest.mark.parametrize(
    ("attn", "budget", "chunk"),
    [(VARLEN, 4096, 7), (VARLEN, 100, 64), (VARLEN, 16, 1000), ("sdpa", 4096, 7), ("sdpa", 100, 64)],
)
def test_packed_chunked_equals_naive(
    tiny_model_dir: Path, rows_and_refs: tuple, attn: str, budget: int, chunk: int
) -> None:
    model, _ = load_scorer(tiny_model_dir, device="cpu", attn_implementation=attn)
    assert model.dtype == torch.float32 and not model.training
    ctxs, conts, refs = rows_and_refs
    got = score_continuations(model, ctxs, conts, token_budget=budget, chunk=chunk, progress=False)
    assert len(got) == len(SHAPES)
    for cont, arr, ref in zip(conts, got, refs, strict=True):
        assert arr.dtype == np.float32 and arr.shape == (len(cont),)  # order preserved: lengths line up
        assert np.max(np.abs(arr - ref)) < TOL
        assert np.all(arr <= 0)


def test_rows_do_not_attend_across(tiny_model_dir: Path) -> None:
    # the same row scored alone and packed after a long unrelated row must agree exactly up to fp noise
    model, _ = load_scorer(tiny_model_dir, device="cpu")
    ctxs, conts = random_rows(model.config.vocab_size, [(200, 100), (20, 20)], seed=1)
    alone = score_continuations(model, ctxs[1:], conts[1:], token_budget=1000, chunk=16, progress=False)[0]
    packed = score_continuations(model, ctxs, conts, token_budget=1000, chunk=16, progress=False)[1]
    assert np.max(np.abs(alone - packed)) < 1e-5


def test_empty_continuation_and_errors(tiny_model_dir: Path) -> None:
    model, _ = load_scorer(tiny_model_dir, device="cpu")
    out = score_continuations(model, [[1, 2], [3]], [[], [4, 5]], token_budget=64, chunk=8, progress=False)
    assert out[0].shape == (0,) and out[1].shape == (2,)
    with pytest.raises(ValueError, match="row 0: empty context"):
        score_continuations(model, [[]], [[1]], token_budget=64, chunk=8, progress=False)


def test_pack_rows() -> None:
    batches = pack_rows([5, 50, 3, 8, 2], token_budget=10)
    assert batches == [[1], [3], [0, 2, 4]]  # the 50-token row goes alone, longest first
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_encode_think_and_summarize(tiny_model_dir: Path) -> None:
    _, tok = load_scorer(tiny_model_dir, device="cpu")
    ids = encode_think(tok, "Let x = 2.")
    assert tok.decode(ids) == "Let x = 2." + templates.END_OF
    s, m, n = summarize(np.array([-1.0, -3.0], dtype=np.float32))
    assert (s, m, n) == (-4.0, -2.0, 2)
    assert summarize(np.zeros(0, dtype=np.float32)) == (0.0, None, 0)
