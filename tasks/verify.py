"""Stage `verify`: is each answer rollout right? math-verify for math (gold first), stdin/stdout tests for code.

In:  rollouts (prompt_idx, sample_idx, rollout_idx, [round], text), problems (prompt_idx, kind, gold, tests).
Out: table `verdicts`: the rollout keys plus extracted, correct, status, verifier, elapsed_ms (design.md).
     status: ok / wrong / no_answer / timeout / error / gold_unparsable.

Pieces (design.md "Verifier contract"):
- `check_answers(df[text, gold])`: math-verify run by `MathPool` worker processes (variational/procpool.py):
  math-verify's own timeouts use SIGALRM (main thread only) and a parse can hang, so every row has a soft
  deadline inside its worker and a hard one in the parent (the worker is killed and replaced).
- `check_code(df[text, tests])`: the last fenced ```python block against every test, in the sandbox of
  variational/sandbox.py (rlimits, wall timeout, no network).
- `verify` (the stage core), `verify_task` / `verify_prior_task` (Prefect wrappers), `verifier_report`
  (agreement with the labelled pairs of shared/data; CLI `variational verifier-report`).
math_verify is imported here only, and lazily (in the workers), so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from variational import templates
from variational.config import RunConfig, VerifyConfig
from variational.procpool import HARD_GRACE_S, DeadlinePool, Outcome, cpu_count
from variational.sandbox import last_code_block, run_tests
from variational.stage import finish_stage, logger, open_store, reuse_stage, run_shards, stage_task
from variational.store import code_version, fingerprint, read_stage

__all__ = ["HARD_GRACE_S", "last_code_block"]  # re-exported for callers and tests

STAGE, TABLE = "verify", "verdicts"
STATUSES = ("ok", "wrong", "no_answer", "timeout", "error", "gold_unparsable")
KEYS = ("prompt_idx", "sample_idx", "rollout_idx", "round")  # those present are carried through
VERDICT_SCHEMA = {
    "extracted": pl.String,
    "correct": pl.Boolean,
    "status": pl.String,
    "verifier": pl.String,
    "elapsed_ms": pl.Float64,
}
MATH_VERIFIER, CODE_VERIFIER = "math_verify", "code_tests"
MAX_REGION = 20_000  # chars handed to math-verify; the answer is at the end (see _answer_region)
MAX_EXTRACTED = 2_000
# LaTeX delimiters: text that has one is parsed as is; a bare answer without any is wrapped in $\boxed{}$
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
_COMMAND = re.compile(r"\\+[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")


# ================================================================ math: what a worker runs
def _parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # boxed_match_priority=0: a \boxed answer beats other candidates; among equals the last one wins, and
    # several \boxed in one display combine into a set (measured: +13 agreements over wrapping last_boxed
    # alone on the math_verify pairs). Timeouts are the pool's (its SIGALRM), so math-verify's are off.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(text, config, parsing_timeout=None)


@functools.lru_cache(maxsize=8192)  # golds repeat over the K x M rollouts of a prompt
def _parse_gold(gold: str) -> list:
    s = gold.strip()
    if not s:
        return []
    if _DELIMITED.search(s):
        return _parse(s)
    # a bare gold ("\frac{1}{2}", "10, 4, -2") is LaTeX without delimiters: box it so the LaTeX extractor
    # reads all of it (measured: +2 agreements over a plain parse), falling back to the plain parse
    return _parse(f"$\\boxed{{{s}}}$") or _parse(s)


def _answer_region(text: str) -> str:
    """The solution section when there is one, capped to its last MAX_REGION chars (extended back to the
    start of the line holding the last \\boxed, so a boxed answer and its $...$ pairs stay whole)."""
    sol = templates.extract_solution(text)
    region = sol if sol and sol.strip() else text
    if len(region) <= MAX_REGION:
        return region
    start = len(region) - MAX_REGION
    boxed = max(region.rfind("\\boxed"), region.rfind("\\fbox"))
    if 0 <= boxed < start:
        start = boxed
    line = region.rfind("\n", 0, start) + 1
    return region[line if start - line < MAX_REGION else start :]


def _looks_bare(s: str) -> bool:
    """A short one-line answer with no delimiters and no words ("\\frac34i", "(x-2)(x+2)", "\\$10")."""
    s = s.strip()
    return (
        0 < len(s) <= 200
        and "\n" not in s
        and not _DELIMITED.search(s)
        and not _WORD.search(_COMMAND.sub(" ", s))
    )


def _parse_pred(text: str) -> list:
    region = _answer_region(text)
    pred = _parse(region)
    if _looks_bare(region):
        # without delimiters only the expression extractor sees it, and it stops at the first LaTeX command
        # ("\frac{3}{4}i" -> 3/4): when the match does not cover the whole answer, read it as boxed LaTeX
        covered = (
            bool(pred)
            and isinstance(pred[-1], str)
            and len(re.sub(r"\s", "", pred[-1])) >= len(re.sub(r"\s", "", region))
        )
        if not covered:
            wrapped = _parse(f"$\\boxed{{{region.strip()}}}$")
            if wrapped and not isinstance(wrapped[0], str):
                return wrapped
    if not pred and (boxed := templates.last_boxed(region)) is not None and boxed.strip():
        pred = _parse(f"$\\boxed{{{boxed}}}$") or [boxed]
    return pred


def _extracted(pred: list) -> str:
    s = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    return s[:MAX_EXTRACTED]


def check_math_row(text: str | None, golds: list[str]) -> tuple[str | None, bool, str]:
    """(extracted, correct, status) of one row, in-process and without a deadline (workers call this)."""
    from math_verify import verify

    gold_parsed = [p for g in golds if g is not None and (p := _parse_gold(g))]
    if not gold_parsed:
        return None, False, "gold_unparsable"
    if text is None or not text.strip():
        return None, False, "no_answer"
    pred = _parse_pred(text)
    if not pred:
        return None, False, "no_answer"
    # gold first: verify is asymmetric (assignments and intervals are simplified on the gold side)
    correct = any(verify(g, pred, timeout_seconds=None) for g in gold_parsed)
    return _extracted(pred), correct, "ok" if correct else "wrong"


def _warmup() -> None:
    """Worker start: quiet math-verify (it warns that its timeout is off: ours is on, and logs every failed
    parse), then import and warm up sympy / latex2sympy before the first row."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _parse("$1$")


class MathPool(DeadlinePool):
    """Workers running `check_math_row` with a hard per-row deadline (variational/procpool.py); share one
    across calls and shards: `with MathPool(4) as pool: check_answers(df, pool=pool)`."""

    def __init__(self, workers: int = 0, memory_mb: int = 4096):
        preload = ["math_verify", "latex2sympy2_extended.latex2sympy2"]
        super().__init__(check_math_row, workers, warmup=_warmup, preload=preload, memory_mb=memory_mb)


def _as_list(g: Any) -> list[str]:
    if g is None:
        return []
    return [g] if isinstance(g, str) else [x for x in g if x is not None]


def _require(df: pl.DataFrame, cols: Iterable[str], who: str) -> None:
    if missing := [c for c in cols if c not in df.columns]:
        raise ValueError(f"{who}: input lacks columns {missing}; it has {df.columns}")


def _with_verdicts(df: pl.DataFrame, rows: list[tuple], verifier: str) -> pl.DataFrame:
    cols = list(zip(*rows, strict=True)) if rows else [[], [], [], [], []]
    return df.with_columns(
        pl.Series("extracted", cols[0], pl.String),
        pl.Series("correct", cols[1], pl.Boolean),
        pl.Series("status", cols[2], pl.String),
        pl.Series("verifier", [verifier] * df.height, pl.String),
        pl.Series("elapsed_ms", cols[3], pl.Float64),
    )


def check_answers(
    df: pl.DataFrame, timeout_s: float = 5.0, workers: int = 0, *, pool: MathPool | None = None
) -> pl.DataFrame:
    """df[text, gold (list of accepted answers, or one string)] -> df + extracted, correct, status,
    verifier, elapsed_ms. Every row returns within timeout_s + HARD_GRACE_S (+ a process kill)."""
    _require(df, ("text", "gold"), "check_answers")
    items = [(t, _as_list(g)) for t, g in zip(df["text"].to_list(), df["gold"].to_list(), strict=True)]
    own = pool is None
    pool = pool or MathPool(min(workers or cpu_count(), max(1, len(items))))
    try:
        outcomes = pool.run(items, timeout_s, desc="verify math")
    finally:
        if own:
            pool.close()
    _log_errors(items, outcomes)
    return _with_verdicts(df, [_math_verdict(o) for o in outcomes], MATH_VERIFIER)


def _math_verdict(o: Outcome) -> tuple:
    if o.status == "ok":
        return (*o.value, o.elapsed_ms)
    return None, False, o.status, o.elapsed_ms  # timeout / error


def _log_errors(items: list[tuple], outcomes: list[Outcome]) -> None:
    errors = [(i, o.error) for i, o in enumerate(outcomes) if o.status == "error"]
    for i, err in errors[:5]:
        logger().warning("check_answers: row %d (text %r) failed: %s", i, (items[i][0] or "")[:80], err)
    if len(errors) > 5:
        logger().warning("check_answers: %d more rows failed", len(errors) - 5)


# ================================================================ code: stdin/stdout tests in a sandbox
def check_code_row(text: str | None, tests: list[dict] | None, timeout_s: float, memory_mb: int) -> tuple:
    """(extracted code, correct, status, elapsed_ms) of one row; stops at the first failing test."""
    t0 = time.perf_counter()
    code = last_code_block(text)
    tests = [t for t in (tests or []) if t is not None]
    if not tests:
        status = "gold_unparsable"  # nothing to check against: skip it like an unparsable gold
    elif code is None:
        status = "no_answer"
    else:
        try:
            status = run_tests(code, tests, timeout_s, memory_mb)
        except Exception as e:  # the sandbox itself failed (no temp dir, no python): say so, go on
            logger().warning("check_code: running %r... failed: %s", (code or "")[:80], e)
            status = "error"
    return code, status == "ok", status, (time.perf_counter() - t0) * 1e3


def check_code(
    df: pl.DataFrame, timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 0
) -> pl.DataFrame:
    """df[text, tests (list of {input, output})] -> df + extracted (the code), correct (all tests pass),
    status, verifier, elapsed_ms. Rows run in parallel threads, each test in its own sandboxed process."""
    _require(df, ("text", "tests"), "check_code")
    rows = list(zip(df["text"].to_list(), df["tests"].to_list(), strict=True))
    n_threads = max(1, min(workers or cpu_count(), len(rows)))
    with ThreadPoolExecutor(n_threads) as ex:
        it = ex.map(lambda r: check_code_row(r[0], r[1], timeout_s, memory_mb), rows)
        results = list(tqdm(it, total=len(rows), desc="verify code", unit="row", disable=len(rows) < 200))
    return _with_verdicts(df, results, CODE_VERIFIER)


# ================================================================ the stage
_ROW = "__verify_row"


def verify(
    rollouts: pl.DataFrame, problems: pl.DataFrame, cfg: VerifyConfig, *, pool: MathPool | None = None
) -> pl.DataFrame:
    """rollouts[prompt_idx, (sample_idx, rollout_idx, round,) text] + problems[prompt_idx, kind, gold, tests]
    -> verdicts: the rollout keys + extracted, correct, status, verifier, elapsed_ms, in rollout order.
    kind "code" rows run their tests; every other row goes to math-verify against `gold`."""
    _require(rollouts, ("prompt_idx", "text"), "verify: rollouts")
    _require(problems, ("prompt_idx", "gold"), "verify: problems")
    keys = [k for k in KEYS if k in rollouts.columns]
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
        parts.append(
            check_answers(math_rows.select(_ROW, "text", "gold"), cfg.timeout_s, cfg.workers, pool=pool)
        )
    if code_rows.height:
        parts.append(
            check_code(
                code_rows.select(_ROW, "text", "tests"), cfg.code_timeout_s, cfg.code_memory_mb, cfg.workers
            )
        )
    verdicts = (
        pl.concat([p.select(_ROW, *VERDICT_SCHEMA) for p in parts])
        if parts
        else pl.DataFrame(schema={_ROW: pl.UInt32, **VERDICT_SCHEMA})
    )
    return joined.select(_ROW, *keys).join(verdicts, on=_ROW, how="left").sort(_ROW).drop(_ROW)


def verdict_summary(verdicts: pl.DataFrame) -> str:
    """Markdown: accuracy and rows per status (the artifact of the task)."""
    n = verdicts.height
    scored = verdicts.filter(pl.col("status") != "gold_unparsable")
    acc = scored["correct"].mean() if scored.height else float("nan")
    counts = dict(verdicts.group_by("status").len().iter_rows())
    lines = [
        f"accuracy **{acc:.3f}** over {scored.height} scored rows ({n} in all)\n",
        "| status | rows | share |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {counts.get(s, 0)} | {counts.get(s, 0) / max(n, 1):.3f} |" for s in STATUSES]
    return "\n".join(lines) + "\n"


def _fingerprint(
    stage: str, cfg: dict, upstream: dict[str, dict], inputs: tuple[str, str], round_: int
) -> str:
    conf = RunConfig.model_validate(cfg).verify
    return fingerprint(
        stage,
        code=code_version(sys.modules[__name__], templates),
        # workers changes speed, not verdicts
        config=conf.model_dump(include={"timeout_s", "code_timeout_s", "code_memory_mb", "shard_size"}),
        upstream={name: upstream[name]["fingerprint"] for name in inputs},
        round=round_,
    )


def fingerprint_of(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    return _fingerprint(STAGE, cfg, upstream, ("rollouts", "problems"), round_)


def _run_stage(
    stage: str, cfg: dict, fp: str, upstream: dict[str, dict], items_key: str, round_: int
) -> dict:
    """The task body shared by verify and verify_prior: reuse, or verify `upstream[items_key]` by shards."""
    conf = RunConfig.model_validate(cfg).verify
    store = open_store(cfg, stage, fp)
    if store.is_complete():
        return reuse_stage(store, round_)
    items, problems = read_stage(upstream[items_key]), read_stage(upstream["problems"])
    if "text" not in items.columns and "response" in items.columns:  # prior samples: full completions
        items = items.rename({"response": "text"})
    with MathPool(conf.workers) as pool:  # one pool for all shards; workers start on the first math row
        run_shards(store, items, conf.shard_size, lambda part: verify(part, problems, conf, pool=pool))
    return finish_stage(store, round_, rows_in=items.height, summary=verdict_summary(store.read()))


@stage_task(STAGE, fingerprint_of)
def verify_task(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict:
    """rollouts + problems -> verdicts, sharded over the rollouts (resumable)."""
    return _run_stage(STAGE, cfg, fingerprint_of(cfg, upstream, round_), upstream, "rollouts", round_)


PRIOR_STAGE = "verify_prior"


def prior_fingerprint_of(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    return _fingerprint(PRIOR_STAGE, cfg, upstream, ("prior_samples", "problems"), round_)


@stage_task(PRIOR_STAGE, prior_fingerprint_of)
def verify_prior_task(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict:
    """prior_samples (full pi_theta completions in `text` or `response`) + problems -> their verdicts: the
    accuracies w_m of Eq.9 (method.md §1, the forward-KL posterior update)."""
    fp = prior_fingerprint_of(cfg, upstream, round_)
    return _run_stage(PRIOR_STAGE, cfg, fp, upstream, "prior_samples", round_)


# ================================================================ verifier report (labelled pairs)
PAIR_FILES = {
    "math_verify": "verify_pairs_math_verify_tests.jsonl",
    "hendrycks_is_equiv": "verify_pairs_hendrycks_is_equiv_tests.jsonl",
}


def load_pairs(path: Path) -> pl.DataFrame:
    """A verify_pairs_*.jsonl file -> id, text (the prediction), gold (list of one), label, verifier_config."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pl.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "text": [r["prediction"] for r in rows],
            "gold": [[r["gold"]] for r in rows],
            "label": [bool(r["label"]) for r in rows],
            "verifier_config": [json.dumps(r.get("verifier_config") or {}, sort_keys=True) for r in rows],
        },
        schema_overrides={"gold": pl.List(pl.String)},
    )


def verifier_report(
    data_dir: Path, timeout_s: float = 5.0, *, pool: MathPool | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """check_answers on the labelled pairs -> (agreement per file, the disagreeing rows).

    The math_verify pairs carry the per-row `verifier_config` their unit test used (match types, float
    precision, strict, set-relation comparison); we run ONE config for all rows, so those rows can differ."""
    paths = {name: Path(data_dir) / f for name, f in PAIR_FILES.items()}
    if missing := [str(p) for p in paths.values() if not p.exists()]:
        raise FileNotFoundError(f"verifier_report: {missing} not found; pass --data-dir (shared/data)")
    frames = [load_pairs(p).with_columns(pl.lit(name).alias("file")) for name, p in paths.items()]
    pairs = pl.concat(frames)
    t0 = time.perf_counter()
    checked = check_answers(pairs, timeout_s, pool=pool)
    wall = time.perf_counter() - t0
    checked = checked.with_columns((pl.col("correct") == pl.col("label")).alias("agree"))
    agreement = (
        checked.group_by("file", maintain_order=True)
        .agg(
            pl.len().alias("pairs"),
            pl.col("agree").sum().alias("agree"),
            pl.col("agree").mean().alias("agreement"),
            (pl.col("correct") & ~pl.col("label")).sum().alias("false_accept"),
            (~pl.col("correct") & pl.col("label")).sum().alias("false_reject"),
            pl.col("status").is_in(["timeout", "error"]).sum().alias("timeout_or_error"),
        )
        .with_columns(pl.lit(round(wall, 2)).alias("wall_s"))  # all files together, worker start included
    )
    disagreements = checked.filter(~pl.col("agree")).select(
        "file", "id", "label", "correct", "status", "extracted", "gold", "text", "verifier_config"
    )
    return agreement, disagreements


def format_verifier_report(agreement: pl.DataFrame, disagreements: pl.DataFrame) -> str:
    """The two frames as plain text for the CLI."""
    lines = ["agreement with the labelled pairs (one math-verify config for all rows):"]
    for r in agreement.iter_rows(named=True):
        lines.append(
            f"  {r['file']:<20} {r['agree']:>4}/{r['pairs']:<4} = {r['agreement']:.3f}   "
            f"false accept {r['false_accept']}, false reject {r['false_reject']}, "
            f"timeout/error {r['timeout_or_error']}"
        )
    if agreement.height:
        lines.append(f"  ({agreement['wall_s'][0]} s in all, worker start included)")
    lines.append(f"\n{disagreements.height} disagreements:")
    for r in disagreements.iter_rows(named=True):
        text = r["text"] if len(r["text"]) <= 80 else "..." + r["text"][-77:]
        lines.append(
            f"  [{r['file']}] {r['id']}: label={r['label']} ours={r['correct']} ({r['status']}) "
            f"gold={r['gold'][0]!r} pred={text!r} extracted={r['extracted']!r} config={r['verifier_config']}"
        )
    return "\n".join(lines)
