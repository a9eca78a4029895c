"""The verifier contract (design.md): `check_answers` for math, `check_code` for programs.

In:  df[text, gold] (math) or df[text, tests] (code: the APPS/TACO `input_output` JSON string).
Out: the input rows plus extracted, correct, status, verifier, elapsed_ms.
     status: ok / wrong / no_answer / timeout / error / gold_unparsable; code rows also runtime_error /
     compile_error / no_code / sandbox_violation.
Math has two graders (`GRADERS`, variational/registry.py), same columns:
  - "strict" (default): math-verify with our rules (variational/verifiers/math_rules.py, `MathPool`);
    verifier "math_verify". A row whose golds do not parse is gold_unparsable: skip it, it is not scored.
  - "official": the official harness's math verdict (SkyThought extract_answer -> strip_answer_string ->
    math_equal; variational/verifiers/official_math.py, `OfficialMathPool`); verifier "official_math".
    `gold_form` says how the golds are written, hence how the official code reads them: "answer" (a bare
    final answer, as benchmarks store it: the eval handlers' reading) or "solution" (a whole reference
    solution: verify_parallel.py's reading, with its "he answer is" and last-number fallbacks). Each gold
    is one pair with its own `timeout_s` (officially 5 s per pair in rollout verification); the row is
    correct when ANY gold matches (the official OR over source ground truth and reference answer).
    Statuses: ok (a gold matched); gold_unparsable (no gold, or every gold reads as ""); timeout / error
    (no gold matched and a pair ran out of time or raised); no_answer (the output reads as ""); wrong.
    Officially a timeout, an error or an unreadable gold is simply wrong: in official mode count EVERY
    row, `correct` as returned (False for all of those), and drop none.
Math rows go to the pool's worker processes, with a hard per-item deadline; code rows to the official
checker's rules (variational/verifiers/apps_check.py) inside the sandbox (variational/verifiers/sandbox.py).
`tasks.verify` re-exports both functions: that is the public entry point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import polars as pl
from tqdm.auto import tqdm

from variational import registry
from variational.config import ConfigError
from variational.verifiers import apps_check, official_math
from variational.verifiers.math_rules import OURS, MathPool, MathRules
from variational.verifiers.official_math import GoldForm, OfficialMathPool
from variational.verifiers.procpool import Outcome, cpu_count
from variational.verifiers.sandbox import resolve_mode

log = logging.getLogger("variational")
# the modules whose code decides a verdict: in the fingerprint of every stage that grades
GRADING_CODE = (
    "variational.templates",
    "variational.verifiers.answers",
    "variational.verifiers.math_rules",
    "variational.verifiers.official_answer",
    "variational.verifiers.official_latex",
    "variational.verifiers.official_math",
    "variational.verifiers.apps_check",
    "variational.verifiers.lcb_check",
    "variational.verifiers.harness",
    "variational.verifiers.protocol",
    "variational.verifiers.sandbox",
)

STATUSES = ("ok", "wrong", "no_answer", "timeout", "error", "gold_unparsable")
# code rows add these (variational/verifiers/apps_check.py); verdict_summary counts both sets
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
VERIFIER_OF_GRADER = {"strict": MATH_VERIFIER, "official": "official_math"}
Grader = Literal[registry.GRADERS]

# the verifier of code rows judged with verify.sandbox: none (no isolation): the rows say so themselves
UNSANDBOXED_CODE_VERIFIER = "code_tests_unsandboxed"


def unsandboxed_warning(verdicts: pl.DataFrame) -> str:
    """One markdown line when some code rows of `verdicts` were judged without isolation, else ""."""
    if "verifier" not in verdicts.columns:
        return ""
    n = verdicts.filter(pl.col("verifier") == UNSANDBOXED_CODE_VERIFIER).height
    if not n:
        return ""
    return (
        f"**Warning: {n} code rows were judged WITHOUT a sandbox** (verify.sandbox: none): their programs "
        "could read this machine's files, the expected outputs among them, and reach the network.\n"
    )


def _as_list(g: Any) -> list[str]:
    if g is None:
        return []
    return [g] if isinstance(g, str) else [x for x in g if x is not None]


def require(df: pl.DataFrame, cols: Iterable[str], who: str) -> None:
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
    pool: MathPool | OfficialMathPool | None = None,
    rules: MathRules = OURS,
    grader: Grader = "strict",
    gold_form: GoldForm = "answer",
) -> pl.DataFrame:
    """df[text, gold (list of accepted answers, or one string)] -> df + extracted, correct, status,
    verifier, elapsed_ms (module docstring: the two graders, their statuses). Every item returns within
    timeout_s + HARD_GRACE_S (+ a process kill); an item is a row (strict) or a (row, gold) pair (official).
    `pool`: a MathPool (strict) or OfficialMathPool (official) to share over calls; `rules` (strict only)
    is for measuring the verifier (verifier_report); the stages use the default."""
    require(df, ("text", "gold"), "check_answers")
    if grader not in registry.GRADERS:
        raise ValueError(f"check_answers: unknown grader {grader!r}; choose from {list(registry.GRADERS)}")
    pool_type = OfficialMathPool if grader == "official" else MathPool
    if pool is not None and not isinstance(pool, pool_type):
        raise ValueError(
            f"check_answers: grader {grader!r} needs a {pool_type.__name__}, got {type(pool).__name__}"
        )
    golds = [_as_list(g) for g in df["gold"].to_list()]
    if grader == "official":
        items = [(t, g, gold_form) for t, row in zip(df["text"].to_list(), golds, strict=True) for g in row]
    else:
        items = [(t, row, rules) for t, row in zip(df["text"].to_list(), golds, strict=True)]
    own = pool is None
    pool = pool or pool_type(min(workers or cpu_count(), max(1, len(items))))
    try:
        outcomes = pool.run(items, timeout_s, desc=f"verify math ({grader})")
    finally:
        if own:
            pool.close()
    _log_errors(items, outcomes)
    if grader == "official":
        verdicts = official_math.row_verdicts([len(row) for row in golds], outcomes)
    else:
        verdicts = [_math_verdict(o) for o in outcomes]
    return _with_verdicts(df, verdicts, VERIFIER_OF_GRADER[grader])


def _math_verdict(o: Outcome) -> tuple:
    if o.status == "ok":
        return (*o.value, o.elapsed_ms)
    return None, False, o.status, o.elapsed_ms  # timeout / error


def _log_errors(items: list[tuple], outcomes: list[Outcome]) -> None:
    errors = [(i, o.error) for i, o in enumerate(outcomes) if o.status == "error"]
    for i, err in errors[:5]:
        log.warning("check_answers: row %d (text %r) failed: %s", i, (items[i][0] or "")[:80], err)
    if len(errors) > 5:
        log.warning("check_answers: %d more rows failed", len(errors) - 5)


def check_code_row(
    text: str | None,
    tests: Any,
    timeout_s: float,
    memory_mb: int,
    official_quirks: bool = False,
    max_processes: int = 64,
    mode: str | None = None,
    problem_timeout_s: float | None = None,
    comparison: str = "apps",
) -> tuple:
    """(extracted code, correct, status, elapsed_ms) of one row (variational/verifiers/apps_check.py judges
    it). `mode`: a verify.sandbox setting (None: auto)."""
    t0 = time.perf_counter()
    try:
        v = apps_check.judge(
            text,
            tests,
            timeout_s,
            memory_mb,
            max_processes,
            official_quirks,
            mode,
            problem_timeout_s=problem_timeout_s,
            comparison=comparison,
        )
    except ConfigError:
        raise  # SandboxUnavailable among them: without isolation verification stops, it never goes on
    except Exception as e:  # the sandbox itself failed this once (cannot start, out of resources): go on
        log.warning("check_code: judging %r... failed: %s", (text or "")[-80:], e)
        v = apps_check.Verdict("error", False, apps_check.last_code_block(text, official_quirks))
    if v.status == "error":
        log.warning("check_code: %s", v.detail)
    return v.code, v.correct, v.status, (time.perf_counter() - t0) * 1e3


def check_code(
    df: pl.DataFrame,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 0,
    official_quirks: bool = False,
    max_processes: int = 64,
    sandbox: str = "auto",
    *,
    problem_timeout_s: float | None = None,
    comparison: str = "apps",
) -> pl.DataFrame:
    """df[text, tests] -> df + extracted (the program), correct, status, verifier, elapsed_ms.

    `tests`: the APPS/TACO `input_output` JSON string as stored (stdin form, or call form with fn_name), or
    the older list of {input, output}. `timeout_s` is per test. Status: ok / wrong / timeout /
    runtime_error / compile_error / no_code / sandbox_violation; gold_unparsable when a row has no usable
    tests (skipped, like a math row without gold; decided from the tests alone, before anything runs);
    error when the sandbox failed to start. A crash, timeout or compile failure is wrong unless
    `official_quirks` (the official np.all verdict, method.md §9).
    Rows run in parallel threads, each in its own sandbox (variational/verifiers/sandbox.py) of
    `sandbox` (verify.sandbox), resolved first: where it cannot be set up this raises SandboxUnavailable
    (variational/verifiers/sandbox.py) before any row runs. With "none" the rows' verifier is
    code_tests_unsandboxed.
    `problem_timeout_s` caps a problem's tests together (official: 11 s). `comparison="lcb"`: the
    LiveCodeBench harness's rules (variational/verifiers/lcb_check.py: its comparison, call rule, time budget)."""
    require(df, ("text", "tests"), "check_code")
    mode = resolve_mode(sandbox)
    rows = list(zip(df["text"].to_list(), df["tests"].to_list(), strict=True))
    n_threads = max(1, min(workers or cpu_count(), len(rows)))

    def one(row: tuple) -> tuple:
        return check_code_row(
            row[0],
            row[1],
            timeout_s,
            memory_mb,
            official_quirks,
            max_processes,
            mode,
            problem_timeout_s,
            comparison,
        )

    with ThreadPoolExecutor(n_threads) as ex:
        it = ex.map(one, rows)
        results = list(tqdm(it, total=len(rows), desc="verify code", unit="row", disable=len(rows) < 200))
    return _with_verdicts(df, results, CODE_VERIFIER if mode != "none" else UNSANDBOXED_CODE_VERIFIER)
