"""Stage `verdicts` (and `prior_verdicts`): is each answer rollout right?

In:  rollouts (prompt_idx, sample_idx, rollout_idx, [round], text), problems (prompt_idx, kind, gold, tests).
Out: table `verdicts`: the rollout keys plus extracted, correct, status, verifier, elapsed_ms (design.md).
Math rows: our math-verify grader (variational/verifiers/math_rules.py), gold first; code rows: the last
fenced ```python block on the APPS/TACO tests in the sandbox of `verify.sandbox` (where none can be set up,
the stage stops; with `none` the rows' verifier is code_tests_unsandboxed and the summary says so).
`parity: official` judges with the official math grader and the official code time limits and
verdict rule (variational/parity.py `verify_rules`).
`check_answers` and `check_code` (variational/verifiers/answers.py) are re-exported here: the public entry
points of the verifier contract.
"""

from __future__ import annotations

import polars as pl

from variational import parity
from variational.config import VerifyConfig
from variational.parity import VerifyRules
from variational.pipeline.stage import Engine, Inputs, Stage
from variational.verifiers.answers import (
    CODE_STATUSES,
    GRADING_CODE,
    KEYS,
    STATUSES,
    VERDICT_SCHEMA,
    check_answers,
    check_code,
    require,
    unsandboxed_warning,
)
from variational.verifiers.math_rules import MathPool
from variational.verifiers.official_math import OfficialMathPool

__all__ = ["check_answers", "check_code", "verify", "VERDICTS", "PRIOR_VERDICTS"]

# ================================================================ the stage
_ROW = "__verify_row"


def verify(
    rollouts: pl.DataFrame,
    problems: pl.DataFrame,
    cfg: VerifyConfig,
    *,
    pool: MathPool | OfficialMathPool | None = None,
    rules: VerifyRules | None = None,
) -> pl.DataFrame:
    """rollouts[prompt_idx, (sample_idx, rollout_idx, round,) text] + problems[prompt_idx, kind, gold, tests]
    -> verdicts: the rollout keys + extracted, correct, status, verifier, elapsed_ms, in rollout order.
    kind "code" rows run their tests; every other row goes to the math grader against `gold`. `rules`
    (parity.verify_rules): the grader and code limits; default the strict ones of `cfg`."""
    if rules is None:
        rules = VerifyRules(
            "strict", cfg.code_timeout_s, cfg.code_problem_timeout_s, cfg.code_official_quirks
        )
    require(rollouts, ("prompt_idx", "text"), "verify: rollouts")
    require(problems, ("prompt_idx", "gold"), "verify: problems")
    keys = [k for k in KEYS if k in rollouts.columns]
    if rules.gold_form == "solution":
        problems = problems.with_columns(gold=official_golds(problems))
    probs = problems.select(
        "prompt_idx",
        pl.col("kind") if "kind" in problems.columns else pl.lit("math").alias("kind"),
        "gold",
        pl.col("tests") if "tests" in problems.columns else pl.lit(None).alias("tests"),
        pl.lit(True).alias("__found"),
    )
    joined = rollouts.select(*keys, "text").with_row_index(_ROW).join(probs, on="prompt_idx", how="left")
    if (lost := joined.filter(pl.col("__found").is_null())).height:
        ids = lost["prompt_idx"].unique().sort().to_list()
        raise ValueError(f"verify: rollouts of prompt_idx {ids[:10]} have no problem row; rerun ingest")
    is_code = pl.col("kind") == "code"
    math_rows, code_rows = joined.filter(~is_code), joined.filter(is_code)
    parts = []
    if math_rows.height:
        golds = math_rows.select(_ROW, "text", "gold")
        kw = {"pool": pool, "grader": rules.grader, "gold_form": rules.gold_form}
        parts.append(check_answers(golds, cfg.timeout_s, cfg.workers, **kw))
    if code_rows.height:
        parts.append(
            check_code(
                code_rows.select(_ROW, "text", "tests"),
                rules.code_timeout_s,
                cfg.code_memory_mb,
                cfg.workers,
                official_quirks=rules.code_quirks,
                max_processes=cfg.code_max_processes,
                problem_timeout_s=rules.code_problem_timeout_s,
                sandbox=cfg.sandbox,
            )
        )
    verdicts = (
        pl.concat([p.select(_ROW, *VERDICT_SCHEMA) for p in parts])
        if parts
        else pl.DataFrame(schema={_ROW: pl.UInt32, **VERDICT_SCHEMA})
    )
    return joined.select(_ROW, *keys).join(verdicts, on=_ROW, how="left").sort(_ROW).drop(_ROW)


def official_golds(problems: pl.DataFrame) -> pl.Series:
    """The golds of each problem as whole solutions (gold_form "solution"), as verify_parallel.py gives them
    to the official grader: the source's ground-truth solution OR the reference solution. Ours keep the
    ground truth's answer, extracted at ingest from its last \\boxed: re-boxed, it reads back the same; the
    reference solution (solution_ref) goes in whole, so the official fallbacks ("the answer is", the last
    number) apply to it."""
    sols = problems["solution_ref"] if "solution_ref" in problems.columns else [None] * problems.height
    golds = [
        [f"\\boxed{{{g}}}" for g in (gold or []) if g] + ([sol] if sol else [])
        for gold, sol in zip(problems["gold"].to_list(), sols, strict=True)
    ]
    return pl.Series("gold", golds, dtype=pl.List(pl.String))


def verdict_summary(verdicts: pl.DataFrame) -> str:
    """Markdown: accuracy and rows per status (the artifact of the task), and a warning first when code
    rows were judged without a sandbox (verify.sandbox: none)."""
    n = verdicts.height
    scored = verdicts.filter(pl.col("status") != "gold_unparsable")
    acc = scored["correct"].mean() if scored.height else float("nan")
    counts = dict(verdicts.group_by("status").len().iter_rows())
    lines = [warning] if (warning := unsandboxed_warning(verdicts)) else []
    lines += [
        f"accuracy **{acc:.3f}** over {scored.height} scored rows ({n} in all)\n",
        "| status | rows | share |",
        "|---|---|---|",
    ]
    lines += [
        f"| {s} | {counts.get(s, 0)} | {counts.get(s, 0) / max(n, 1):.3f} |"
        for s in (*STATUSES, *CODE_STATUSES)
    ]
    return "\n".join(lines) + "\n"


def _math_pool(i: Inputs) -> MathPool | OfficialMathPool:
    """The math grader's workers (ours, or the official harness's under `parity: official`), shared by the
    stage's shards; they start on the first math row."""
    official = parity.verify_rules(i.conf).grader == "official"
    return (OfficialMathPool if official else MathPool)(i.conf.verify.workers)


def _declare(name: str, items: str) -> Stage:
    """verdicts (of rollouts) and prior_verdicts (of prior samples: the weights w_m of Eq.9) are the same
    stage on different items, sharded over them, with one MathPool for all shards."""

    def plan(i: Inputs) -> pl.DataFrame:
        rows = i.table(items)
        return rows.rename({"response": "text"}) if "text" not in rows.columns else rows

    def shard(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
        rules = parity.verify_rules(i.conf)
        return verify(part, i.table("problems"), i.conf.verify, pool=engine.get(), rules=rules)

    return Stage(
        name=name,
        inputs=(items, "problems"),
        # verify.workers changes speed, not verdicts
        fields=(
            "parity",
            "verify.timeout_s",
            "verify.code_timeout_s",
            "verify.code_problem_timeout_s",
            "verify.code_memory_mb",
            "verify.code_max_processes",
            "verify.code_official_quirks",
            "verify.code_sandboxed",  # none can change verdicts; root vs userns (verify.sandbox) do not
            "verify.shard_size",
        ),
        uses=("verify",),
        code=(*GRADING_CODE, "variational.parity"),
        plan=plan,
        shard=shard,
        shard_size="verify.shard_size",
        engine=_math_pool,
        summary=lambda i, verdicts: verdict_summary(verdicts),
    )


VERDICTS = _declare("verdicts", "rollouts")
PRIOR_VERDICTS = _declare("prior_verdicts", "prior_samples")
