"""trainers/batches.py: tokens and per-token weights, the step plan, packing into micro-batches, the row
layout `collate` builds and the loss normalisers (no model: tests/trainers/test_model.py runs the losses)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from trainers import batches
from trainers.batches import IGNORE, Example
from variational import templates
from variational.config import TrainConfig

PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_tokenize_boundary_truncation_and_think_weights(tok) -> None:
    cfg = TrainConfig(max_length=16, think_weight=0.5, answer_weight=2.0)
    think, solution = "Let me think.", "42"
    df = pl.DataFrame(
        {
            "prompt": [PROMPT],
            "response": [templates.pi_response(think, solution)],
            "weight": [3.0],
            "think_chars": [len(think)],
        }
    )
    cfg_long = cfg.model_copy(update={"max_length": 4096})
    (ex,) = batches.tokenize_examples(tok, df, cfg_long)
    p = tok(PROMPT, add_special_tokens=False)["input_ids"]
    r = tok(df["response"][0], add_special_tokens=False)["input_ids"]
    assert ex.ids == p + r and ex.n_prompt == len(p) and not ex.truncated
    n_think = len(tok(think, add_special_tokens=False)["input_ids"])
    assert ex.weights[:n_think] == [1.5] * n_think and set(ex.weights[n_think:]) == {6.0}
    (short,) = batches.tokenize_examples(tok, df, cfg)
    assert short.truncated and len(short.ids) == 16 and short.ids == (p + r)[:16]
    with pytest.raises(ValueError, match="think_chars"):
        batches.tokenize_examples(tok, df.drop("think_chars"), cfg)


def test_training_set_drops_examples_without_a_response_token(tok) -> None:
    n_prompt = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    long_prompt = PROMPT.replace("2+2", "2+2 " * 40)
    response = "Four, of course."
    df = pl.DataFrame({"prompt": [PROMPT, long_prompt], "response": [response] * 2, "weight": [1.0, 1.0]})
    data = batches.training_set(tok, df, TrainConfig(max_length=n_prompt + 2, batch_size=4, epochs=1))
    assert len(data.examples) == 2 and data.kept == data.examples[:1]  # the long prompt leaves no room
    assert data.avg_len == 2.0 and data.steps == [[0]] and data.step(0) == data.kept
    with pytest.raises(ValueError, match="no example has a response token"):
        batches.training_set(tok, df.tail(1), TrainConfig(max_length=n_prompt + 2))


def test_plan_steps_and_packing() -> None:
    cfg = TrainConfig(batch_size=4, epochs=1.5, seed=7)
    plan = batches.plan_steps(10, cfg)
    assert [len(s) for s in plan] == [4, 4, 2, 4, 4]  # 3 steps per epoch, 1.5 epochs -> ceil(4.5)
    assert sorted(i for s in plan[:3] for i in s) == list(range(10))
    assert plan == batches.plan_steps(10, cfg) and plan[:3] != plan[3:] + [[]]
    assert plan[:3] != batches.plan_steps(10, cfg.model_copy(update={"seed": 8}))[:3]
    assert batches.pack([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    exs = [Example([1] * n, 1, [1.0] * (n - 1), False) for n in (5, 5, 5)]
    shards = [batches.shard_step(exs, 10, 2, r, packed=True) for r in range(2)]
    assert [len(s) for s in shards] == [1, 1] and shards[1][0] == [exs[2]]
    assert [len(m) for m in batches.shard_step(exs, 10, 4, 3, packed=True)] == [0]  # empty pad micro-batch


def test_collate_layout_and_normalisers() -> None:
    a, b = Example([1, 2, 3, 4], 2, [0.5, 0.5], False), Example([5, 6, 7], 1, [2.0, 2.0], False)
    packed = batches.collate([a, b], pad_to=8)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]  # the pad tail is its own segment
    # logits at t predict token t+1: a's response (3, 4) is scored at 1, 2; b's (6, 7) at 4, 5
    assert packed["labels"].tolist() == [[IGNORE, 3, 4, IGNORE, 6, 7, IGNORE, IGNORE]]
    assert packed["loss_weights"].tolist() == [[0.0, 0.5, 0.5, 0.0, 2.0, 2.0, 0.0, 0.0]]
    assert packed["keep"].tolist() == [1, 2, 4, 5] and "attention_mask" not in packed
    padded = batches.collate([a, b], packed=False, pad_id=9)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 9]]
    assert torch.equal(padded["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    pad = batches.collate([batches.pad_example(0)])
    assert pad["loss_weights"].sum() == 0 and pad["labels"].tolist() == [[0, IGNORE]]
    assert batches.normaliser("dr_sft", [a, b], avg_response_len=3.0) == 6.0
    assert batches.normaliser("token_mean", [a, b], avg_response_len=3.0) == 4.0
    with pytest.raises(ValueError, match="unknown loss_normalizer"):
        batches.normaliser("sum", [a], 1.0)
