"""variational/verifiers/official_math.py and check_answers(grader="official"): the official harness's math
verdict (SkyThought math_equal), one literal example per official rule, gold reading, the OR over golds,
statuses, deadlines, and parse_expr kept from running code. Every expected verdict of the parametrized
cases was checked against SkyThought 0d190f1's own functions (run outside the repository)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tasks.verify import check_answers
from variational.verifiers.math_rules import MathPool
from variational.verifiers.official_math import OfficialMathPool, check_official_pair, math_equal


@pytest.fixture(scope="module")
def pool() -> Iterator[OfficialMathPool]:
    with OfficialMathPool(2) as p:
        yield p


def check(pool, rows: list[tuple[str | None, list[str] | None]], timeout_s: float = 5.0, **kwargs):
    df = pl.DataFrame(
        {"text": [r[0] for r in rows], "gold": [r[1] for r in rows]},
        schema_overrides={"gold": pl.List(pl.String)},
    )
    return check_answers(df, timeout_s=timeout_s, pool=pool, grader="official", **kwargs)


# ---------------------------------------------------------------- math_equal, rule by rule
@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("ABC", "abc", True),  # 1. equal strings, case aside
        ("", "", True),  # an empty prediction matches an empty gold (official quirk)
        ("(B)", "B", True),  # 2. multiple choice: the last standalone letter
        ("b", "B", True),
        ("A B", "A", False),  # the LAST letter counts
        ("0.5", "50", True),  # 3. gold / 100 ...
        ("5000", "50", True),  # ... and gold * 100 count (percentages)
        ("50", "50%", True),  # "x%" is x/100; 50 = 0.5 * 100
        ("3.14159", "3.1416", True),  # relative tolerance 1e-4
        ("3.14", "3.1416", False),
        ("1,000", "1000", True),  # commas dropped
        ("2", "3", False),  # two numbers: decided numerically, no symbolic check
        ("\\frac{1}{2}", "0.5", True),  # 7. symbolic: latex against a number
        ("(x+1)^2", "x^2+2x+1", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("\\frac{\\pi}{2}", "1.5708", True),  # numerically (N), within 1e-4
        ("x^2", "x^3", False),
        ("{1,2}", "(1,2)", True),  # 5. equal once brackets are dropped
        ("[1, 2)", "(1, 2]", True),  # intervals compared part by part: open/closed ignored
        ("(1, 2, 3)", "(1, 2)", False),
        ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1&2.0\\end{pmatrix}", True),  # cell by cell
        ("y=2x+1", "y-2x=1", True),  # 6. equations: l - (r) up to sign
        ("k=5", "5", True),  # a short "k = v" against a value
        ("abc=5", "5", False),
        ("", "5", False),  # 4. an empty prediction
    ],
)
def test_math_equal_rules(prediction: str, reference: str, expected: bool) -> None:
    assert math_equal(prediction, reference) is expected


# ---------------------------------------------------------------- one pair: reading, then math_equal
@pytest.mark.parametrize(
    ("text", "gold", "gold_form", "expected"),
    [
        ("so $\\boxed{0.5}$", "50", "answer", True),  # the issue's example: strict says wrong
        ("\\boxed{\\dfrac{3}{4}}", "0.75", "answer", True),
        ("The answer is 12.", "12", "answer", True),  # "he answer is"
        ("there are 3 cases and 12 ways", "12", "answer", True),  # last-number fallback
        ("\\boxed{12}. Check: 5 + 7 = 12, and 3 more.", "12", "answer", True),  # the box beats later numbers
        ("\\frac{1}{2}", "\\frac{1}{2}", "answer", False),  # a bare LaTeX output: its last number is 2
        ("\\boxed{2}", "\\frac{1}{2}", "solution", True),  # a gold read as a solution: its last number too
        ("\\boxed{7}", "Adding up, we need 7 more.", "solution", True),  # gold without \boxed: last number
        ("\\boxed{7}", "so the answer is 7, i.e. 3 + 4", "solution", False),  # "he answer is" read whole
        ("\\boxed{8}", "... hence $\\boxed{8}$. Check: 2^3 = 8, 1", "solution", True),  # the gold's last box
        ("\\boxed{C}", "(C)", "answer", True),  # choice cleaning on the gold side only after strip
    ],
)
def test_pairs_read_as_the_official_callers_read_them(
    text: str, gold: str, gold_form: str, expected: bool
) -> None:
    assert check_official_pair(text, gold, gold_form)[2] is expected  # type: ignore[arg-type]


def test_official_grader_differs_from_strict_on_the_issue_example(pool: OfficialMathPool) -> None:
    rows = [("Thus $\\boxed{0.5}$.", ["50"])]
    assert check(pool, rows)["correct"].to_list() == [True]
    with MathPool(1) as strict_pool:
        df = pl.DataFrame({"text": [rows[0][0]], "gold": [rows[0][1]]})
        assert check_answers(df, pool=strict_pool)["correct"].to_list() == [False]


# ---------------------------------------------------------------- rows: OR over golds, statuses
def test_rows_or_over_golds_and_statuses(pool: OfficialMathPool) -> None:
    rows = [
        ("\\boxed{3}", ["4", "3"]),  # ok: the second gold
        ("\\boxed{3}", ["4"]),  # wrong
        ("I give up.", ["4"]),  # no_answer: nothing to read
        (None, ["4"]),  # no_answer
        ("\\boxed{3}", []),  # gold_unparsable: no gold
        ("\\boxed{3}", None),
        ("\\boxed{3}", ["\\text{}"]),  # gold_unparsable: it reads as ""
        ("no number", ["\\text{}"]),  # "" == "": the official verdict is correct
    ]
    out = check(pool, rows)
    assert out["status"].to_list() == [
        "ok", "wrong", "no_answer", "no_answer", "gold_unparsable", "gold_unparsable", "gold_unparsable", "ok"
    ]  # fmt: skip
    assert out["correct"].to_list() == [True, False, False, False, False, False, False, True]
    assert out["extracted"].to_list() == ["3", "3", None, None, None, None, "3", None]
    assert set(out["verifier"]) == {"official_math"}


def test_gold_solutions_or_over_source_and_reference(pool: OfficialMathPool) -> None:
    # rollout verification: the source's solution OR the reference solution, each read with extract_answer
    source = "Multiplying out gives 6 * 7 = 42, so we need 42 tiles."  # no \boxed: its last number
    reference = "Therefore $\\boxed{41}$."
    out = check(
        pool,
        [("\\boxed{42}", [reference, source]), ("\\boxed{41}", [reference, source])],
        gold_form="solution",
    )
    assert out["correct"].to_list() == [True, True]
    out = check(pool, [("\\boxed{43}", [reference, source])], gold_form="solution")
    assert out["status"].to_list() == ["wrong"]


def test_a_pathological_row_returns_within_the_deadline(pool: OfficialMathPool) -> None:
    # parse_expr evaluates 9**9**9**9 in C (no signal reaches it): the parent kills the worker
    rows = [("\\boxed{9**9**9**9}", ["1"]), ("\\boxed{2}", ["2"])]
    t0 = time.perf_counter()
    out = check(pool, rows, timeout_s=1.0)
    assert time.perf_counter() - t0 < 15  # 1 s + the 1 s grace + a replacement worker, on a busy machine
    assert out["status"].to_list() == ["timeout", "ok"]
    assert out["correct"].to_list() == [False, True]


def test_parse_expr_never_runs_code_from_an_answer(pool: OfficialMathPool, tmp_path: Path) -> None:
    # the official code hands answers to sympy's parse_expr, which evals them with the builtins in reach
    marker = tmp_path / "ran"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f'\\boxed{{open("{marker}", "w")}}',
        "\\boxed{(1).__class__.__bases__[0].__subclasses__()}",
        "\\boxed{x.func}",
    ]
    out = check(pool, [(p, ["7"]) for p in payloads])
    assert not marker.exists()
    assert out["status"].to_list() == ["wrong"] * len(payloads)


def test_the_pool_must_match_the_grader(pool: OfficialMathPool) -> None:
    df = pl.DataFrame({"text": ["\\boxed{1}"], "gold": [["1"]]})
    with pytest.raises(ValueError, match="needs a MathPool"):
        check_answers(df, pool=pool)
    with pytest.raises(ValueError, match="unknown grader"):
        check_answers(df, pool=pool, grader="lenient")  # type: ignore[arg-type]
