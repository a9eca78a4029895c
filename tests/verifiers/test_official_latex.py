"""variational/verifiers/official_latex.py: latex2sympy2 1.9.1 (the official grader's LaTeX parser) emulated
on latex2sympy2_extended. Each expected value is what latex2sympy2 1.9.1 itself returns (probed outside the
repository); the comments say what the extended parser alone would have returned."""

from __future__ import annotations

import pytest
import sympy

from variational.verifiers.official_latex import latex_to_sympy

x, y, t, i, p = sympy.symbols("x y t i p")


@pytest.mark.parametrize(
    ("latex", "expected"),
    [
        ("5.<|end_of_solution|>", 5),  # the leading expression; the rest is ignored (extended: fails)
        ("\\frac{1}{6}.<|end_of_solution|>", sympy.Rational(1, 6)),
        ("-1)", -1),
        ("6+9i.", 6 + 9 * i),
        ("x.y", x),
        ("1,2", [1, 2]),  # a top-level list is a Python list (extended: FiniteSet)
        ("[1,2]", [1, 2]),  # (extended: Interval)
        ("1;2", [1, 2]),
        ("1,000", 1000),  # thousands, not a list
        ("x=5", 5),  # "symbol = v" is v (extended: Eq)
        ("2x=4", [sympy.Eq(x, 2)]),  # other equations are solved
        ("1.3x", sympy.Rational(13, 10) * x),  # exact decimals (extended: 1.3*x)
        ("2\\frac{1}{2}", 1),  # a product, not the mixed number 5/2
        ("\\pit", sympy.pi * t),  # the lexer's longest known command, then letters (extended: fails)
        ("\\cotx", sympy.cot(x)),
        ("\\dfrac{1}{2}", sympy.Rational(1, 2)),
        ("\\displaystyle 2", 2),
        ("100\\sqrt{p}", 100 * sympy.sqrt(p)),
        ("2E", 2),  # E is an exponent mark only: after a digit it ends the expression
        ("1.5E3", 1500),
    ],
)
def test_reads_like_latex2sympy2(latex: str, expected: object) -> None:
    got = latex_to_sympy(latex)
    if isinstance(expected, list):
        assert isinstance(got, list) and str(got) == str(expected)
    else:
        assert sympy.simplify(got - expected) == 0


@pytest.mark.parametrize(
    "latex",
    [
        "(1,2)",  # no tuples or intervals (extended: Interval.open(1, 2))
        "(1,2]",
        "x\\in[1,2]",
        "\\boxed{5}",  # commands it does not know (extended: reads them)
        "\\textbf{(113)}",
        "5\\cup6",
        "5^{\\circ}",
        "E",  # E opening a term
        "x+E",
        "5x-7y+11z+4=0<|end_of_solution|>",  # "<" and "|" continue the expression, which then fails
        "\\frac12",  # it needs braces (strip_answer_string adds them before)
    ],
)
def test_fails_where_latex2sympy2_fails(latex: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 (the official code catches any exception)
        latex_to_sympy(latex)
