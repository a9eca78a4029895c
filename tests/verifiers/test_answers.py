"""The verifier contract (variational/verifiers/answers.py, math_rules.py): math verdicts (gold first,
extraction, statuses), each rule of MathRules, hard deadlines on pathological rows, code tests in the sandbox."""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl
import pytest

from tasks.verify import check_answers, check_code
from variational import templates
from variational.verifiers.math_rules import OURS, RULES, MathPool


@pytest.fixture(scope="module")
def pool() -> Iterator[MathPool]:
    with MathPool(2) as p:
        yield p


def check(pool: MathPool, rows: list[tuple[str | None, list[str] | None]], timeout_s: float = 5.0):
    df = pl.DataFrame(
        {"text": [r[0] for r in rows], "gold": [r[1] for r in rows]},
        schema_overrides={"gold": pl.List(pl.String)},
    )
    return check_answers(df, timeout_s=timeout_s, pool=pool)


# ---------------------------------------------------------------- math verdicts
def test_statuses_and_extraction(pool: MathPool) -> None:
    pi_output = templates.pi_response("maybe \\boxed{3}? no.", "So the answer is $\\boxed{\\frac{1}{2}}$.")
    rows = [
        ("Thus the answer is $\\boxed{\\frac{1}{2}}$.", ["0.5"]),  # ok, boxed
        ("so \\boxed{3}", ["4"]),  # wrong
        ("I could not solve it.", ["1"]),  # no answer at all
        ("\\boxed{2}", ["\\text{}"]),  # the gold does not parse
        ("The final answer is $12$", ["12"]),  # no boxed: the final answer expression
        ("\\boxed{7}", ["5", "7"]),  # any accepted gold
        (pi_output, ["1/2"]),  # the solution section is read, not the think
        ("\\frac{3}{4}i", ["\\frac34i"]),  # a bare LaTeX answer
        ("first \\boxed{1}.\n\nThen finally \\boxed{2}", ["2"]),  # the last boxed
        (None, ["1"]),
        ("\\boxed{1}", None),
        ("$\\boxed{36}$ dollars", ["\\$36"]),  # an escaped dollar is no delimiter (math500 golds)
        ("It is \\boxed{1} or \\boxed{2}.", ["2"]),  # boxed in one line form one set answer: no hedging
    ]
    out = check(pool, rows)
    assert out["status"].to_list() == [
        "ok",
        "wrong",
        "no_answer",
        "gold_unparsable",
        "ok",
        "ok",
        "ok",
        "ok",
        "ok",
        "no_answer",
        "gold_unparsable",
        "ok",
        "wrong",
    ]
    assert out["correct"].to_list() == [s == "ok" for s in out["status"]]
    assert out["extracted"].to_list()[:3] == ["\\frac{1}{2}", "3", None]
    assert out["extracted"][6] == "\\frac{1}{2}"
    assert out["extracted"][8] == "2"
    assert set(out["verifier"]) == {"math_verify"}
    assert out.columns == ["text", "gold", "extracted", "correct", "status", "verifier", "elapsed_ms"]
    assert (out["elapsed_ms"] >= 0).all()


def test_gold_is_passed_first(pool: MathPool) -> None:
    # math-verify is asymmetric: an interval prediction matches an inequality gold, not the other way round
    out = check(pool, [("$\\boxed{(1,2)}$", ["1<x<2"]), ("$\\boxed{1<x<2}$", ["(1,2)"])])
    assert out["correct"].to_list() == [True, False]


def test_keeps_order_and_extra_columns(pool: MathPool) -> None:
    df = pl.DataFrame(
        {"k": [3, 1, 2], "text": ["\\boxed{3}", "\\boxed{1}", "\\boxed{5}"], "gold": [["3"], ["1"], ["2"]]}
    )
    out = check_answers(df, pool=pool)
    assert out["k"].to_list() == [3, 1, 2]
    assert out["correct"].to_list() == [True, True, False]
    # a plain string gold is one accepted answer
    assert check_answers(df.with_columns(pl.lit("1").alias("gold")), pool=pool)["correct"].to_list() == [
        False,
        True,
        False,
    ]
    empty = check_answers(df.head(0), pool=pool)
    assert empty.height == 0 and "status" in empty.columns


# each rule of MathRules on a case whose verdict flips when the rule is off (region_cap is a time guard)
RULE_CASES = {
    "solution_section": (templates.pi_response("say \\boxed{3}? no.", "Recounting gives $4$."), ["4"]),
    "boxed_priority": ("So $\\boxed{5}$.\n\nThe final answer is $6$", ["5"]),
    "gold_wrap": ("The roots are $\\boxed{-2, 1}$.", ["-2,1"]),  # math500 writes several answers so
    "bare_answer": ("(\\frac{3}{5},\\frac{8}{3}]", ["$(\\frac{3}{5},\\frac{8}{3}]$"]),  # not a set
    "comma_both": ("1.22", ["1,22"]),  # a decimal comma, math-verify's reading
}


def test_each_rule_decides_its_case(pool: MathPool) -> None:
    assert set(RULES) == set(RULE_CASES) | {"region_cap"}
    rows = list(RULE_CASES.values())
    assert check(pool, rows)["correct"].all()
    df = check(pool, rows).select("text", "gold")
    for i, rule in enumerate(RULE_CASES):
        assert not check_answers(df, pool=pool, rules=OURS.without(rule))["correct"][i], rule
    # a list gold is not matched by one of its members, whichever way it is written
    out = check(pool, [("$\\boxed{-2}$", ["10, 4, -2"]), ("$\\boxed{1}$", ["-2,1"]), ("$x=2$", ["x=2"])])
    assert out["correct"].to_list() == [False, False, True]


# ---------------------------------------------------------------- deadlines
PATHOLOGICAL = [
    "\\boxed{" + "{" * 50_000,  # unclosed, deeply nested
    "\\boxed{" + "{" * 50_000 + "}" * 50_001,  # closed, deeply nested
    "$9^{9^{9^{9^{9}}}}$",  # power tower
    "The answer is " + "a" * 1_000_000,  # 1 MB
    "$" + "(" * 3000 + "1" + ")" * 3000 + "$",
]


def test_pathological_rows_return_in_time(pool: MathPool) -> None:
    timeout_s = 1.0
    rows = [("\\boxed{2}", ["2"])] + [(t, ["1"]) for t in PATHOLOGICAL] + [("\\boxed{3}", ["3"])]
    out = check(pool, rows, timeout_s=timeout_s)
    status = out["status"].to_list()
    assert status[0] == status[-1] == "ok"
    assert set(status[1:-1]) <= {"timeout", "no_answer", "wrong", "error"}, status
    # the power tower cannot finish in 1 s: only a deadline gives it this status (no wall-clock assertion,
    # the machine may be loaded; the row after it still being verified shows the pool went on)
    assert "timeout" in status


# ---------------------------------------------------------------- code
def fenced(code: str) -> str:
    return f"Reasoning...\n```python\nprint('not this one')\n```\nFinal:\n```python\n{code}\n```\n"


def test_check_code() -> None:
    # the sandbox's limits (wall clock, output flood, network) have their own tests in test_sandbox.py
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5   7", "output": "  12  \n\n"}]
    programs = {
        "correct": (fenced("a, b = map(int, input().split())\nprint(a + b)"), tests),
        "wrong": (fenced("print(3)"), tests),  # passes the first test only
        "crash": (fenced("raise SystemExit(1)"), tests),
        "loop": (fenced("while True:\n    pass"), tests),
        "memory": (fenced("x = bytearray(2 * 1024**3)\nprint(3)"), tests[:1]),
        "no_code": ("I would write a program.", tests),
        "no_tests": (fenced("print(1)"), []),
    }
    df = pl.DataFrame(
        {
            "name": list(programs),
            "text": [p[0] for p in programs.values()],
            "tests": [p[1] for p in programs.values()],
        },
        schema_overrides={"tests": pl.List(pl.Struct({"input": pl.String, "output": pl.String}))},
    )
    out = check_code(df, timeout_s=1.5, memory_mb=256)  # "loop" -> timeout below: the deadline held
    got = dict(zip(out["name"], out["status"], strict=True))
    expected = {
        "correct": "ok",
        "wrong": "wrong",
        "crash": "wrong",  # officially SystemExit ends a program normally: it printed nothing
        "loop": "timeout",
        "memory": "sandbox_violation",  # MemoryError under RLIMIT_AS
        "no_code": "no_code",
        "no_tests": "gold_unparsable",
    }
    assert got == expected
    assert dict(zip(out["name"], out["correct"], strict=True))["correct"] is True
    assert set(out["verifier"]) == {"code_tests"}
    assert out.filter(pl.col("name") == "correct")["extracted"][0].startswith("a, b = map")
