"""Stage `train`: the final SFT set from the weighted posterior traces (method.md §1 "17K mix").

In:  problems (prompt_idx, question, think_ref, solution_ref), weights (one round: prompt_idx, sample_idx,
     eligible, rho_tilde, selected, accuracy, [question_weight]), posterior_samples (think), and for the Acc
     estimator rollouts (text) + verdicts (correct).
Out: table `train`: row (0..n-1), prompt_idx, prompt, response, weight, origin, think_chars.
     origin: −2 original Bespoke trace, −1 original again as fallback (no selected trace), k ≥ 0 the chosen
     posterior sample_idx. think_chars = character length of the think part of `response`: response[:think_chars]
     is the thought, response[think_chars:] starts with `<|end_of` and carries the answer, so the trainer can
     weight think and answer tokens separately.

Modes (looked up by name in MODES):
- `17k-mix`: every original row (weight 1) + per question the selected trace (weight 1), or the original
  again (origin −1) when the question has none: 2 × #problems rows.
- `all-k`: every eligible trace, weight = ρ̃ (× question_weight, method.md §3); no originals, questions with
  no eligible trace are dropped.
Answer of a chosen trace: for Acc with accuracy > 0, the FIRST correct π_θ0 rollout (lowest rollout_idx;
official build_data_Acc.py, the paper says "random"); otherwise (GML, L, and the ruc fallback of Acc,
i.e. accuracy null or 0) the reference solution.
Row order: block (originals, fallbacks, chosen traces), then prompt_idx, then sample_idx.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from variational import registry, templates
from variational.pipeline.stage import Inputs, Stage

ORIGINAL, FALLBACK = -2, -1
TRAIN_COLUMNS = ["row", "prompt_idx", "prompt", "response", "weight", "origin", "think_chars"]
_TRAIN_SCHEMA = {
    "prompt_idx": pl.Int64,
    "prompt": pl.String,
    "response": pl.String,
    "weight": pl.Float64,
    "origin": pl.Int64,
    "think_chars": pl.Int64,
}


def _originals(problems: pl.DataFrame, origin: int) -> pl.DataFrame:
    rows = problems.select("prompt_idx", "question", "think_ref", "solution_ref").rows()
    return pl.DataFrame(
        {
            "prompt_idx": [r[0] for r in rows],
            "prompt": [templates.pi_prompt(r[1]) for r in rows],
            "response": [templates.pi_response(r[2], r[3]) for r in rows],
            "weight": [1.0] * len(rows),
            "origin": [origin] * len(rows),
            "think_chars": [len(r[2]) for r in rows],
        },
        schema=_TRAIN_SCHEMA,
    )


def _one_round(df: pl.DataFrame | None, round_: int | None) -> pl.DataFrame | None:
    if df is None or round_ is None or "round" not in df.columns:
        return df
    return df.filter(pl.col("round") == round_)


def _first_correct(rollouts: pl.DataFrame, verdicts: pl.DataFrame) -> pl.DataFrame:
    """(prompt_idx, sample_idx) -> text of the correct rollout with the lowest rollout_idx."""
    keys = ["prompt_idx", "sample_idx", "rollout_idx"]
    first = (
        verdicts.filter(pl.col("correct").fill_null(False))
        .group_by("prompt_idx", "sample_idx")
        .agg(pl.col("rollout_idx").min())
    )
    texts = rollouts.select(*keys, answer_text="text").cast({k: first.schema[k] for k in keys})
    return first.join(texts, on=keys, how="left").select("prompt_idx", "sample_idx", "answer_text")


def _answer_response(think: str, rollout: str) -> str:
    """think + `<|end_of` + the rollout (`_thought|>...<|end_of_solution|>`). vLLM drops the stop string unless
    include_stop_str_in_output, so a rollout without the closing tag gets it: the target must end the answer."""
    if not rollout.endswith(templates.ANSWER_STOP):
        rollout += templates.ANSWER_STOP
    return think + templates.END_OF + rollout


def _chosen(
    chosen: pl.DataFrame,
    problems: pl.DataFrame,
    posterior_samples: pl.DataFrame,
    rollouts: pl.DataFrame | None,
    verdicts: pl.DataFrame | None,
    estimator: str,
) -> pl.DataFrame:
    """Train rows for the chosen (prompt_idx, sample_idx, weight, accuracy) traces."""
    keys = ["prompt_idx", "sample_idx"]
    thinks = posterior_samples.select(*keys, "think").cast({k: chosen.schema[k] for k in keys})
    df = chosen.join(thinks, on=keys, how="left")
    df = df.join(
        problems.select("prompt_idx", "question", "solution_ref").cast(
            {"prompt_idx": chosen.schema["prompt_idx"]}
        ),
        on="prompt_idx",
        how="left",
    )
    lost = df.filter(pl.col("think").is_null() | pl.col("question").is_null())
    if lost.height:
        raise ValueError(
            f"chosen traces {lost.select(keys).head(3).rows()} have no think in posterior_samples or no "
            "problem row: weights and its upstream tables come from different runs; rerun `weights`"
        )
    use_rollout = estimator == "acc"
    acc = pl.col("accuracy").cast(pl.Float64).fill_nan(None).fill_null(0.0)
    df = df.with_columns(use_rollout=pl.lit(use_rollout) & (acc > 0))
    if df["use_rollout"].any():
        if rollouts is None or verdicts is None:
            raise ValueError("estimator 'acc' needs the rollouts and verdicts tables to build the answers")
        answers = _first_correct(rollouts, verdicts)
        df = df.join(answers.cast({k: df.schema[k] for k in keys}), on=keys, how="left")
        bad = df.filter(pl.col("use_rollout") & pl.col("answer_text").is_null())
        if bad.height:
            raise ValueError(
                f"traces {bad.select(keys).head(3).rows()} have accuracy > 0 but no correct rollout text: "
                "verdicts and rollouts disagree; rerun `rollouts` and `verdicts`"
            )
    else:
        df = df.with_columns(answer_text=pl.lit(None, pl.String))
    rows = df.select("think", "solution_ref", "use_rollout", "answer_text").rows()
    responses = [
        _answer_response(think, text) if rollout else templates.pi_response(think, sol)
        for think, sol, rollout, text in rows
    ]
    return df.select(
        pl.col("prompt_idx").cast(pl.Int64),
        prompt=pl.Series([templates.pi_prompt(q) for q in df["question"]], dtype=pl.String),
        response=pl.Series(responses, dtype=pl.String),
        weight=pl.col("weight").cast(pl.Float64),
        origin=pl.col("sample_idx").cast(pl.Int64),
        think_chars=pl.col("think").str.len_chars().cast(pl.Int64),
    )


def _mix(w: pl.DataFrame) -> pl.DataFrame:
    """17k-mix: the top-1 trace per question, unweighted (ρ only chooses, method.md §1)."""
    return w.filter("selected").with_columns(weight=pl.lit(1.0))


def _all_k(w: pl.DataFrame) -> pl.DataFrame:
    """all-k: every eligible trace, weight ρ̃ times the per-question weight when the table carries one."""
    qw = pl.col("question_weight") if "question_weight" in w.columns else pl.lit(1.0)
    return w.filter("eligible").with_columns(weight=pl.col("rho_tilde") * qw)


MODES: dict[str, Callable[[pl.DataFrame], pl.DataFrame]] = {"17k-mix": _mix, "all-k": _all_k}


def select(
    problems: pl.DataFrame,
    weights: pl.DataFrame,
    posterior_samples: pl.DataFrame,
    rollouts: pl.DataFrame | None,
    verdicts: pl.DataFrame | None,
    mode: str,
    estimator: str,
) -> pl.DataFrame:
    """The `train` table (module docstring) from one round of `weights`."""
    if mode not in MODES:
        raise ValueError(f"unknown select mode {mode!r}; valid modes: {sorted(MODES)}")
    if estimator not in registry.ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {sorted(registry.ESTIMATORS)}")
    if "estimator" in weights.columns and weights.height:
        used = weights["estimator"].unique().to_list()
        if used != [estimator]:
            raise ValueError(
                f"weights were computed with estimator {used}, select was asked for {estimator!r}"
            )
    round_ = None
    if "round" in weights.columns and weights.height:
        rounds = weights["round"].unique().sort().to_list()
        if len(rounds) > 1:
            raise ValueError(f"weights holds rounds {rounds}; select one round at a time")
        round_ = rounds[0]
    chosen = MODES[mode](weights).select("prompt_idx", "sample_idx", "weight", "accuracy")
    if chosen.select(pl.struct("prompt_idx", "sample_idx").is_duplicated().any()).item():
        raise ValueError("weights holds a (prompt_idx, sample_idx) twice; rerun `weights`")
    if chosen["weight"].null_count():
        raise ValueError(
            "some chosen traces have a null weight (rho_tilde or question_weight); rerun `weights`"
        )
    parts = [
        _chosen(
            chosen,
            problems,
            _one_round(posterior_samples, round_),
            _one_round(rollouts, round_),
            _one_round(verdicts, round_),
            estimator,
        )
    ]
    if mode == "17k-mix":
        have = chosen["prompt_idx"].cast(problems.schema["prompt_idx"])
        missing = problems.filter(~pl.col("prompt_idx").is_in(have.implode()))
        parts = [_originals(problems, ORIGINAL), _originals(missing, FALLBACK), *parts]
    train = pl.concat(parts, how="vertical")
    block = pl.min_horizontal(pl.col("origin"), pl.lit(0))  # −2, −1, then every chosen sample together
    train = train.sort(block, "prompt_idx", "origin", maintain_order=True)
    return train.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)).select(TRAIN_COLUMNS)


def origin_counts(train: pl.DataFrame) -> pl.DataFrame:
    """Rows and weight sum per origin block: original (−2), fallback (−1), selected (k ≥ 0)."""
    block = (
        pl.when(pl.col("origin") == ORIGINAL)
        .then(pl.lit("original (-2)"))
        .when(pl.col("origin") == FALLBACK)
        .then(pl.lit("fallback (-1)"))
        .otherwise(pl.lit("selected (k>=0)"))
    )
    order = pl.DataFrame({"block": ["original (-2)", "fallback (-1)", "selected (k>=0)"]})
    counts = train.group_by(block.alias("block")).agg(rows=pl.len(), weight_sum=pl.col("weight").sum())
    return order.join(counts, on="block", how="left").with_columns(
        pl.col("rows").fill_null(0), pl.col("weight_sum").fill_null(0.0)
    )


def summarize(train: pl.DataFrame, mode: str, estimator: str) -> str:
    lines = [f"mode `{mode}`, estimator `{estimator}`\n", "| origin | rows | weight sum |", "|---|---|---|"]
    for block, rows, wsum in origin_counts(train).rows():
        lines.append(f"| {block} | {rows} | {wsum:.3f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- declaration
def _train(i: Inputs) -> pl.DataFrame:
    tables = {k: i.table(k) if i.has(k) else None for k in TRAIN.inputs}
    return select(**tables, mode=i.conf.select.mode, estimator=i.conf.weights.estimator)


TRAIN = Stage(
    name="train",
    inputs=("problems", "weights", "posterior_samples", "rollouts", "verdicts"),
    fields=("select", "weights.estimator"),
    code=("variational.templates",),
    core=_train,
    summary=lambda i, train: summarize(train, i.conf.select.mode, i.conf.weights.estimator),
    verify_inputs=True,  # the final training data: hash-check what it is built from
)
