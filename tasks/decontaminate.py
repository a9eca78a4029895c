"""Stages `contamination` and `clean_problems`: which training rows overlap a benchmark problem, and (with
`data.decontaminate: drop`) the problems without them.

In:  problems (prompt_idx, question, solution_ref); the benchmark sets of `data.decontamination.against`
     and every benchmark of `eval.benchmarks` when eval.enabled (all their rows;
     variational/data/decontamination.py).
Out: `contamination`: one row per (prompt_idx, benchmark, problem_id) whose word n-gram overlap passes
     (CONTAMINATION_SCHEMA: field, n, overlap, shared, ngram); the SQL view of the same name.
     `clean_problems`: the problems table minus every prompt_idx of `contamination`, same columns.

Where in the DAG (flows/recipe.py `decontaminate`): after `problems`, which stays every usable row.
- off: neither stage runs. flag: `contamination` runs and nothing reads it but the report; changing the
  benchmarks or the settings recomputes it alone (seconds), no stage below `problems`.
- drop: every stage that reads problems gets `clean_problems` instead, so no model trains or samples on a
  contaminated question, q_phi and pi_theta0 included.
- Rows are dropped after prompt_idx is assigned (the raw row index, tasks/ingest.py): a row keeps its id in
  flag and drop runs and in `contamination`, and `data.limit` takes the first N raw rows before the
  contaminated ones are dropped, so fewer than N can remain.
"""

from __future__ import annotations

import polars as pl

from variational.data import decontamination as dc
from variational.pipeline.stage import Inputs, Output, Stage, logger

TEXT_FIELDS = {"question": "question", "solution": "solution_ref"}  # field name -> problems column


def training_texts(problems: pl.DataFrame) -> pl.DataFrame:
    """problems -> (prompt_idx, field, text): each question and reference solution that has text."""
    parts = [
        problems.select("prompt_idx", field=pl.lit(field), text=pl.col(column))
        for field, column in TEXT_FIELDS.items()
    ]
    texts = pl.concat(parts).filter(pl.col("text").str.strip_chars().str.len_chars() > 0)
    return texts.cast(dc.TEXT_SCHEMA)  # type: ignore[arg-type]


def decontamination_summary(found: pl.DataFrame, references: pl.DataFrame, smallest_n: int) -> str:
    """Markdown: per benchmark, problems checked, too short to match, training rows and pairs found."""
    checked = references.group_by("benchmark", maintain_order=True).agg(problems=pl.len())
    short = dc.too_short(references, smallest_n)
    hits = found.group_by("benchmark").agg(rows=pl.col("prompt_idx").n_unique(), pairs=pl.len())
    table = checked.join(short, on="benchmark").join(hits, on="benchmark", how="left").fill_null(0)
    lines = [
        f"training rows matching a benchmark problem: **{found['prompt_idx'].n_unique()}**\n",
        f"| benchmark | problems | under {smallest_n} words (unchecked) | training rows | pairs |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {b} | {p} | {s} | {r} | {n} |"
        for b, p, s, r, n in table.select("benchmark", "problems", "too_short", "rows", "pairs").iter_rows()
    ]
    return "\n".join(lines) + "\n"


def _references(i: Inputs) -> dict:
    """The shipped sets of `against`, and the benchmarks the run evaluates (none with eval.enabled: false, so a
    run that does not evaluate never needs a hub benchmark)."""
    conf = i.conf.data.decontamination
    evaluated = dict(i.conf.eval.benchmarks) if i.conf.eval.enabled else {}
    return dc.reference_specs(list(conf.against), evaluated)


def _contamination(i: Inputs) -> Output:
    conf = i.conf.data.decontamination
    problems = i.table("problems", columns=["prompt_idx", *TEXT_FIELDS.values()])
    references = dc.reference_problems(_references(i))
    found = dc.find_contamination(training_texts(problems), references, conf.ngrams, conf.min_overlap)
    if found.height:
        logger().warning(
            "contamination: %d of %d problems overlap a benchmark problem, e.g. %s (table `contamination`)",
            found["prompt_idx"].n_unique(),
            problems.height,
            "; ".join(
                f"prompt_idx {r['prompt_idx']} ~ {r['benchmark']} {r['problem_id']} ({r['overlap']:.2f})"
                for r in found.head(3).iter_rows(named=True)
            ),
        )
    meta = {
        "rows_in": problems.height,
        "references": dict(references.group_by("benchmark").len().iter_rows()),
        "contaminated_rows": found["prompt_idx"].n_unique(),
        "summary": decontamination_summary(found, references, min(conf.ngrams)),
    }
    return Output(found, meta=meta)


def drop_contaminated(problems: pl.DataFrame, contamination: pl.DataFrame) -> pl.DataFrame:
    """problems without the rows `contamination` names; an error when none would remain."""
    dropped = contamination["prompt_idx"].unique()
    clean = problems.filter(~pl.col("prompt_idx").is_in(dropped.implode()))
    if clean.is_empty() and problems.height:
        raise ValueError(
            f"data.decontaminate: drop removed all {problems.height} problems (each overlaps a benchmark "
            "problem, see the contamination table); use flag, or a dataset that is not a benchmark"
        )
    return clean


def _clean_problems(i: Inputs) -> Output:
    problems, found = i.table("problems"), i.table("contamination")
    clean = drop_contaminated(problems, found)
    by_benchmark = dict(found.group_by("benchmark").agg(pl.col("prompt_idx").n_unique()).iter_rows())
    meta = {
        "rows_in": problems.height,
        "dropped": problems.height - clean.height,
        "dropped_by_benchmark": by_benchmark,
        "summary": f"dropped {problems.height - clean.height} of {problems.height} problems as contaminated "
        f"({', '.join(f'{b}: {n}' for b, n in sorted(by_benchmark.items())) or 'none'})\n",
    }
    return Output(clean, meta=meta)


CONTAMINATION = Stage(
    name="contamination",
    inputs=("problems",),
    fields=("data.decontamination",),
    # which rows of which benchmarks: through `identity` (content hashes), so eval's k or limit do not count
    uses=("eval.benchmarks", "eval.enabled"),
    code=("variational.data.decontamination", "variational.data.benchmarks", "variational.data.raw"),
    core=_contamination,
    identity=lambda i: {"references": dc.reference_identity(_references(i))},
    per_round=False,
)
CLEAN_PROBLEMS = Stage(
    name="clean_problems",
    inputs=("problems", "contamination"),
    core=_clean_problems,
    per_round=False,
)
