"""tasks/score.py: row layout of `logps`, one shared think tokenisation, sums equal naive scoring of the strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import finished_stage
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks import score as score_mod
from tasks.score import PI, Q, score, score_requests
from variational import templates
from variational.config import RunConfig, ScoreConfig
from variational.engines.scoring import load_scorer
from variational.pipeline.fingerprint import stage_fingerprint
from variational.pipeline.runner import run_stage

PROBLEMS = pl.DataFrame(
    {
        "prompt_idx": [0, 1],
        "question": ["What is 1+1?", "Name a prime larger than 10."],
        "solution_ref": ["The answer is \\boxed{2}.", "\\boxed{11}"],
        "source": ["numina/0", "numina/1"],
    }
)
SAMPLES = pl.DataFrame(
    {
        "prompt_idx": [1, 0, 0],
        "sample_idx": [0, 0, 1],
        "round": [1, 1, 1],
        "think": ["Primes: 11, 13.", "1 plus 1 is 2, clearly, since counting gives two.", ""],
    }
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[torch.nn.Module, object]:
    return load_scorer(tiny_model_dir, device="cpu")


def naive_sum(model_dir: Path, ctx: list[int], cont: list[int]) -> float:
    """Unpacked, eager, full-vocabulary log_softmax: sum of log p(cont | ctx)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    ids = ctx + cont
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    pos = torch.arange(len(ctx) - 1, len(ids) - 1)
    return float(logp[pos, torch.tensor(cont)].sum())


def test_score_layout_and_values(tiny_model_dir: Path, tiny: tuple) -> None:
    model, tok = tiny
    cfg = ScoreConfig(token_budget=256, vocab_chunk=16)
    out = score(PROBLEMS, SAMPLES, {PI: model, Q: model}, tok, cfg, "PB", progress=False)
    assert out.columns == list(score_mod.LOGPS_SCHEMA)
    assert out.height == 3 * SAMPLES.height
    assert out.select("model", "span").unique().sort(["model", "span"]).rows() == [
        (PI, "answer"),
        (PI, "think"),
        (Q, "think"),
    ]
    assert out.group_by(["prompt_idx", "sample_idx", "round", "model", "span"]).len()["len"].max() == 1
    think = out.filter(pl.col("span") == "think").pivot(
        "model", index=["prompt_idx", "sample_idx"], values="n_tokens"
    )
    assert (think[PI] == think[Q]).all()  # the same think ids for both models
    assert not out["truncated"].any()
    assert out["token_logps"].list.len().to_list() == out["n_tokens"].to_list()

    # the ids are the strings of the templates: prompt, think + `<|end_of`, reference answer
    tk = AutoTokenizer.from_pretrained(tiny_model_dir)
    prob, sample = PROBLEMS.row(0, named=True), SAMPLES.row(1, named=True)
    req = score_requests(PROBLEMS, SAMPLES, tok, "PB").row(1, named=True)
    assert (req["prompt_idx"], req["sample_idx"]) == (0, 0)
    assert tk.decode(req["pi_ids"]) == templates.pi_prompt(prob["question"])
    assert tk.decode(req["think_ids"]) == sample["think"] + templates.END_OF
    assert tk.decode(req["answer_ids"]) == templates.reference_answer(prob["solution_ref"])
    assert tk.decode(req["q_ids"]) == templates.posterior_prompt(prob["question"], prob["solution_ref"], "PB")

    # pi_theta0: think + answer scored as one continuation, split; q_phi: think after the hinted prompt
    key = (pl.col("prompt_idx") == 0) & (pl.col("sample_idx") == 0)
    pi = out.filter(key, pl.col("model") == PI)
    ref_pi = naive_sum(tiny_model_dir, req["pi_ids"], req["think_ids"] + req["answer_ids"])
    assert abs(pi["logp_sum"].sum() - ref_pi) < 1e-3
    assert pi.filter(pl.col("span") == "think")["n_tokens"][0] == len(req["think_ids"])
    assert pi.filter(pl.col("span") == "answer")["n_tokens"][0] == len(req["answer_ids"])
    qrow = out.filter(key, pl.col("model") == Q).row(0, named=True)
    ref_q = naive_sum(tiny_model_dir, req["q_ids"], req["think_ids"])
    assert abs(qrow["logp_sum"] - ref_q) < 1e-3
    assert abs(qrow["logp_mean"] - ref_q / len(req["think_ids"])) < 1e-4
    assert np.isclose(sum(qrow["token_logps"]), qrow["logp_sum"], atol=1e-4)


def test_truncation_caps_context(tiny: tuple) -> None:
    model, tok = tiny
    req = score_requests(PROBLEMS, SAMPLES, tok, "PA")
    cap = len(req["pi_ids"][1]) + 5  # room for 5 think tokens of the long think under pi_theta0
    out = score(
        PROBLEMS, SAMPLES, {PI: model, Q: model}, tok, ScoreConfig(max_length=cap), "PA", progress=False
    )
    pi = out.filter(pl.col("prompt_idx") == 0, pl.col("sample_idx") == 0, pl.col("model") == PI).sort("span")
    assert pi["span"].to_list() == ["answer", "think"]
    assert pi["n_tokens"].to_list() == [0, 5]
    assert pi["truncated"].to_list() == [True, True]
    assert pi["logp_mean"][0] is None and pi["logp_sum"][0] == 0.0


def test_missing_problem_is_named(tiny: tuple) -> None:
    _, tok = tiny
    with pytest.raises(ValueError, match=r"prompt_idx \[7\]"):
        score_requests(PROBLEMS, SAMPLES.with_columns(prompt_idx=pl.lit(7)), tok, "PB")


def test_fingerprint_reads_score_config_and_models() -> None:
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m").model_dump(mode="json")
    up = {k: {"fingerprint": k} for k in score_mod.LOGPS.inputs}

    def fp_of(cfg: dict, up: dict) -> str:
        return stage_fingerprint(score_mod.LOGPS, cfg, up)

    fp = fp_of(cfg, up)
    assert fp == fp_of(json.loads(json.dumps(cfg)), up)
    assert fp != fp_of(cfg | {"score": cfg["score"] | {"max_length": 100}}, up)
    assert fp != fp_of(cfg | {"posterior_template": "PA"}, up)
    assert fp != fp_of(cfg, up | {Q: {"fingerprint": "other"}})
    assert fp == fp_of(cfg | {"K": 3}, up)  # a field the stage does not read


def test_score_task_writes_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = RunConfig(
        name="t", base_model="embedded:smollm2-135m", data_root=str(tmp_path), score=ScoreConfig(shard_size=2)
    ).model_dump(mode="json")
    up = {}
    for name, df in (("problems", PROBLEMS), ("posterior_samples", SAMPLES)):
        up[name] = finished_stage(tmp_path, "t", name, df)
    for name in (PI, Q):
        up[name] = {"fingerprint": name, "model_dir": str(tiny_model_dir)}
    manifest = run_stage(score_mod.LOGPS, cfg, up, 1)
    assert manifest["rows"] == 9 and manifest["shards"] == 2
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / manifest["path"]).glob("part-*")}
    again = run_stage(score_mod.LOGPS, cfg, up, 1)
    assert again == manifest  # reused: the same manifest, no shard rewritten
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
