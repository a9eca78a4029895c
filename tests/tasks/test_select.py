"""tasks/select.py: the `train` table for both modes and every answer rule, on literal frames."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import finished_stage

from tasks.select import TRAIN, TRAIN_COLUMNS, origin_counts, select
from variational import templates
from variational.config import RunConfig
from variational.pipeline.runner import run_stage

END = templates.ANSWER_STOP


@pytest.fixture
def tables() -> dict[str, pl.DataFrame]:
    problems = pl.DataFrame(
        {
            "prompt_idx": [0, 1, 2],
            "source": ["numina/0", "ruc/1", "numina/2"],
            "question": ["Q0", "Q1", "Q2"],
            "think_ref": ["ref think 0", "ref think 1", "ref think 2"],
            "solution_ref": ["SOL0", "SOL1", "SOL2"],
        }
    )
    # prompt 0: samples 0, 1 eligible, 1 selected (acc 0.5); prompt 1: ruc fallback, sample 0 selected with
    # accuracy 0; prompt 2: nothing eligible
    weights = pl.DataFrame(
        {
            "prompt_idx": [0, 0, 0, 1, 1, 2],
            "sample_idx": [0, 1, 2, 0, 1, 0],
            "round": [1] * 6,
            "estimator": ["acc"] * 6,
            "accuracy": [0.25, 0.5, 0.0, 0.0, None, 0.0],
            "eligible": [True, True, False, True, True, False],
            "log_rho": [-1.0, -0.5, None, -2.0, -3.0, None],
            "rho_tilde": [0.4, 0.6, None, 0.7, 0.3, None],
            "selected": [False, True, False, True, False, False],
            "question_weight": [2.0, 2.0, 2.0, 1.0, 1.0, 1.0],
        }
    )
    samples = pl.DataFrame(
        {
            "prompt_idx": [0, 0, 0, 1, 1, 2],
            "sample_idx": [0, 1, 2, 0, 1, 0],
            "round": [1] * 6,
            "think": ["t00", "t01", "t02", "t10", "t11", "t20"],
        }
    )
    # (0, 1): rollout 0 wrong, 1 and 2 correct: the first correct is rollout 1; (0, 0): rollout 1 correct
    rollouts = pl.DataFrame(
        {
            "prompt_idx": [0, 0, 0, 0, 0],
            "sample_idx": [1, 1, 1, 0, 0],
            "rollout_idx": [2, 0, 1, 0, 1],
            "text": [
                f"_thought|>\n\n{templates.BEGIN_SOLUTION}late{END}",
                f"_thought|>\n\n{templates.BEGIN_SOLUTION}wrong{END}",
                f"_thought|>\n\n{templates.BEGIN_SOLUTION}first{END}",
                "_thought|>\n\nnope",
                f"_thought|>\n\n{templates.BEGIN_SOLUTION}s0 answer",  # stop string not kept
            ],
        }
    )
    verdicts = pl.DataFrame(
        {
            "prompt_idx": [0, 0, 0, 0, 0],
            "sample_idx": [1, 1, 1, 0, 0],
            "rollout_idx": [2, 0, 1, 0, 1],
            "correct": [True, False, True, False, True],
        }
    )
    return {
        "problems": problems,
        "weights": weights,
        "posterior_samples": samples,
        "rollouts": rollouts,
        "verdicts": verdicts,
    }


def counts(train: pl.DataFrame) -> dict[str, int]:
    return dict(origin_counts(train).select("block", "rows").rows())


def test_mix_acc(tables):
    train = select(**tables, mode="17k-mix", estimator="acc")
    assert train.columns == TRAIN_COLUMNS
    assert train["row"].to_list() == list(range(6))
    assert counts(train) == {"original (-2)": 3, "fallback (-1)": 1, "selected (k>=0)": 2}
    assert train.select("origin", "prompt_idx").rows() == [(-2, 0), (-2, 1), (-2, 2), (-1, 2), (1, 0), (0, 1)]
    assert train["weight"].to_list() == [1.0] * 6
    by = {(r["origin"], r["prompt_idx"]): r for r in train.to_dicts()}
    # originals and the fallback: the Bespoke trace on the π_θ template
    for key, p in [((-2, 0), 0), ((-2, 2), 2), ((-1, 2), 2)]:
        assert by[key]["prompt"] == templates.pi_prompt(f"Q{p}")
        assert by[key]["response"] == templates.pi_response(f"ref think {p}", f"SOL{p}")
        assert by[key]["think_chars"] == len(f"ref think {p}")
    # acc, accuracy > 0: think + `<|end_of` + the FIRST correct rollout (rollout 1, not 2)
    sel = by[(1, 0)]
    assert sel["response"] == f"t01<|end_of_thought|>\n\n{templates.BEGIN_SOLUTION}first{END}"
    assert sel["prompt"] == templates.pi_prompt("Q0")
    assert sel["think_chars"] == 3 and sel["response"][3:].startswith(templates.END_OF)
    # ruc fallback under acc (accuracy 0): the reference solution
    assert by[(0, 1)]["response"] == templates.pi_response("t10", "SOL1")


def test_mix_appends_missing_stop_string(tables):
    w = tables["weights"].with_columns(selected=pl.Series([True, False, False, True, False, False]))
    train = select(**{**tables, "weights": w}, mode="17k-mix", estimator="acc")
    resp = train.filter(pl.col("origin") == 0, pl.col("prompt_idx") == 0)["response"].item()
    assert resp == f"t00<|end_of_thought|>\n\n{templates.BEGIN_SOLUTION}s0 answer{END}"


def test_mix_gml_uses_reference_without_rollouts(tables):
    w = tables["weights"].with_columns(estimator=pl.lit("gml"))
    train = select(tables["problems"], w, tables["posterior_samples"], None, None, "17k-mix", "gml")
    assert counts(train) == {"original (-2)": 3, "fallback (-1)": 1, "selected (k>=0)": 2}
    sel = train.filter(pl.col("origin") >= 0)
    assert sel["response"].to_list() == [
        templates.pi_response("t01", "SOL0"),
        templates.pi_response("t10", "SOL1"),
    ]
    assert sel["think_chars"].to_list() == [3, 3]


def test_all_k_weights(tables):
    train = select(**tables, mode="all-k", estimator="acc")
    assert counts(train) == {"original (-2)": 0, "fallback (-1)": 0, "selected (k>=0)": 4}
    assert train.select("prompt_idx", "origin").rows() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # weight = ρ̃ × question_weight: prompt 0 sums to 2, prompt 1 to 1
    sums = dict(train.group_by("prompt_idx").agg(pl.col("weight").sum()).rows())
    assert sums == pytest.approx({0: 2.0, 1: 1.0})
    assert train["weight"].to_list() == pytest.approx([0.8, 1.2, 0.7, 0.3])
    r = train.to_dicts()
    assert r[0]["response"].endswith(f"s0 answer{END}")  # acc > 0: rollout
    assert r[3]["response"] == templates.pi_response("t11", "SOL1")  # accuracy null: reference
    # without a question_weight column the weights are ρ̃ and sum to 1 per question
    plain = select(
        **{**tables, "weights": tables["weights"].drop("question_weight")}, mode="all-k", estimator="acc"
    )
    assert dict(plain.group_by("prompt_idx").agg(pl.col("weight").sum()).rows()) == pytest.approx(
        {0: 1.0, 1: 1.0}
    )


def test_errors_name_the_problem(tables):
    with pytest.raises(ValueError, match="17k-mix"):
        select(**tables, mode="top-1", estimator="acc")
    with pytest.raises(ValueError, match="estimator"):
        select(**tables, mode="17k-mix", estimator="gml")  # weights were computed with acc
    with pytest.raises(ValueError, match="rollouts and verdicts"):
        select(**{**tables, "rollouts": None}, mode="17k-mix", estimator="acc")
    no_correct = tables["verdicts"].with_columns(correct=pl.lit(False))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        select(**{**tables, "verdicts": no_correct}, mode="17k-mix", estimator="acc")
    lost = tables["posterior_samples"].filter(pl.col("sample_idx") != 1)
    with pytest.raises(ValueError, match="no think"):
        select(**{**tables, "posterior_samples": lost}, mode="17k-mix", estimator="acc")
    two_rounds = pl.concat([tables["weights"], tables["weights"].with_columns(round=pl.lit(2, pl.Int64))])
    with pytest.raises(ValueError, match="rounds"):
        select(**{**tables, "weights": two_rounds}, mode="17k-mix", estimator="acc")


def test_select_task(tables, tmp_path: Path):
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m", data_root=str(tmp_path)).model_dump()
    upstream = {name: finished_stage(tmp_path, "t", name, df) for name, df in tables.items()}
    manifest = run_stage(TRAIN, cfg, upstream)
    assert manifest["rows"] == 6
    assert run_stage(TRAIN, cfg, upstream) == manifest  # reused, not recomputed
