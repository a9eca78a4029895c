"""Our math grader: plain math-verify plus the rules `MathRules` lists, run in worker processes.

In: one model output (full solution text or a bare answer) and its accepted gold answers. Out:
(extracted, correct, status) per row (`check_math_row`); `MathPool` runs it with a hard per-row deadline
(variational/verifiers/procpool.py): math-verify's own timeouts use SIGALRM (main thread only) and a parse
can hang, so every row has a soft deadline inside its worker and a hard one in the parent.
math_verify is imported here only, and lazily (in the workers), so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass

from variational import templates
from variational.verifiers.procpool import DeadlinePool

MAX_REGION = 20_000  # chars handed to math-verify; the answer is at the end (see _answer_region)
MAX_EXTRACTED = 2_000
# LaTeX delimiters: text that has one is parsed as is; a bare answer without any is wrapped in $\boxed{}$
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
_COMMAND = re.compile(r"\\+[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*")  # spaces removed: "1,22", "7,425,000", "-2,1"


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
    """Workers running `check_math_row` with a hard per-row deadline (variational/verifiers/procpool.py); share one
    across calls and shards: `with MathPool(4) as pool: check_answers(df, pool=pool)`."""

    def __init__(self, workers: int = 0, memory_mb: int = 4096):
        preload = ["math_verify", "latex2sympy2_extended.latex2sympy2"]
        super().__init__(check_math_row, workers, warmup=_warmup, preload=preload, memory_mb=memory_mb)
