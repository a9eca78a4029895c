"""Evaluation metrics and summary tables: the `eval` rows -> avg@k (with a 95% interval), pass@k, markdown.

In:  eval rows (model, benchmark, problem_id, sample, correct[, status][, correct_official,
     status_official]): each sample graded by our grader and, since issue 18, by the official harness's.
Out: `summarize` -> one row per model x benchmark x grader ("strict", "official"); `summary_markdown` ->
     the models side by side, strict and official columns next to each other, then the paper's table
     (`paper_table`: Math avg / Other avg, the paper's Qwen3-4B-Base numbers next to the official columns,
     method.md §7). Used by the eval stage (tasks/evaluate.py) and the run report (analysis/report.py).
Metrics (method.md §6): Avg@k = mean accuracy over all k samples of a problem, averaged over problems;
Pass@k = the unbiased estimator of Chen et al. 2021 on the same samples. A problem whose gold does not
parse is left out of the strict metrics (n_skipped) and counted wrong in the official ones, as the harness
counts it (method.md §10).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from variational.data import benchmarks

MODELS = ("base", "pi_theta0", "pi_theta")
# the verdict columns of the `eval` table per grader (registry.GRADERS): extracted, correct, status
VERDICT_COLUMNS = {
    "strict": ("extracted", "correct", "status"),
    "official": ("extracted_official", "correct_official", "status_official"),
}
SKIPS_UNPARSABLE_GOLD = {"strict": True, "official": False}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for n samples of which c are correct.

    Product form 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, stable for n in the thousands."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def powers_of_two(k: int) -> list[int]:
    return [2**e for e in range(int(math.log2(k)) + 1)] if k >= 1 else []


def bootstrap_ci(
    per_problem: list[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean over problems (resampling problems, not samples: the k
    samples of one problem are correlated). Fixed seed, so a summary is reproducible."""
    if not per_problem:
        raise ValueError("bootstrap_ci needs at least one problem")
    rng = np.random.default_rng(seed)
    values = np.asarray(per_problem, dtype=np.float64)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def graded_rows(eval_rows: pl.DataFrame) -> pl.DataFrame:
    """eval rows -> long form: model, benchmark, grader, problem_id, sample, correct, skip (a strict row whose
    gold did not parse: left out; the official harness counts it wrong). Graders whose columns the table
    lacks (an eval table made before issue 18 has no official columns) are absent."""
    parts = []
    for grader, (_, correct, status) in VERDICT_COLUMNS.items():
        if correct not in eval_rows.columns:
            continue
        unparsable = pl.col(status) == "gold_unparsable" if status in eval_rows.columns else pl.lit(False)
        skip = unparsable if SKIPS_UNPARSABLE_GOLD[grader] else pl.lit(False)
        parts.append(
            eval_rows.select(
                "model",
                "benchmark",
                pl.lit(grader).alias("grader"),
                "problem_id",
                "sample",
                pl.col(correct).cast(pl.Boolean).fill_null(False).alias("correct"),
                skip.fill_null(False).alias("skip"),
            )
        )
    if not parts:
        raise ValueError(f"eval rows have no verdict column; expected one of {list(VERDICT_COLUMNS)}")
    return pl.concat(parts)


def summarize(eval_rows: pl.DataFrame, ks: list[int] | None = None) -> pl.DataFrame:
    """Per (model, benchmark, grader): n_problems, k, avg_at_k, its 95% bootstrap interval over problems
    (avg_ci_low, avg_ci_high), pass@1, pass@2, ... (wide, fractions in [0, 1]).

    k = samples per problem (the smallest count when problems differ); `ks` default: the powers of two
    <= k of each benchmark; a pass@j column is null for a benchmark with k < j. Strict rows whose status is
    `gold_unparsable` are skipped (their samples counted in n_skipped): a gold that does not parse says
    nothing about the model (open-r1 does the same); the official grader counts them wrong, as the harness
    does. Input columns: model, benchmark, problem_id, sample, correct[, status][, correct_official,
    status_official]."""
    per_problem = (
        graded_rows(eval_rows)
        .group_by("model", "benchmark", "grader", "problem_id")
        .agg(
            n=(~pl.col("skip")).sum().cast(pl.Int64),
            c=(pl.col("correct") & ~pl.col("skip")).sum().cast(pl.Int64),
            n_skipped=pl.col("skip").sum().cast(pl.Int64),
        )
    )
    order = {g: i for i, g in enumerate(VERDICT_COLUMNS)}
    out: list[dict[str, Any]] = []
    all_ks: set[int] = set()
    for (model, bench, grader), grp in per_problem.sort(
        "model", "benchmark", pl.col("grader").replace_strict(order), "problem_id"
    ).group_by("model", "benchmark", "grader", maintain_order=True):
        scored = grp.filter(pl.col("n") > 0)
        k = int(scored["n"].min()) if scored.height else 0
        accuracy = (scored["c"] / scored["n"]).to_list()
        low, high = bootstrap_ci(accuracy) if accuracy else (None, None)
        row: dict[str, Any] = {
            "model": model,
            "benchmark": bench,
            "grader": grader,
            "n_problems": scored.height,
            "n_skipped": int(grp["n_skipped"].sum()),
            "k": k,
            "avg_at_k": sum(accuracy) / len(accuracy) if accuracy else None,
            "avg_ci_low": low,
            "avg_ci_high": high,
        }
        for j in ks if ks is not None else powers_of_two(k):
            all_ks.add(j)
            if 1 <= j <= k:
                pairs = zip(scored["n"].to_list(), scored["c"].to_list(), strict=True)
                row[f"pass@{j}"] = sum(pass_at_k(n, c, j) for n, c in pairs) / scored.height
        out.append(row)
    schema: dict[str, Any] = {
        "model": pl.String,
        "benchmark": pl.String,
        "grader": pl.String,
        "n_problems": pl.Int64,
        "n_skipped": pl.Int64,
        "k": pl.Int64,
        "avg_at_k": pl.Float64,
        "avg_ci_low": pl.Float64,
        "avg_ci_high": pl.Float64,
    } | {f"pass@{j}": pl.Float64 for j in sorted(all_ks)}
    return pl.DataFrame([{c: r.get(c) for c in schema} for r in out], schema=schema)


def _model_columns(summary: pl.DataFrame, models: list[str] | None) -> list[str]:
    present = summary["model"].unique().to_list()
    order = models or list(MODELS)
    return [m for m in order if m in present] + sorted(m for m in present if m not in order)


def _percent(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _graders(summary: pl.DataFrame) -> list[str]:
    present = set(summary["grader"].to_list()) if "grader" in summary.columns else {"strict"}
    return [g for g in VERDICT_COLUMNS if g in present]


def summary_markdown(summary: pl.DataFrame, models: list[str] | None = None) -> str:
    """One row per benchmark x metric, per model a strict and an official column side by side (base |
    pi_theta0 | pi_theta), in percent; under avg@k its 95% interval; then the paper's table when the run
    has any of its benchmarks."""
    if summary.is_empty():
        return "_no eval rows_\n"
    if "grader" not in summary.columns:
        summary = summary.with_columns(grader=pl.lit("strict"))
    cols, graders = _model_columns(summary, models), _graders(summary)
    pairs = [(m, g) for m in cols for g in graders]
    heads = [m if len(graders) == 1 else f"{m} {g}" for m, g in pairs]
    metrics = ["avg_at_k", "ci"] + [c for c in summary.columns if c.startswith("pass@")]
    lines = ["| benchmark | n | metric | " + " | ".join(heads) + " |", "|---|---|---|" + "---|" * len(heads)]
    for bench in summary["benchmark"].unique(maintain_order=True).to_list():
        sub = summary.filter(pl.col("benchmark") == bench)
        by_pair = {(r["model"], r["grader"]): r for r in sub.iter_rows(named=True)}
        n = int(sub["n_problems"].max())
        k = int(sub["k"].max())
        for metric in metrics:
            rows = [by_pair.get(pair, {}) for pair in pairs]
            if metric == "ci":
                name = "95% CI"
                vals = [r.get("avg_ci_low") for r in rows]
                cells = [
                    "—"
                    if r.get("avg_ci_low") is None
                    else f"[{_percent(r['avg_ci_low'])}, {_percent(r['avg_ci_high'])}]"
                    for r in rows
                ]
            else:
                name = f"avg@{k}" if metric == "avg_at_k" else metric
                vals = [r.get(metric) for r in rows]
                cells = [_percent(v) for v in vals]
            if all(v is None for v in vals):
                continue
            lines.append(f"| {bench} | {n} | {name} | {' | '.join(cells)} |")
    text = "\n".join(lines) + (
        "\n\nValues in %. avg@k = mean accuracy over the k samples per problem; 95% CI = percentile "
        "bootstrap over problems (2000 resamples, seed 0). strict = our graders, official = the official "
        "harness's rules on the same samples (a gold that does not parse: skipped in strict, wrong in "
        "official).\n"
    )
    paper = paper_table_markdown(summary, cols)
    return text + (f"\n{paper}" if paper else "")


def paper_table(summary: pl.DataFrame, models: list[str] | None = None) -> pl.DataFrame:
    """The paper's table (method.md §7): the ten benchmarks, "Math avg" after the five math ones and
    "Other avg" after the rest; one column per model and grader of the run (avg@k, %), the strict ones
    first, then the official ones with the paper's Qwen3-4B-Base numbers right after them (the paper was
    measured with the official harness, so only the official columns compare). An average needs all five
    of its benchmarks; a missing value is null."""
    if "grader" not in summary.columns:
        summary = summary.with_columns(grader=pl.lit("strict"))
    cols, graders = _model_columns(summary, models), _graders(summary)
    run: dict[str, dict[str, float | None]] = {}
    for g in graders:
        for m in cols:
            run[m if len(graders) == 1 else f"{m} {g}"] = {}
    for r in summary.iter_rows(named=True):
        name = r["model"] if len(graders) == 1 else f"{r['model']} {r['grader']}"
        if name in run and r["avg_at_k"] is not None:
            run[name][r["benchmark"]] = 100 * r["avg_at_k"]
    columns = run | {name: dict(values) for name, values in benchmarks.PAPER_4B.items()}
    for values in columns.values():
        values.setdefault("Math avg", benchmarks.group_average(values, benchmarks.MATH_AVG))
        values.setdefault("Other avg", benchmarks.group_average(values, benchmarks.OTHER_AVG))
    order = [*benchmarks.MATH_AVG, "Math avg", *benchmarks.OTHER_AVG, "Other avg"]
    return pl.DataFrame(
        {"benchmark": order} | {c: [v.get(b) for b in order] for c, v in columns.items()},
        schema={"benchmark": pl.String} | {c: pl.Float64 for c in columns},
    )


def paper_table_markdown(summary: pl.DataFrame, models: list[str] | None = None) -> str:
    """`paper_table` as markdown, or "" when the run has none of the paper's benchmarks (e.g. tiny)."""
    paper_benches = set(benchmarks.MATH_AVG + benchmarks.OTHER_AVG)
    if summary.is_empty() or not paper_benches & set(summary["benchmark"].to_list()):
        return ""
    table = paper_table(summary, models)
    head = "| benchmark | " + " | ".join(table.columns[1:]) + " |\n|---|" + "---|" * (table.width - 1) + "\n"
    body = "".join(
        f"| {row[0]} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in row[1:]) + " |\n"
        for row in table.iter_rows()
    )
    return (
        "Paper table (avg@k, %): Math avg = mean of MATH500, AIME24, AIME25, AMC23, OlympiadBench; Other avg = "
        "mean of GPQA-D, LCB-E/M/H, MMLU-Pro. The `paper …` columns are the published Qwen3-4B-Base 17K "
        "numbers (method.md §7), measured with the official harness: compare them with the official "
        "columns only.\n\n" + head + body
    )
