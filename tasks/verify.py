"""Stage `verify`: is each answer rollout right? math-verify for math (gold first), stdin/stdout tests for code.

In:  rollouts (prompt_idx, sample_idx, rollout_idx, [round], text), problems (prompt_idx, kind, gold, tests).
Out: table `verdicts`: the rollout keys plus extracted, correct, status, verifier, elapsed_ms (design.md).
     status: ok / wrong / no_answer / timeout / error / gold_unparsable; code rows also runtime_error /
     compile_error / no_code / sandbox_violation.

Pieces (design.md "Verifier contract"):
- `check_answers(df[text, gold])`: math-verify run by `MathPool` worker processes (variational/procpool.py):
  math-verify's own timeouts use SIGALRM (main thread only) and a parse can hang, so every row has a soft
  deadline inside its worker and a hard one in the parent (the worker is killed and replaced). `MathRules`
  lists what it adds to plain math-verify, each rule kept for what it wins on labelled pairs.
- `check_code(df[text, tests])`: the last fenced ```python block on the APPS/TACO `input_output` tests, by
  the official checker's rules (variational/apps_check.py), in the sandbox of variational/sandbox.py.
- `verify` (the stage core), `verify_task` / `verify_prior_task` (Prefect wrappers), `verifier_report`
  (plain math-verify's and our agreement with the labelled sets of shared/data; CLI `verifier-report`).
math_verify is imported here only, and lazily (in the workers), so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from variational import apps_check, templates
from variational.apps_check import last_code_block
from variational.config import VerifyConfig
from variational.procpool import HARD_GRACE_S, DeadlinePool, Outcome, cpu_count
from variational.runner import Engine, Inputs, Stage, logger

__all__ = ["HARD_GRACE_S", "last_code_block"]  # re-exported for callers and tests

STATUSES = ("ok", "wrong", "no_answer", "timeout", "error", "gold_unparsable")
# code rows add these (variational/apps_check.py); verdict_summary counts both sets
CODE_STATUSES = ("runtime_error", "compile_error", "no_code", "sandbox_violation")
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
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*")  # spaces removed: "1,22", "7,425,000", "-2,1"


# ================================================================ math: what a worker runs
@dataclass(frozen=True)
class MathRules:
    """Our rules on top of plain `math_verify.verify(parse(gold), parse(pred))`, each switchable so that
    `variational verifier-report --ablate` measures what it wins on the labelled pairs of shared/data.
    `OURS` (all on) is the verifier of the stage; `PLAIN` (all off) is math-verify with its default configs.
    Agreement gained per rule (math_verify / hendrycks / longcot pairs; bench/RESULTS.md 2026-11-29):"""

    gold_wrap: bool = True  # a bare gold is read as LaTeX: +0 / +4 / +30 (interval, matrix, choice golds)
    bare_answer: bool = True  # a bare one-line answer is read as LaTeX: +0 / +3 / +0
    comma_both: bool = True  # a bare "1,22" is both 1.22 and the list {1, 22}: +2 / +0 / +0
    # +0 everywhere, kept for a stated reason:
    solution_section: bool = True  # a \boxed in the thought must not beat the solution's own answer
    boxed_priority: bool = True  # the last \boxed wins, as in the official grader (SkyThought extract_answer)
    region_cap: bool = True  # a guard: parse time grows with the text, the answer is at its end

    def without(self, rule: str) -> MathRules:
        return dataclasses.replace(self, **{rule: False})


RULES = tuple(f.name for f in dataclasses.fields(MathRules))
OURS, PLAIN = MathRules(), MathRules(**dict.fromkeys(RULES, False))


def _parse(text: str, boxed_priority: bool = True) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # boxed_match_priority=0: a \boxed answer beats other candidates (math-verify's default 50 lets a later
    # "final answer is $x$" win); among equals the last one wins, and several \boxed in one display combine
    # into a set. Timeouts are the pool's (its SIGALRM), so math-verify's own are off.
    latex = LatexExtractionConfig(boxed_match_priority=0) if boxed_priority else LatexExtractionConfig()
    return parse(text, [latex, ExprExtractionConfig()], parsing_timeout=None)


@functools.lru_cache(maxsize=8192)  # golds repeat over the K x M rollouts of a prompt
def _parse_gold(gold: str, rules: MathRules = OURS) -> list:
    s = gold.strip()
    if not s:
        return []
    if rules.gold_wrap and not _DELIMITED.search(s):
        return _parse_bare(s, rules)
    return _parse(s, rules.boxed_priority)


def _read_all(parsed: list, s: str) -> bool:
    """Did the plain parse read all of the bare answer `s` (its extracted string is `s`, spaces aside)?"""
    return bool(parsed) and isinstance(parsed[-1], str) and _squeeze(parsed[-1]) == _squeeze(s)


def _read_as_number(parsed: list, s: str) -> bool:
    """Is `s` digits with separators ("1,22", "-2,1") that the plain parse read as one number?"""
    digits = functools.partial(re.sub, r"\D", "")
    want = _squeeze(s)
    return (
        bool(parsed)
        and isinstance(parsed[-1], str)
        and _NUMBER.fullmatch(want) is not None
        and digits(parsed[-1]) == digits(want)
    )


def _squeeze(s: str) -> str:
    return re.sub(r"\s", "", s)


def _parse_bare(s: str, rules: MathRules) -> list:
    """A LaTeX answer without delimiters ("\\frac{3}{4}i", "10, 4, -2", "(1,2]"): only the expression
    extractor sees it, and it stops at the first LaTeX command or comma ("\\frac{3}{4}i" -> 3/4): unless
    it read all of it, read the answer as boxed LaTeX, falling back to the plain parse."""
    plain = _parse(s, rules.boxed_priority)
    if _read_all(plain, s):
        return plain
    wrapped = _parse(f"$\\boxed{{{s}}}$", rules.boxed_priority)
    if wrapped and rules.comma_both and _read_as_number(plain, s):
        # "1,22" is 1.22 with a decimal comma (math-verify's reading) or the list {1, 22} (how MATH and
        # OlympiadBench golds write several answers: "-2,1", "11,13"): both readings are accepted
        return plain + wrapped
    return wrapped or plain


def _answer_region(text: str, rules: MathRules = OURS) -> str:
    """The solution section when there is one, capped to its last MAX_REGION chars (extended back to the
    start of the line holding the last \\boxed, so a boxed answer and its $...$ pairs stay whole)."""
    sol = templates.extract_solution(text) if rules.solution_section else None
    region = sol if sol and sol.strip() else text
    if not rules.region_cap or len(region) <= MAX_REGION:
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


def _parse_pred(text: str, rules: MathRules = OURS) -> list:
    region = _answer_region(text, rules)
    if rules.bare_answer and _looks_bare(region):
        return _parse_bare(region.strip(), rules)
    return _parse(region, rules.boxed_priority)


def _extracted(pred: list) -> str:
    s = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    return s[:MAX_EXTRACTED]


def check_math_row(
    text: str | None, golds: list[str], rules: MathRules = OURS
) -> tuple[str | None, bool, str]:
    """(extracted, correct, status) of one row, in-process and without a deadline (workers call this)."""
    from math_verify import verify

    gold_parsed = [p for g in golds if g is not None and (p := _parse_gold(g, rules))]
    if not gold_parsed:
        return None, False, "gold_unparsable"
    if text is None or not text.strip():
        return None, False, "no_answer"
    pred = _parse_pred(text, rules)
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
    df: pl.DataFrame,
    timeout_s: float = 5.0,
    workers: int = 0,
    *,
    pool: MathPool | None = None,
    rules: MathRules = OURS,
) -> pl.DataFrame:
    """df[text, gold (list of accepted answers, or one string)] -> df + extracted, correct, status,
    verifier, elapsed_ms. Every row returns within timeout_s + HARD_GRACE_S (+ a process kill).
    `rules` is for measuring the verifier (verifier_report); the stage uses the default."""
    _require(df, ("text", "gold"), "check_answers")
    texts, golds = df["text"].to_list(), df["gold"].to_list()
    items = [(t, _as_list(g), rules) for t, g in zip(texts, golds, strict=True)]
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


# ================================================================ code: APPS/TACO tests in the sandbox
def check_code_row(
    text: str | None,
    tests: Any,
    timeout_s: float,
    memory_mb: int,
    official_quirks: bool = False,
    max_processes: int = 64,
) -> tuple:
    """(extracted code, correct, status, elapsed_ms) of one row (variational/apps_check.py judges it)."""
    t0 = time.perf_counter()
    try:
        v = apps_check.judge(text, tests, timeout_s, memory_mb, max_processes, official_quirks)
    except Exception as e:  # the sandbox itself failed (cannot start, bad harness reply): say so, go on
        logger().warning("check_code: judging %r... failed: %s", (text or "")[-80:], e)
        v = apps_check.Verdict("error", False, apps_check.last_code_block(text, official_quirks))
    if v.status == "error":
        logger().warning("check_code: %s", v.detail)
    return v.code, v.correct, v.status, (time.perf_counter() - t0) * 1e3


def check_code(
    df: pl.DataFrame,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 0,
    official_quirks: bool = False,
    max_processes: int = 64,
) -> pl.DataFrame:
    """df[text, tests] -> df + extracted (the program), correct, status, verifier, elapsed_ms.

    `tests`: the APPS/TACO `input_output` JSON string as stored (stdin form, or call form with fn_name), or
    the older list of {input, output}. `timeout_s` is per test. Status: ok / wrong / timeout /
    runtime_error / compile_error / no_code / sandbox_violation; gold_unparsable when a row has no usable
    tests (skipped, like a math row without gold); error when the sandbox failed. A crash, timeout or
    compile failure is wrong unless `official_quirks` (the official np.all verdict, method.md §9).
    Rows run in parallel threads, each in its own sandbox (variational/sandbox.py)."""
    _require(df, ("text", "tests"), "check_code")
    rows = list(zip(df["text"].to_list(), df["tests"].to_list(), strict=True))
    n_threads = max(1, min(workers or cpu_count(), len(rows)))

    def one(row: tuple) -> tuple:
        return check_code_row(row[0], row[1], timeout_s, memory_mb, official_quirks, max_processes)

    with ThreadPoolExecutor(n_threads) as ex:
        it = ex.map(one, rows)
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
                code_rows.select(_ROW, "text", "tests"),
                cfg.code_timeout_s,
                cfg.code_memory_mb,
                cfg.workers,
                official_quirks=cfg.code_official_quirks,
                max_processes=cfg.code_max_processes,
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
    lines += [
        f"| {s} | {counts.get(s, 0)} | {counts.get(s, 0) / max(n, 1):.3f} |"
        for s in (*STATUSES, *CODE_STATUSES)
    ]
    return "\n".join(lines) + "\n"


def _declare(name: str, items: str) -> Stage:
    """verdicts (of rollouts) and prior_verdicts (of prior samples: the weights w_m of Eq.9) are the same
    stage on different items, sharded over them, with one MathPool for all shards."""

    def plan(i: Inputs) -> pl.DataFrame:
        rows = i.table(items)
        return rows.rename({"response": "text"}) if "text" not in rows.columns else rows

    def shard(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
        return verify(part, i.table("problems"), i.conf.verify, pool=engine.get())

    return Stage(
        name=name,
        inputs=(items, "problems"),
        # verify.workers changes speed, not verdicts
        fields=(
            "verify.timeout_s",
            "verify.code_timeout_s",
            "verify.code_memory_mb",
            "verify.code_max_processes",
            "verify.code_official_quirks",
            "verify.shard_size",
        ),
        uses=("verify",),
        code=(
            "variational.templates",
            "variational.sandbox",
            "variational.apps_check",
            "variational.apps_harness",
        ),
        plan=plan,
        shard=shard,
        shard_size="verify.shard_size",
        engine=lambda i: MathPool(i.conf.verify.workers),  # workers start on the first math row
        summary=lambda i, verdicts: verdict_summary(verdicts),
    )


VERDICTS = _declare("verdicts", "rollouts")
PRIOR_VERDICTS = _declare("prior_verdicts", "prior_samples")


# ================================================================ verifier report (labelled pairs)
LABELLED_SETS = {  # shared/data SOURCES.md §2-§3
    "math_verify": "verify_pairs_math_verify_tests.jsonl",  # math-verify's own unit-test expectations
    "hendrycks_is_equiv": "verify_pairs_hendrycks_is_equiv_tests.jsonl",  # MATH's string is_equiv tests
    "longcot_skyt1": "longcot_skyt1_format_model_outputs.jsonl",  # SkyThought grader verdicts: noisier
}
VERIFIERS = {"plain": PLAIN, "ours": OURS}  # plain: math_verify.verify(parse(gold), parse(pred)), defaults
DISAGREEMENT_COLUMNS = [
    "set", "id", "label", "ours", "status", "plain", "extracted", "plain_extracted", "gold", "text", "verifier_config"
]  # fmt: skip


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


def load_longcot(path: Path) -> pl.DataFrame:
    """longcot_skyt1_format_model_outputs.jsonl -> the load_pairs columns; text is the whole Sky-T1 completion
    (thought and solution, as verify_prior reads them) and label the SkyThought grader's verdict."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    begin = templates.BEGIN_THOUGHT + templates.SEP
    return pl.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "text": [begin + templates.pi_response(r["think"], r["solution"]) for r in rows],
            "gold": [[r["answer"]] for r in rows],
            "label": [bool(r["correct"]) for r in rows],
            "verifier_config": ["{}"] * len(rows),
        },
        schema_overrides={"gold": pl.List(pl.String)},
    )


def load_labelled(data_dir: Path, sets: Iterable[str] = tuple(LABELLED_SETS)) -> pl.DataFrame:
    """The labelled sets of shared/data, concatenated with a `set` column."""
    if unknown := [s for s in sets if s not in LABELLED_SETS]:
        raise ValueError(f"verifier_report: unknown sets {unknown}; choose from {list(LABELLED_SETS)}")
    paths = {name: Path(data_dir) / LABELLED_SETS[name] for name in sets}
    if missing := [str(p) for p in paths.values() if not p.exists()]:
        raise FileNotFoundError(f"verifier_report: {missing} not found; pass --data-dir (shared/data)")
    load = {name: load_longcot if name == "longcot_skyt1" else load_pairs for name in paths}
    return pl.concat([load[name](p).with_columns(pl.lit(name).alias("set")) for name, p in paths.items()])


def verifier_report(
    data_dir: Path,
    timeout_s: float = 5.0,
    *,
    sets: Iterable[str] = tuple(LABELLED_SETS),
    ablate: bool = False,
    pool: MathPool | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Plain math-verify and ours (and, with `ablate`, ours without each rule) on the labelled sets ->
    (agreement per set and verifier, the rows where plain or ours disagree with the label).

    The math_verify pairs carry the per-row `verifier_config` their unit test used (match types, float
    precision, strict, set-relation comparison); both verifiers run ONE config for all rows."""
    pairs = load_labelled(data_dir, sets)
    variants = dict(VERIFIERS)
    if ablate:
        variants |= {f"without {rule}": OURS.without(rule) for rule in RULES}
    own = pool is None
    pool = pool or MathPool(min(cpu_count(), max(1, pairs.height)))
    checked, stats = {}, []
    try:
        for name, rules in variants.items():
            t0 = time.perf_counter()
            out = check_answers(pairs, timeout_s, pool=pool, rules=rules)
            checked[name] = out.with_columns((pl.col("correct") == pl.col("label")).alias("agree"))
            stats.append(_agreement(checked[name], name, time.perf_counter() - t0))
    finally:
        if own:
            pool.close()
    ours, plain = checked["ours"], checked["plain"]
    disagreements = (
        ours.rename({"correct": "ours"})
        .with_columns(
            plain["correct"].alias("plain"),
            plain["extracted"].alias("plain_extracted"),
            plain["agree"].alias("plain_agree"),
        )
        .filter(~pl.col("agree") | ~pl.col("plain_agree"))
        .select(DISAGREEMENT_COLUMNS)
    )
    return pl.concat(stats), disagreements


def _agreement(checked: pl.DataFrame, verifier: str, wall_s: float) -> pl.DataFrame:
    return (
        checked.group_by("set", maintain_order=True)
        .agg(
            pl.len().alias("pairs"),
            pl.col("agree").sum().alias("agree"),
            pl.col("agree").mean().alias("agreement"),
            (pl.col("correct") & ~pl.col("label")).sum().alias("false_accept"),
            (~pl.col("correct") & pl.col("label")).sum().alias("false_reject"),
            pl.col("status").is_in(["timeout", "error"]).sum().alias("timeout_or_error"),
        )
        .select(pl.lit(verifier).alias("verifier"), pl.all(), pl.lit(round(wall_s, 2)).alias("wall_s"))
    )


def format_verifier_report(agreement: pl.DataFrame, disagreements: pl.DataFrame) -> str:
    """The two frames as plain text for the CLI: per set, plain math-verify next to ours."""
    by = {(r["set"], r["verifier"]): r for r in agreement.iter_rows(named=True)}
    sets = list(dict.fromkeys(agreement["set"]))

    def cell(r: dict) -> str:
        return f"{r['agree']}/{r['pairs']} = {r['agreement']:.3f}"

    lines = [
        "agreement with the labelled pairs (one math-verify config for all rows):",
        f"  {'set':<20} {'plain math-verify':<20} {'ours':<20} ours: false accept / false reject / timeout+error",
    ]
    for s in sets:
        o = by[s, "ours"]
        lines.append(
            f"  {s:<20} {cell(by[s, 'plain']):<20} {cell(o):<20} "
            f"{o['false_accept']} / {o['false_reject']} / {o['timeout_or_error']}"
        )
    walls = dict(agreement.select("verifier", "wall_s").unique(maintain_order=True).iter_rows())
    lines.append(f"  ({walls['plain']} s plain, {walls['ours']} s ours, worker start included)")
    if ablated := [v for v in walls if v not in VERIFIERS]:
        lines.append("\nours with one rule off (agreement, change against ours):")
        for v in ablated:
            diffs = {s: by[s, v]["agree"] - by[s, "ours"]["agree"] for s in sets}
            cells = [f"{s} {by[s, v]['agree']} ({diffs[s]:+d})" for s in sets]
            lines.append(f"  {v:<26} " + "   ".join(cells))
    lines.append(f"\n{disagreements.height} rows where plain math-verify or ours disagree with the label:")
    for r in disagreements.iter_rows(named=True):
        text = r["text"] if len(r["text"]) <= 80 else "..." + r["text"][-77:]
        lines.append(
            f"  [{r['set']}] {r['id']}: label={r['label']} ours={r['ours']} ({r['status']}) "
            f"plain={r['plain']} gold={r['gold'][0]!r} pred={text!r} extracted={r['extracted']!r} "
            f"plain_extracted={r['plain_extracted']!r} config={r['verifier_config']}"
        )
    return "\n".join(lines)
