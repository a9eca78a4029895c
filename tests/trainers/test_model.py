"""trainers/model.py on the tiny random Llama: the micro-batch loss (token mean, weights, packing isolation,
zero weights), the lr schedule and the attention choice."""

from __future__ import annotations

import copy
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from trainers.batches import collate, normaliser, tokenize_examples
from trainers.model import attn_implementation, lr_at, micro_batch_loss, pad_multiple
from variational.config import TrainConfig

ROWS = [
    ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Two and two make four.", 1.0),
    (
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
        "Blue, like the sky at noon.",
        1.0,
    ),
    ("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", "Hi there!", 1.0),
]


def frame(rows=ROWS) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["prompt", "response", "weight"], orient="row")


@pytest.fixture(scope="module")
def tok_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    return tok, model


@pytest.fixture(scope="module")
def tok_model64(tok_model):
    """The tiny model in float64, for gradient identities: in fp32 the sums of a packed row and of separate
    rows round differently per CPU kernel (up to 4e-5 apart on this AVX2 CPU), in fp64 ~1e-16."""
    tok, model = tok_model
    return tok, copy.deepcopy(model).double()


def grads(model, batches: list[dict], denom: float = 1.0) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        wsum, _ = micro_batch_loss(model, b)
        (wsum / denom).backward()
        total += wsum.item() / denom
    out = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return total, out


# Of the largest gradient entry. Measured on an AVX2 EPYC, 2026-11-29: packed vs alone 2e-16 in fp64 (5.6e-6 in
# fp32, hence fp64 here); weight 3 vs 3x weight 1 5e-8 (transformers runs RMSNorm in fp32 even in an fp64
# model), so 1e-5 leaves 200x for other CPUs' kernels; a wrong packing (examples attending to each other)
# is 0.23, and weight 2 instead of 3 is 0.33.
GRAD_REL_TOL = 1e-5


def grad_gap(a: dict, b: dict) -> float:
    """Largest |a - b| over all parameters, relative to the largest |b| entry (the gradient's scale)."""
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[n] - b[n]).abs().max()) for n in b) / scale


def assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    gap = grad_gap(a, b)
    assert gap <= GRAD_REL_TOL, f"gradients differ by {gap:.2e} of their scale (allowed {GRAD_REL_TOL:.0e})"


def test_token_mean_equals_plain_sft_loss(tok_model) -> None:
    tok, model = tok_model
    cfg = TrainConfig(loss_normalizer="token_mean")
    exs = tokenize_examples(tok, frame(), cfg)
    wsum, n = micro_batch_loss(model, collate(exs))
    ours = wsum / normaliser("token_mean", exs, avg_response_len=123.0)
    # hand-written: each example alone, CE of every response token given its prefix, mean over all tokens
    ces = []
    with torch.no_grad():
        for prompt, response, _ in ROWS:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([p + r])).logits[0]
            ces.append(F.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(r), reduction="none"))
    plain = torch.cat(ces).mean()
    assert n == sum(len(c) for c in ces)
    torch.testing.assert_close(ours.detach(), plain, atol=1e-5, rtol=1e-5)


def test_packed_equals_alone_and_padded(tok_model64) -> None:
    tok, model = tok_model64
    exs = tokenize_examples(tok, frame(), TrainConfig())
    loss_packed, g_packed = grads(model, [collate(exs)])
    loss_alone, g_alone = grads(model, [collate([e]) for e in exs])
    loss_padded, g_padded = grads(model, [collate(exs, packed=False, pad_id=tok.pad_token_id)])
    loss_tail, g_tail = grads(model, [collate(exs, pad_to=64)])  # packed row with a pad segment
    assert loss_tail == pytest.approx(loss_alone, rel=1e-7)
    assert_grads_close(g_tail, g_alone)
    assert loss_packed == pytest.approx(loss_alone, rel=1e-7)
    assert loss_padded == pytest.approx(loss_alone, rel=1e-7)
    assert_grads_close(g_packed, g_alone)
    assert_grads_close(g_padded, g_alone)
    # the checks can fail: the same row read as ONE sequence (positions do not restart, so each example
    # attends to the ones before it) gives another loss and gradients far outside the tolerance (the random
    # model is near-uniform, so the gap is small, but many orders above fp64 rounding)
    b = collate(exs)
    b["position_ids"] = torch.arange(b["input_ids"].shape[1])[None]
    loss_wrong, g_wrong = grads(model, [b])
    assert abs(loss_wrong - loss_alone) > 1e-2
    assert grad_gap(g_wrong, g_alone) > 1e3 * GRAD_REL_TOL


def test_zero_weight_contributes_no_gradient(tok_model64) -> None:
    tok, model = tok_model64
    rows = [ROWS[0], (ROWS[1][0], ROWS[1][1], 0.0)]
    exs = tokenize_examples(tok, frame(rows), TrainConfig())
    _, g_zero = grads(model, [collate([exs[1]])])
    assert all(bool((g == 0).all()) for g in g_zero.values())
    # Dr. SFT divides by L̄·|S|: the weight-0 example only adds to |S| (2 instead of 1)
    avg = 10.0
    _, g_pair = grads(model, [collate(exs)], normaliser("dr_sft", exs, avg))
    _, g_one = grads(model, [collate(exs[:1])], normaliser("dr_sft", exs[:1], avg))
    assert_grads_close({k: 2 * v for k, v in g_pair.items()}, g_one)


def test_weights_scale_gradient(tok_model64) -> None:
    tok, model = tok_model64
    one = tokenize_examples(tok, frame(ROWS[:1]), TrainConfig())
    three = tokenize_examples(tok, frame([(ROWS[0][0], ROWS[0][1], 3.0)]), TrainConfig())
    _, g1 = grads(model, [collate(one)])
    _, g3 = grads(model, [collate(three)])
    assert_grads_close({k: 3 * v for k, v in g1.items()}, g3)
    # and the check can fail: weight 3 is not weight 2
    assert grad_gap({k: 2 * v for k, v in g1.items()}, g3) > 1e3 * GRAD_REL_TOL


def test_lr_warmup_then_cosine() -> None:
    lr = [lr_at(s, 10, TrainConfig(learning_rate=1.0, warmup_ratio=0.2)) for s in range(10)]
    assert (
        lr[0] == 0.5
        and lr[1] == 1.0
        and lr[2] == 1.0
        and lr[-1] < 0.05
        and lr == sorted(lr[:2]) + sorted(lr[2:], reverse=True)
    )
    constant = TrainConfig(learning_rate=1.0, warmup_ratio=0.2, lr_scheduler="constant")
    assert [lr_at(s, 10, constant) for s in range(10)] == [0.5] + [1.0] * 9


def test_attention_choice_and_flex_row_widths() -> None:
    expected = "flex_attention" if torch.cuda.is_available() else "sdpa"
    assert attn_implementation(TrainConfig()) == expected
    assert attn_implementation(TrainConfig(attn_implementation="eager")) == "eager"
    assert pad_multiple("flex_attention", True, 16384) == 4096  # 4 row widths per budget
    assert pad_multiple("flex_attention", True, 1000) == 256  # a multiple of flex's 128-token block
    assert pad_multiple("flex_attention", False, 16384) == pad_multiple("sdpa", True, 16384) == 1
