"""Stage `weights`: importance weights ρ of the posterior traces and the top-1 selection (method.md §1, Eq.8).

In:  posterior_samples (prompt_idx, sample_idx, round, think_len), logps (per-token log-probs of the think span
     under π_θ0 and q_φ, and of the answer under π_θ0), verdicts (correctness of the π_θ0 answer rollouts;
     optional: GML / L need none), problems (prompt_idx, source).
Out: table `weights`, one row per (prompt_idx, sample_idx, round): the candidate columns, `estimator`,
     `eligible`, `log_rho`, `rho_tilde`, `selected` and the per-question `question_weight` (method.md §3).

The estimator math is `score_candidates` (design.md "Estimator contract"); `score_candidates_reference` is the
same contract as a plain Python loop, tested equal. Decisions the contract leaves open:
- a row whose log ρ is null, NaN or ±inf is NOT eligible (it cannot be ranked or normalised); this includes a
  missing think_len, log_ratio_mean or answer log-prob. For `acc` this is part of "eligible", so a ruc prompt
  whose only accurate traces have no usable log ρ falls back to the GML rule.
- `source` null is not ruc; the ruc test is case-sensitive `source.startswith("ruc")`, read row by row (the
  source is a property of the prompt, so all rows of a prompt agree).
- ties in log ρ go to the lowest sample_idx, then to the earlier input row.
- `parity: official` (variational/parity.py): the think cap applies to the length the official script
  compares, min(scored π_θ0 think, scored q_φ think) tokens after scoring's context cap (build_data_*.py
  `shared_think_len`); that length is the `think_len` column then. Strict: the whole think span.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from variational import parity
from variational.config import WeightsConfig
from variational.pipeline.stage import Inputs, Stage

CANDIDATE_COLUMNS = (
    "prompt_idx",
    "sample_idx",
    "source",
    "think_len",
    "log_ratio_mean",
    "accuracy",
    "answer_logp_mean",
    "answer_logp_sum",
)
SCORE_COLUMNS = ("eligible", "log_rho", "rho_tilde", "selected")
PI, Q = "pi_theta0", "q_phi"  # `logps.model` values
RUC_PREFIX = "ruc"  # STILL science/puzzle items rarely verify, hence the Acc special case (method.md §5)
# GRPO's weight sqrt(p/(1-p)) is infinite at p = 1. We clip p to 1 - GRPO_EPS: with M = 8 rollouts the next
# largest p is 7/8 (w = 2.65); p = 1 gets w = 9.95, still on top as the formula's monotonicity demands,
# without one easy question swamping the batch. (Real GRPO gives such a group zero advantage; the paper's
# comparison in §3 is about the smooth weight, so we keep it monotone.)
GRPO_EPS = 1e-2
_ROW = "__weights_row"


# ---------------------------------------------------------------- estimators (polars) ----------------------
@dataclass(frozen=True)
class Estimator:
    """log ρ of one candidate and an extra eligibility condition beyond think_len < max_think_tokens."""

    log_rho: Callable[[], pl.Expr]
    requires: Callable[[], pl.Expr]
    ruc_fallback: str | None = None  # estimator used for ruc prompts with no eligible sample


def _f64(name: str) -> pl.Expr:
    return pl.col(name).cast(pl.Float64)


ESTIMATORS: dict[str, Estimator] = {
    # Eq.8 with the accuracy of M π_θ0 continuations: ρ = acc · exp(Δ), Δ = mean per-token log π_θ0 − log q_φ
    "acc": Estimator(
        log_rho=lambda: _f64("accuracy").log() + _f64("log_ratio_mean"),
        requires=lambda: (_f64("accuracy") > 0).fill_null(False),
        ruc_fallback="gml",
    ),
    # geometric mean of the reference-answer token probabilities instead of the accuracy
    "gml": Estimator(
        log_rho=lambda: _f64("answer_logp_mean") + _f64("log_ratio_mean"),
        requires=lambda: pl.lit(True),
    ),
    # raw answer likelihood
    "likelihood": Estimator(
        log_rho=lambda: _f64("answer_logp_sum") + _f64("log_ratio_mean"),
        requires=lambda: pl.lit(True),
    ),
}


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid estimators: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def _check_candidates(cands: pl.DataFrame) -> None:
    missing = [c for c in CANDIDATE_COLUMNS if c not in cands.columns]
    if missing:
        raise ValueError(f"candidates lack columns {missing}; expected {list(CANDIDATE_COLUMNS)}")
    for key in ("prompt_idx", "sample_idx"):
        if cands[key].null_count():
            raise ValueError(
                f"candidates: {cands[key].null_count()} rows have a null {key}; keys must be set"
            )


def _rule(est: Estimator, max_think_tokens: int) -> tuple[pl.Expr, pl.Expr]:
    """(eligible, log ρ) under one estimator's rule; eligibility needs a finite log ρ (module docstring)."""
    lr = est.log_rho()
    short = (pl.col("think_len") < max_think_tokens).fill_null(False)
    return short & est.requires() & lr.is_finite().fill_null(False), lr


def score_candidates(cands: pl.DataFrame, estimator: str, max_think_tokens: int = 28000) -> pl.DataFrame:
    """The candidates (CANDIDATE_COLUMNS, any extra columns kept, input order kept) plus eligible, log_rho,
    rho_tilde (softmax of log ρ over the eligible samples of the prompt) and selected (top-1 per prompt)."""
    est = get_estimator(estimator)
    _check_candidates(cands)
    df = cands.drop([c for c in SCORE_COLUMNS if c in cands.columns]).with_row_index(_ROW)
    elig, lr = _rule(est, max_think_tokens)
    df = df.with_columns(eligible=elig, log_rho=lr)
    if est.ruc_fallback is not None:
        fb_elig, fb_lr = _rule(get_estimator(est.ruc_fallback), max_think_tokens)
        is_ruc = pl.col("source").cast(pl.String).str.starts_with(RUC_PREFIX).fill_null(False)
        fallback = is_ruc & ~pl.col("eligible").any().over("prompt_idx")
        df = df.with_columns(
            eligible=pl.when(fallback).then(fb_elig).otherwise("eligible"),
            log_rho=pl.when(fallback).then(fb_lr).otherwise("log_rho"),
        )
    df = df.with_columns(log_rho=pl.when("eligible").then(pl.col("log_rho")).cast(pl.Float64))
    # stable softmax within the prompt: subtract the prompt's max before exp
    shifted = (pl.col("log_rho") - pl.col("log_rho").max().over("prompt_idx")).exp()
    df = df.with_columns(rho_tilde=shifted / shifted.sum().over("prompt_idx"))
    best = (
        df.filter("eligible")
        .sort(["prompt_idx", "log_rho", "sample_idx", _ROW], descending=[False, True, False, False])
        .group_by("prompt_idx", maintain_order=True)
        .first()[_ROW]
    )
    return df.with_columns(selected=pl.col(_ROW).is_in(best.implode())).drop(_ROW)


# ---------------------------------------------------------------- plain-loop reference ---------------------
def _reference_rule(row: dict, rule: str, max_think_tokens: int) -> tuple[bool, float | None]:
    def num(key: str) -> float | None:
        v = row[key]
        return None if v is None else float(v)

    short = row["think_len"] is not None and row["think_len"] < max_think_tokens
    ratio = num("log_ratio_mean")
    if rule == "acc":
        acc = num("accuracy")
        ok = acc is not None and acc > 0
        lr = math.log(acc) + ratio if ok and ratio is not None else None
    elif rule == "gml":
        ok, ans = True, num("answer_logp_mean")
        lr = ans + ratio if ans is not None and ratio is not None else None
    elif rule == "likelihood":
        ok, ans = True, num("answer_logp_sum")
        lr = ans + ratio if ans is not None and ratio is not None else None
    else:
        raise ValueError(f"unknown estimator {rule!r}; valid estimators: {sorted(ESTIMATORS)}")
    eligible = short and ok and lr is not None and math.isfinite(lr)
    return eligible, lr


def score_candidates_reference(rows: list[dict], estimator: str, max_think_tokens: int = 28000) -> list[dict]:
    """`score_candidates` as a plain loop over dicts (one per candidate); returns new dicts, same order."""
    get_estimator(estimator)
    out = [dict(r) for r in rows]
    by_prompt: dict[object, list[dict]] = {}
    for r in out:
        by_prompt.setdefault(r["prompt_idx"], []).append(r)
    for group in by_prompt.values():
        for r in group:
            r["eligible"], r["log_rho"] = _reference_rule(r, estimator, max_think_tokens)
        if estimator == "acc" and not any(r["eligible"] for r in group):
            for r in group:
                if r["source"] is not None and str(r["source"]).startswith(RUC_PREFIX):
                    r["eligible"], r["log_rho"] = _reference_rule(r, "gml", max_think_tokens)
        eligible = [r for r in group if r["eligible"]]
        top = max((r["log_rho"] for r in eligible), default=0.0)
        total = sum(math.exp(r["log_rho"] - top) for r in eligible)
        best = None
        for r in group:  # input order, so the first of equal (log ρ, sample_idx) wins
            if not r["eligible"]:
                r["log_rho"] = r["rho_tilde"] = None
            else:
                r["rho_tilde"] = math.exp(r["log_rho"] - top) / total
            r["selected"] = False
            if not r["eligible"]:
                continue
            if best is None or (-r["log_rho"], r["sample_idx"]) < (-best["log_rho"], best["sample_idx"]):
                best = r
        if best is not None:
            best["selected"] = True
    return out


# ---------------------------------------------------------------- per-question weightings (method.md §3) ----
QUESTION_WEIGHTINGS: dict[str, Callable[[pl.Expr], pl.Expr]] = {
    "rft": lambda p: p,  # w = P_ref(Y_x|x)
    "grpo": lambda p: (p.clip(0.0, 1.0 - GRPO_EPS) / (1.0 - p.clip(0.0, 1.0 - GRPO_EPS))).sqrt(),
    "mle": lambda p: pl.lit(1.0),  # ∇log P = ∇P / P: the MLE objective weighs every question alike
    "none": lambda p: pl.lit(1.0),
}


def question_weights(accuracy_by_prompt: pl.DataFrame, scheme: str) -> pl.DataFrame:
    """Input: prompt_idx, accuracy (p, the question's share of correct rollouts); output adds question_weight.

    A null p (no verified rollout for the question) counts as p = 0: no evidence of a correct answer, which
    is what RFT's empirical P_ref would say."""
    if scheme not in QUESTION_WEIGHTINGS:
        raise ValueError(f"unknown question weighting {scheme!r}; valid: {sorted(QUESTION_WEIGHTINGS)}")
    p = _f64("accuracy").fill_null(0.0)
    return accuracy_by_prompt.with_columns(question_weight=QUESTION_WEIGHTINGS[scheme](p).cast(pl.Float64))


# ---------------------------------------------------------------- stage core -------------------------------
KEYS = ["prompt_idx", "sample_idx", "round"]
OUTPUT_COLUMNS = [
    *KEYS,
    "estimator",
    "source",
    "think_len",
    "log_ratio_mean",
    "accuracy",
    "answer_logp_mean",
    "answer_logp_sum",
    *SCORE_COLUMNS,
    "question_weight",
]


def _with_round(df: pl.DataFrame) -> pl.DataFrame:
    return df if "round" in df.columns else df.with_columns(round=pl.lit(1, pl.Int64))


def _cast_keys(df: pl.DataFrame, like: pl.DataFrame) -> pl.DataFrame:
    """Give df's key columns the dtypes they have in `like`, so joins across stages do not trip on Int32/Int64."""
    return df.cast({k: like.schema[k] for k in KEYS if k in df.columns and k in like.columns})


def think_log_ratio(logps: pl.DataFrame) -> pl.DataFrame:
    """(prompt_idx, sample_idx, round) -> log_ratio_mean = mean_{t<L}(log π_θ0 − log q_φ) over the think tokens,
    L = min of the two lengths (method.md §1); null when either model did not score the think or L = 0.

    Both models score the same think ids, so L is normally both lengths and the mean is (Σlp − Σlq)/L from
    the sums alone; the token lists are read only for rows whose lengths differ (a truncated context)."""
    think = logps.filter(pl.col("span") == "think")
    has_lists = "token_logps" in think.columns
    extra = ["token_logps"] if has_lists else []
    p = think.filter(pl.col("model") == PI).select(*KEYS, "n_tokens", "logp_sum", *extra)
    q = think.filter(pl.col("model") == Q).select(*KEYS, "n_tokens", "logp_sum", *extra)
    both = p.join(q, on=KEYS, how="inner", suffix="_q")
    same = pl.col("n_tokens") == pl.col("n_tokens_q")
    by_sums = (pl.col("logp_sum").cast(pl.Float64) - pl.col("logp_sum_q").cast(pl.Float64)) / pl.col(
        "n_tokens"
    )
    if has_lists:
        n = pl.min_horizontal(pl.col("token_logps").list.len(), pl.col("token_logps_q").list.len())
        as64 = pl.List(pl.Float64)
        diff = pl.col("token_logps").cast(as64).list.head(n) - pl.col("token_logps_q").cast(as64).list.head(n)
        by_lists = pl.when(n > 0).then(diff.list.mean())
    else:
        by_lists = pl.lit(None, pl.Float64)
    value = pl.when(same & (pl.col("n_tokens") > 0)).then(by_sums).when(~same).then(by_lists)
    return both.select(*KEYS, log_ratio_mean=value)


def _accuracy(verdicts: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Mean `correct` per group. Verdicts whose gold did not parse are skipped, not scored zero."""
    if "status" in verdicts.columns:
        verdicts = verdicts.filter(pl.col("status").fill_null("") != "gold_unparsable")
    return verdicts.group_by(by).agg(accuracy=pl.col("correct").cast(pl.Float64).mean())


def scored_think_len(logps: pl.DataFrame) -> pl.DataFrame:
    """(prompt_idx, sample_idx, round) -> think_len = min(π_θ0, q_φ) scored think tokens (official cap)."""
    think = logps.filter(pl.col("span") == "think", pl.col("model").is_in([PI, Q]))
    return think.group_by(KEYS).agg(
        think_len=pl.when(pl.col("model").n_unique() == 2).then(pl.col("n_tokens").min().cast(pl.Int64))
    )


def build_candidates(
    posterior_samples: pl.DataFrame,
    logps: pl.DataFrame,
    verdicts: pl.DataFrame | None,
    problems: pl.DataFrame,
    cap_on_scored: bool = False,
) -> pl.DataFrame:
    """One row per posterior sample with the CANDIDATE_COLUMNS (+ round), sorted by round, prompt, sample.
    `cap_on_scored`: think_len is the shorter scored think span (parity official), not the whole think."""
    samples = _with_round(posterior_samples).select(*KEYS, "think_len")
    logps = _with_round(logps)
    if cap_on_scored:
        scored = _cast_keys(scored_think_len(logps), samples)
        samples = samples.drop("think_len").join(scored, on=KEYS, how="left")
    answer = logps.filter((pl.col("model") == PI) & (pl.col("span") == "answer")).select(
        *KEYS,
        answer_logp_mean=pl.col("logp_mean").cast(pl.Float64),
        answer_logp_sum=pl.col("logp_sum").cast(pl.Float64),
    )
    cands = samples.join(_cast_keys(think_log_ratio(logps), samples), on=KEYS, how="left")
    cands = cands.join(_cast_keys(answer, samples), on=KEYS, how="left")
    if verdicts is not None and verdicts.height:
        on = [k for k in KEYS if k in verdicts.columns]
        cands = cands.join(_accuracy(_cast_keys(verdicts, samples), on), on=on, how="left")
    else:
        cands = cands.with_columns(accuracy=pl.lit(None, pl.Float64))
    cands = cands.join(
        _cast_keys(problems.select("prompt_idx", "source"), samples), on="prompt_idx", how="left"
    )
    dup = cands.group_by(KEYS).len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(
            f"duplicate candidates for (prompt_idx, sample_idx, round) {dup.head(3).rows()}: "
            "posterior_samples or logps hold a key twice; rebuild the upstream stage"
        )
    return cands.sort(KEYS)


def weights(
    posterior_samples: pl.DataFrame,
    logps: pl.DataFrame,
    verdicts: pl.DataFrame | None,
    problems: pl.DataFrame,
    cfg: WeightsConfig,
    cap_on_scored: bool = False,
) -> pl.DataFrame:
    """Build the candidates, score them per round with cfg.estimator, attach the per-question weight.
    `cap_on_scored`: the think cap on the scored think length (parity official, see build_candidates)."""
    if cfg.question_weighting in ("rft", "grpo") and verdicts is None:
        raise ValueError(
            f"weights.question_weighting {cfg.question_weighting!r} needs the question accuracy: "
            "run the answer rollouts and verify (verdicts), or use 'none' / 'mle'"
        )
    cands = build_candidates(posterior_samples, logps, verdicts, problems, cap_on_scored)
    scored = [
        score_candidates(part, cfg.estimator, cfg.max_think_tokens)
        for part in cands.partition_by("round", maintain_order=True)
    ]
    out = pl.concat(scored) if scored else score_candidates(cands, cfg.estimator, cfg.max_think_tokens)
    # p of a question: share of correct rollouts over all its traces (a proxy for P(Y_x|x), method.md §3)
    on = ["prompt_idx", "round"] if verdicts is not None and "round" in verdicts.columns else ["prompt_idx"]
    p = out.select(on).unique(maintain_order=True)
    if verdicts is not None and verdicts.height:
        p = p.join(_accuracy(_cast_keys(verdicts, out), on), on=on, how="left")
    else:
        p = p.with_columns(accuracy=pl.lit(None, pl.Float64))
    qw = question_weights(p, cfg.question_weighting).select(*on, "question_weight")
    out = out.join(qw, on=on, how="left", maintain_order="left").with_columns(estimator=pl.lit(cfg.estimator))
    return out.select(OUTPUT_COLUMNS).sort("round", "prompt_idx", "sample_idx", maintain_order=True)


def effective_sample_size(scored: pl.DataFrame) -> pl.DataFrame:
    """Per prompt (and round) with an eligible sample: ESS = 1 / Σ ρ̃² (1 .. number of eligible samples)."""
    by = [k for k in ("round", "prompt_idx") if k in scored.columns]
    return (
        scored.filter("eligible")
        .group_by(by)
        .agg(ess=1.0 / (pl.col("rho_tilde") ** 2).sum(), n_eligible=pl.len())
        .sort(by)
    )


def summarize(out: pl.DataFrame) -> str:
    """Markdown: candidates, eligible, selected (and how many of those came from the ruc fallback), ESS."""
    ess = effective_sample_size(out)
    estimator = out["estimator"][0] if out.height else "-"
    no_acc = pl.col("accuracy").cast(pl.Float64).fill_nan(None).fill_null(0.0) <= 0
    via_ruc = out.filter("selected", no_acc).height if estimator == "acc" else 0
    mean_ess = ess["ess"].mean() if ess.height else float("nan")
    return (
        "| estimator | candidates | eligible | selected | of which ruc fallback | prompts | mean ESS |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {estimator} | {out.height} | {int(out['eligible'].sum())} | {int(out['selected'].sum())} "
        f"| {via_ruc} | {out['prompt_idx'].n_unique()} | {mean_ess:.3f} |\n"
    )


# ---------------------------------------------------------------- declaration
def _weights(i: Inputs) -> pl.DataFrame:
    verdicts = i.table("verdicts") if i.has("verdicts") else None
    logps = i.table("logps", columns=[*KEYS, "model", "span", "n_tokens", "logp_sum", "logp_mean"])
    think = logps.filter(pl.col("span") == "think").group_by(KEYS).agg(pl.col("n_tokens").n_unique())
    if think["n_tokens"].max() != 1:  # some think spans differ in length between models: needs the lists
        logps = i.table("logps")
    on_scored = parity.think_cap_on_scored_length(i.conf)
    return weights(
        i.table("posterior_samples"), logps, verdicts, i.table("problems"), i.conf.weights, on_scored
    )


WEIGHTS = Stage(
    name="weights",
    inputs=("posterior_samples", "logps", "problems", "verdicts"),
    fields=("weights", "parity"),
    code=("variational.parity",),
    core=_weights,
    summary=lambda i, out: summarize(out),
)
