"""tasks/weights.py: the estimator contract on hand-computed frames, the plain-loop reference, the stage core."""

from __future__ import annotations

import math
import random
from pathlib import Path

import polars as pl
import pytest
from conftest import finished_stage

from tasks.weights import (
    CANDIDATE_COLUMNS,
    OUTPUT_COLUMNS,
    WEIGHTS,
    effective_sample_size,
    question_weights,
    score_candidates,
    score_candidates_reference,
    think_log_ratio,
    weights,
)
from variational.config import RunConfig, WeightsConfig
from variational.pipeline.runner import run_stage

CAND_SCHEMA = {
    "prompt_idx": pl.Int64,
    "sample_idx": pl.Int64,
    "source": pl.String,
    "think_len": pl.Int64,
    "log_ratio_mean": pl.Float64,
    "accuracy": pl.Float64,
    "answer_logp_mean": pl.Float64,
    "answer_logp_sum": pl.Float64,
}


def cand(
    p: int,
    s: int | None,
    ratio: float | None,
    acc: float | None = None,
    amean: float | None = None,
    asum: float | None = None,
    think_len: int | None = 100,
    source: str | None = "numina/1",
) -> dict:
    return dict(
        prompt_idx=p,
        sample_idx=s,
        source=source,
        think_len=think_len,
        log_ratio_mean=ratio,
        accuracy=acc,
        answer_logp_mean=amean,
        answer_logp_sum=asum,
    )


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=CAND_SCHEMA)


def col(df: pl.DataFrame, name: str) -> list:
    return df[name].to_list()


# ------------------------------------------------------------------ hand-computed estimators -----------------
def test_acc_hand_computed():
    rows = [
        cand(0, 0, -0.1, acc=0.5),  # log ρ = ln 0.5 − 0.1 = −0.79315
        cand(0, 1, -0.2, acc=1.0),  # log ρ = −0.2 (largest)
        cand(0, 2, 5.0, acc=0.0),  # accuracy 0: not eligible despite the large ratio
        cand(0, 3, 5.0, acc=1.0, think_len=28000),  # think_len == max: not eligible
        cand(0, 4, 5.0, acc=None),  # no verdicts: not eligible
        cand(0, 5, -3.0, acc=0.25, think_len=27999),  # max − 1: eligible, log ρ = ln 0.25 − 3 = −4.38629
    ]
    out = score_candidates(frame(rows), "acc")
    assert col(out, "eligible") == [True, True, False, False, False, True]
    assert col(out, "selected") == [False, True, False, False, False, False]
    lr = col(out, "log_rho")
    assert lr[0] == pytest.approx(-0.7931471805599453, abs=1e-12)
    assert lr[1] == pytest.approx(-0.2, abs=1e-12)
    assert lr[2] is None and lr[3] is None and lr[4] is None
    assert lr[5] == pytest.approx(-4.386294361119891, abs=1e-12)
    # ρ = 0.5·e^−0.1 = 0.4524187, e^−0.2 = 0.8187308, 0.25·e^−3 = 0.0124468; total 1.2835963
    rt = col(out, "rho_tilde")
    assert rt[0] == pytest.approx(0.4524187 / 1.2835963, abs=1e-6)
    assert rt[1] == pytest.approx(0.8187308 / 1.2835963, abs=1e-6)
    assert rt[5] == pytest.approx(0.0124468 / 1.2835963, abs=1e-6)
    assert rt[2] is None and rt[3] is None and rt[4] is None
    assert out.schema["log_rho"] == pl.Float64 and out.schema["rho_tilde"] == pl.Float64
    assert out.schema["eligible"] == pl.Boolean and out.schema["selected"] == pl.Boolean


def test_gml_and_likelihood_hand_computed():
    rows = [
        cand(7, 0, -0.5, acc=0.0, amean=-0.2, asum=-10.0),  # gml −0.7, L −10.5
        cand(7, 1, -0.1, acc=0.0, amean=-0.9, asum=-2.0),  # gml −1.0, L −2.1
        cand(7, 2, 0.0, amean=-0.1, asum=-0.1, think_len=28000),  # too long
    ]
    gml = score_candidates(frame(rows), "gml")
    assert col(gml, "eligible") == [True, True, False]
    assert col(gml, "log_rho")[:2] == pytest.approx([-0.7, -1.0], abs=1e-12)
    assert col(gml, "selected") == [True, False, False]
    # ρ̃ = 1/(1+e^−0.3) = 0.5744425, e^−0.3/(1+e^−0.3) = 0.4255575
    assert col(gml, "rho_tilde")[:2] == pytest.approx([0.5744425, 0.4255575], abs=1e-6)

    lik = score_candidates(frame(rows), "likelihood")
    assert col(lik, "log_rho")[:2] == pytest.approx([-10.5, -2.1], abs=1e-12)
    assert col(lik, "selected") == [False, True, False]
    # ρ̃_0 = e^−8.4/(1+e^−8.4) = 0.00022487/1.00022487 = 0.00022482
    assert col(lik, "rho_tilde")[0] == pytest.approx(0.00022482, rel=1e-4)


def test_tie_goes_to_lowest_sample_idx_whatever_the_row_order():
    rows = [cand(0, 3, -0.2, acc=0.5), cand(0, 1, -0.2, acc=0.5), cand(0, 2, -0.2, acc=0.5)]
    out = score_candidates(frame(rows), "acc")
    assert col(out, "sample_idx") == [3, 1, 2]  # input order kept
    assert col(out, "selected") == [False, True, False]
    assert col(out, "rho_tilde") == pytest.approx([1 / 3] * 3)


def test_nulls_and_nan_are_not_eligible_under_gml():
    rows = [
        cand(0, 0, None, amean=-1.0),
        cand(0, 1, float("nan"), amean=-1.0),
        cand(0, 2, -1.0, amean=None),
        cand(0, 3, -1.0, amean=float("-inf")),
        cand(0, 4, -1.0, amean=-3.0, think_len=None),
        cand(0, 5, -2.0, amean=-2.0),  # the only usable one: −4.0
    ]
    out = score_candidates(frame(rows), "gml")
    assert col(out, "eligible") == [False] * 5 + [True]
    assert col(out, "selected") == [False] * 5 + [True]
    assert col(out, "log_rho") == [None] * 5 + [-4.0]
    assert col(out, "rho_tilde") == [None] * 5 + [1.0]


def test_ruc_fallback_only_for_ruc_prompts_without_eligible_sample():
    rows = [
        # prompt 0, ruc, nothing correct: GML rule (eligible iff short), log ρ = answer_logp_mean + ratio
        cand(0, 0, -0.1, acc=0.0, amean=-0.5, source="ruc/12"),  # −0.6
        cand(0, 1, -0.1, acc=None, amean=-0.2, source="ruc/12"),  # −0.3: selected
        cand(0, 2, 9.0, acc=0.0, amean=0.0, source="ruc/12", think_len=28000),  # too long even for GML
        # prompt 1, not ruc, nothing correct: no fallback, nothing selected
        cand(1, 0, -0.1, acc=0.0, amean=-0.5, source="numina/3"),
        cand(1, 1, -0.1, acc=0.0, amean=-0.2, source="numina/3"),
        # prompt 2, ruc with one correct sample: the acc rule stands, no fallback for its siblings
        cand(2, 0, -0.4, acc=0.125, amean=-0.5, source="ruc/5"),  # ln 0.125 − 0.4 = −2.479442
        cand(2, 1, 3.0, acc=0.0, amean=0.0, source="ruc/5"),
        # prompt 3, ruc whose only correct sample is too long: no eligible sample, so the fallback applies
        cand(3, 0, -0.1, acc=1.0, amean=-0.5, source="ruc", think_len=30000),
        cand(3, 1, -0.3, acc=0.0, amean=-0.5, source="ruc"),  # −0.8
        # prompt 4, null source: not ruc
        cand(4, 0, -0.1, acc=0.0, amean=-0.5, source=None),
    ]
    out = score_candidates(frame(rows), "acc")
    assert col(out, "eligible") == [True, True, False, False, False, True, False, False, True, False]
    assert col(out, "selected") == [False, True, False, False, False, True, False, False, True, False]
    lr = col(out, "log_rho")
    assert lr[0] == pytest.approx(-0.6) and lr[1] == pytest.approx(-0.3)
    assert lr[5] == pytest.approx(-2.4794415416798357) and lr[8] == pytest.approx(-0.8)
    # gml ignores accuracy, so the non-ruc prompt is eligible there
    assert score_candidates(frame(rows), "gml")["eligible"].to_list()[3:5] == [True, True]


def test_max_think_tokens_parameter():
    rows = [cand(0, 0, 0.0, acc=1.0, think_len=10), cand(0, 1, 1.0, acc=1.0, think_len=11)]
    out = score_candidates(frame(rows), "acc", max_think_tokens=11)
    assert col(out, "eligible") == [True, False]
    assert col(out, "selected") == [True, False]


def test_keeps_extra_columns_order_and_empty_frames():
    df = frame([cand(1, 0, 0.0, acc=1.0), cand(0, 0, 0.0, acc=1.0)]).with_columns(round=pl.lit(2))
    out = score_candidates(df, "acc")
    assert out.columns == [*CANDIDATE_COLUMNS, "round", "eligible", "log_rho", "rho_tilde", "selected"]
    assert col(out, "prompt_idx") == [1, 0]
    assert col(out, "selected") == [True, True]
    empty = score_candidates(frame([]), "gml")
    assert empty.height == 0 and empty.columns[-4:] == ["eligible", "log_rho", "rho_tilde", "selected"]


def test_bad_inputs_fail_with_names():
    with pytest.raises(ValueError, match="acc.*gml.*likelihood"):
        score_candidates(frame([]), "accuracy")
    with pytest.raises(ValueError, match="log_ratio_mean"):
        score_candidates(frame([]).drop("log_ratio_mean"), "gml")
    with pytest.raises(ValueError, match="sample_idx"):
        score_candidates(frame([cand(0, None, 0.0)]), "gml")


# ------------------------------------------------------------------ reference == polars ---------------------
def assert_agree(rows: list[dict], estimator: str, max_think_tokens: int = 28000) -> None:
    fast = score_candidates(frame(rows), estimator, max_think_tokens).to_dicts()
    ref = score_candidates_reference(rows, estimator, max_think_tokens)
    assert len(fast) == len(ref)
    for f, r in zip(fast, ref, strict=True):
        assert list(f) == list(r)
        assert (f["eligible"], f["selected"]) == (r["eligible"], r["selected"]), (f, r)
        for key in ("log_rho", "rho_tilde"):
            if r[key] is None:
                assert f[key] is None, (key, f, r)
            else:
                assert f[key] == pytest.approx(r[key], rel=1e-12, abs=1e-300), (key, f, r)


def test_reference_equals_polars_on_literal_cases():
    rows = [
        cand(0, 0, -0.1, acc=0.5),
        cand(0, 1, -0.2, acc=1.0, amean=-1.0, asum=-3.0),
        cand(1, 0, -0.1, acc=0.0, amean=-0.5, source="ruc/1"),
        cand(1, 1, None, acc=0.0, amean=-0.5, source="ruc/1"),
        cand(2, 1, -0.2, acc=0.5),
        cand(2, 0, -0.2, acc=0.5),
    ]
    for est in ("acc", "gml", "likelihood"):
        assert_agree(rows, est)


def random_rows(rng: random.Random, cut: int) -> list[dict]:
    rows = []
    for p in range(rng.randint(0, 6)):
        source = rng.choice(["numina/1", "ruc/2", "ruc", "RUC/3", "apps/4", None])
        k = rng.randint(1, 6)
        for s in rng.sample(range(k + 2), k):  # shuffled, with gaps
            rows.append(
                cand(
                    p,
                    s,
                    rng.choice([-0.5, -0.25, 0.0, 0.3, -1e3, None, float("nan"), float("inf")]),
                    acc=rng.choice([0.0, 0.125, 0.5, 1.0, None, float("nan")]),
                    amean=rng.choice([-1.0, -0.25, 0.0, None, float("nan"), float("-inf")]),
                    asum=rng.choice([-40.0, -3.0, 0.0, None, float("nan")]),
                    think_len=rng.choice([1, cut - 1, cut, cut + 1, None]),
                    source=source,
                )
            )
    rng.shuffle(rows)
    return rows


def test_reference_equals_polars_on_random_frames():
    rng = random.Random(0)
    for _ in range(150):
        cut = rng.choice([5, 28000])
        rows = random_rows(rng, cut)
        for est in ("acc", "gml", "likelihood"):
            assert_agree(rows, est, cut)


def test_invariants_on_random_frames():
    rng = random.Random(1)
    for _ in range(60):
        rows = random_rows(rng, 28000)
        for est in ("acc", "gml", "likelihood"):
            out = score_candidates(frame(rows), est)
            per = out.group_by("prompt_idx").agg(
                n_sel=pl.col("selected").sum(),
                n_elig=pl.col("eligible").sum(),
                total=pl.col("rho_tilde").sum(),
                best=pl.col("log_rho").max(),
                sel_lr=pl.col("log_rho").filter("selected").first(),
            )
            for n_sel, n_elig, total, best, sel_lr in per.select(
                "n_sel", "n_elig", "total", "best", "sel_lr"
            ).rows():
                assert n_sel == (1 if n_elig else 0)
                if n_elig:
                    assert total == pytest.approx(1.0, abs=1e-12)
                    assert sel_lr == best
            assert out.filter(pl.col("selected") & ~pl.col("eligible")).height == 0
            assert out.filter(pl.col("eligible") & ~pl.col("log_rho").is_finite()).height == 0


def test_softmax_is_stable_for_large_log_rho():
    rows = [cand(0, 0, -1000.0, amean=-5.0), cand(0, 1, -1001.0, amean=-5.0)]
    out = score_candidates(frame(rows), "gml")
    e = math.exp(-1.0)
    assert col(out, "rho_tilde") == pytest.approx([1 / (1 + e), e / (1 + e)])


# ------------------------------------------------------------------ question weights ------------------------
def test_question_weights():
    p = pl.DataFrame({"prompt_idx": [0, 1, 2, 3], "accuracy": [0.25, 0.5, 1.0, None]})
    assert question_weights(p, "rft")["question_weight"].to_list() == [0.25, 0.5, 1.0, 0.0]
    grpo = question_weights(p, "grpo")["question_weight"].to_list()
    # sqrt(0.25/0.75) = 0.57735, sqrt(1) = 1, p = 1 clipped to 0.99: sqrt(99) = 9.94987
    assert grpo == pytest.approx([0.5773503, 1.0, 9.9498744, 0.0], abs=1e-6)
    for scheme in ("mle", "none"):
        assert question_weights(p, scheme)["question_weight"].to_list() == [1.0] * 4
    with pytest.raises(ValueError, match="grpo"):
        question_weights(p, "ppo")


# ------------------------------------------------------------------ stage core ------------------------------
def logp_row(p: int, s: int, model: str, span: str, toks: list[float], r: int = 1) -> dict:
    return dict(
        prompt_idx=p,
        sample_idx=s,
        round=r,
        model=model,
        span=span,
        token_logps=toks,
        logp_sum=sum(toks),
        logp_mean=sum(toks) / len(toks),
        n_tokens=len(toks),
    )


@pytest.fixture
def stage_inputs() -> dict[str, pl.DataFrame]:
    problems = pl.DataFrame({"prompt_idx": [0, 1], "source": ["numina/1", "ruc/9"], "question": ["q0", "q1"]})
    samples = pl.DataFrame(
        {
            "prompt_idx": [0, 0, 1],
            "sample_idx": [0, 1, 0],
            "round": [1, 1, 1],
            "think_len": [3, 2, 2],
        }
    )
    logps = pl.DataFrame(
        [
            # (0, 0): lp has one token more than lq; L = 2: mean(−1+0.5, −2+1) = −0.75
            logp_row(0, 0, "pi_theta0", "think", [-1.0, -2.0, -3.0]),
            logp_row(0, 0, "q_phi", "think", [-0.5, -1.0]),
            logp_row(0, 0, "pi_theta0", "answer", [-0.5, -1.5]),  # mean −1, sum −2
            # (0, 1): mean(−0.5+0.25, −0.5+0.25) = −0.25
            logp_row(0, 1, "pi_theta0", "think", [-0.5, -0.5]),
            logp_row(0, 1, "q_phi", "think", [-0.25, -0.25]),
            logp_row(0, 1, "pi_theta0", "answer", [-4.0]),
            # (1, 0): −0.5
            logp_row(1, 0, "pi_theta0", "think", [-1.0, -1.0]),
            logp_row(1, 0, "q_phi", "think", [-0.5, -0.5]),
            logp_row(1, 0, "pi_theta0", "answer", [-0.1, -0.3]),  # mean −0.2
        ]
    ).with_columns(pl.col("token_logps").cast(pl.List(pl.Float32)))
    verdicts = pl.DataFrame(
        {
            "prompt_idx": [0, 0, 0, 0, 0, 0, 1, 1],
            "sample_idx": [0, 0, 0, 0, 1, 1, 0, 0],
            "rollout_idx": [0, 1, 2, 3, 0, 1, 0, 1],
            "correct": [True, False, True, True, False, False, False, False],
            "status": ["ok", "wrong", "ok", "ok", "wrong", "wrong", "wrong", "wrong"],
        }
    )
    return {"problems": problems, "posterior_samples": samples, "logps": logps, "verdicts": verdicts}


def test_think_log_ratio_uses_min_length(stage_inputs):
    out = think_log_ratio(stage_inputs["logps"]).sort("prompt_idx", "sample_idx")
    assert out["log_ratio_mean"].to_list() == pytest.approx([-0.75, -0.25, -0.5])


def test_weights_core_acc(stage_inputs):
    s = stage_inputs
    out = weights(s["posterior_samples"], s["logps"], s["verdicts"], s["problems"], WeightsConfig())
    assert out.columns == OUTPUT_COLUMNS
    assert out["estimator"].to_list() == ["acc"] * 3 and out["round"].to_list() == [1, 1, 1]
    assert out["accuracy"].to_list() == [0.75, 0.0, 0.0]
    assert out["answer_logp_mean"].to_list() == pytest.approx([-1.0, -4.0, -0.2])
    assert out["answer_logp_sum"].to_list() == pytest.approx([-2.0, -4.0, -0.4])
    # prompt 0: only sample 0 correct: log ρ = ln 0.75 − 0.75; prompt 1 (ruc, none correct): −0.2 − 0.5
    assert out["eligible"].to_list() == [True, False, True]
    assert out["log_rho"].to_list()[0] == pytest.approx(math.log(0.75) - 0.75)
    assert out["log_rho"].to_list()[2] == pytest.approx(-0.7)
    assert out["selected"].to_list() == [True, False, True]
    assert out["question_weight"].to_list() == [1.0, 1.0, 1.0]


def test_weights_core_gml_without_verdicts_and_question_weighting(stage_inputs):
    s = stage_inputs
    out = weights(s["posterior_samples"], s["logps"], None, s["problems"], WeightsConfig(estimator="gml"))
    assert out["accuracy"].to_list() == [None, None, None]
    assert out["log_rho"].to_list() == pytest.approx([-1.75, -4.25, -0.7])
    assert out["selected"].to_list() == [True, False, True]
    with pytest.raises(ValueError, match="verdicts"):
        weights(
            s["posterior_samples"], s["logps"], None, s["problems"], WeightsConfig(question_weighting="rft")
        )
    rft = weights(
        s["posterior_samples"],
        s["logps"],
        s["verdicts"],
        s["problems"],
        WeightsConfig(estimator="gml", question_weighting="rft"),
    )
    # p of prompt 0 = 3 correct of 6 rollouts; prompt 1 = 0 of 2
    assert rft["question_weight"].to_list() == [0.5, 0.5, 0.0]


def test_weights_core_scores_each_round_separately(stage_inputs):
    s = stage_inputs
    again = {k: s[k].with_columns(round=pl.lit(2, pl.Int64)) for k in ("posterior_samples", "logps")}
    # round 2: sample (0, 1) gets a far better think ratio, so it wins there (accuracy from the shared verdicts
    # is 0 for it, so use gml)
    again["logps"] = (
        again["logps"]
        .with_columns(
            token_logps=pl.when((pl.col("sample_idx") == 1) & (pl.col("model") == "q_phi"))
            .then(pl.lit([-9.0, -9.0], pl.List(pl.Float32)))
            .otherwise("token_logps")
        )
        .with_columns(
            logp_sum=pl.col("token_logps").list.sum().cast(s["logps"]["logp_sum"].dtype),
            n_tokens=pl.col("token_logps").list.len().cast(s["logps"]["n_tokens"].dtype),
        )
    )
    out = weights(
        pl.concat([again["posterior_samples"], s["posterior_samples"]]),
        pl.concat([again["logps"], s["logps"]]),
        s["verdicts"],
        s["problems"],
        WeightsConfig(estimator="gml"),
    )
    assert out.select("round", "prompt_idx", "sample_idx").rows() == [
        (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (2, 0, 1), (2, 1, 0)
    ]  # fmt: skip
    assert out["selected"].to_list() == [True, False, True, False, True, True]
    assert out.group_by("round", "prompt_idx").agg(pl.col("rho_tilde").sum())["rho_tilde"].to_list() == (
        pytest.approx([1.0] * 4)
    )


def test_weights_core_rejects_duplicate_keys(stage_inputs):
    s = stage_inputs
    doubled = pl.concat([s["posterior_samples"], s["posterior_samples"].head(1)])
    with pytest.raises(ValueError, match="duplicate"):
        weights(doubled, s["logps"], s["verdicts"], s["problems"], WeightsConfig())


def test_gold_unparsable_verdicts_are_skipped(stage_inputs):
    s = stage_inputs
    verdicts = s["verdicts"].with_columns(
        status=pl.when(pl.col("rollout_idx") == 1).then(pl.lit("gold_unparsable")).otherwise("status")
    )
    out = weights(s["posterior_samples"], s["logps"], verdicts, s["problems"], WeightsConfig())
    assert out["accuracy"].to_list() == [1.0, 0.0, 0.0]  # (0, 0): 3 correct of the 3 parsable


def test_effective_sample_size():
    df = pl.DataFrame({"prompt_idx": [0, 0, 1], "eligible": [True, True, True], "rho_tilde": [0.5, 0.5, 1.0]})
    assert effective_sample_size(df)["ess"].to_list() == pytest.approx([2.0, 1.0])


def test_weights_task_writes_and_reuses(stage_inputs, tmp_path: Path):
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m", data_root=str(tmp_path)).model_dump()
    upstream = {name: finished_stage(tmp_path, "t", name, df) for name, df in stage_inputs.items()}
    manifest = run_stage(WEIGHTS, cfg, upstream)
    assert manifest["rows"] == 3
    out = pl.read_parquet(tmp_path / manifest["path"] / "part-00000.parquet")
    assert out["selected"].sum() == 2
    assert run_stage(WEIGHTS, cfg, upstream) == manifest  # reused, not recomputed
    cfg["weights"]["estimator"] = "gml"
    assert run_stage(WEIGHTS, cfg, upstream)["fingerprint"] != manifest["fingerprint"]


def test_official_think_cap_is_on_the_scored_length(stage_inputs):
    """Officially the 28k cap compares min(len lp, len lq) of the SCORED think, after the 32k context cut
    (build_data_*.py `shared_think_len`); strict compares the whole think. A 3-token cap here: sample (0, 0)
    thinks 3 tokens (over it), but q_φ scored only 2 of them (its context was full): eligible officially."""
    s = stage_inputs
    cfg = WeightsConfig(max_think_tokens=3, estimator="gml")
    strict = weights(s["posterior_samples"], s["logps"], s["verdicts"], s["problems"], cfg)
    official = weights(
        s["posterior_samples"], s["logps"], s["verdicts"], s["problems"], cfg, cap_on_scored=True
    )
    key = ["prompt_idx", "sample_idx"]
    assert strict.sort(key)["think_len"].to_list() == [3, 2, 2]
    assert official.sort(key)["think_len"].to_list() == [2, 2, 2]  # min(3 scored by π_θ0, 2 by q_φ)
    assert strict.sort(key)["eligible"].to_list() == [False, True, True]
    assert official.sort(key)["eligible"].to_list() == [True, True, True]
    # a trace one model did not score has no scored length: not eligible
    no_q = s["logps"].filter(~((pl.col("prompt_idx") == 1) & (pl.col("model") == "q_phi")))
    out = weights(s["posterior_samples"], no_q, s["verdicts"], s["problems"], cfg, cap_on_scored=True)
    assert out.filter(pl.col("prompt_idx") == 1)["eligible"].to_list() == [False]
