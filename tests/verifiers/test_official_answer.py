"""variational/verifiers/official_answer.py: the official harness's answer reading (SkyThought extract_answer
and strip_answer_string), one literal example per official rule. Every expected value here was checked
against SkyThought 0d190f1's own functions (run outside the repository)."""

from __future__ import annotations

import pytest

from variational import templates
from variational.verifiers.official_answer import extract_answer, strip_answer_string


# ---------------------------------------------------------------- extract_answer
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("first \\boxed{1}, then \\boxed{2}.", "2"),  # the last \boxed wins
        ("so $\\boxed{\\frac{1}{2}}$ it is", "\\frac{1}{2}"),  # braces matched
        ("$\\boxed 5$ apples", "5"),  # no brace: up to the next $
        ("the end: \\boxed", ""),  # nothing after the last "boxed"
        ("\\boxed{3 + {4", "3+{4"),  # an unclosed group runs to the end
        ("We get 3 and 4, so the answer is 7.", "7"),  # "he answer is" beats the last number
        ("The answer is\n 12.", "12"),  # lines joined, the final dot dropped
        ("Hence the final answer is: 9", "9"),  # "final answer is" (":" dropped)
        ("I think it is 3 apples and 12 pears", "12"),  # the last-number fallback
        ("a total of 1,234 coins", "1234"),  # commas go before the number is read
        ("it is -0.5 or .25 now", "0.25"),  # signs and leading dots; strip adds the 0
        ("no digits at all", ""),
        ("The final answer is $42$. I hope it is correct.", "42"),  # Minerva's few-shot form
        ("所以答案是 5\n\n其他", "5"),
    ],
)
def test_extract_answer_rules(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_reads_the_thought_when_the_solution_has_no_box() -> None:
    # officially the whole response is read, the thought included (our strict grader reads the solution)
    text = templates.BEGIN_THOUGHT + templates.pi_response("so \\boxed{17}.", "It follows from the above.")
    assert extract_answer(text) == "17"
    text = templates.pi_response("maybe \\boxed{3}?", "The answer is $\\boxed{4}$.")
    assert extract_answer(text) == "4"


# ---------------------------------------------------------------- strip_answer_string
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),  # _fix_fracs
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("3/4", "\\frac{3}{4}"),  # _fix_a_slash_b
        ("03/4", "03/4"),  # only canonical integers
        ("\\sqrt2", "\\sqrt{2}"),
        ("5\\text{ cm}", "5"),  # a trailing \text unit goes
        ("\\text{Five}", "5"),  # number words become digits (word2number)
        ("073", "73"),  # word2number reads a digit string as an int
        ("90^\\circ", "90"),
        ("\\$36", "36"),
        ("50\\%", "50"),
        ("x = 3", "3"),
        ("k=5", "5"),  # a left side of at most 2 characters
        ("abc=5", "abc=5"),
        ("5.0", "5"),
        ("2.50", "2.50"),  # only zeros after the point go
        (".5", "0.5"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("3,1,2", "1,2,3"),  # a bare integer list is sorted
        ("1 and 2", "12"),  # every "and" is removed (an official quirk)
        ("infinity", "\\infty"),
        ("2j", "2i"),
        ("\\begin{bmatrix}1\\end{bmatrix}", "\\begin{pmatrix}1\\end{pmatrix}"),
        ("\\{1,2\\}", "{1,2}"),
        ("\\emptyset", "{}"),
        ("(-\\infty,\\infty)", "\\mathbb{R}"),
        ("12th grade", "12"),
        ("\\mbox{m}5", "5"),
    ],
)
def test_strip_answer_string_rules(answer: str, expected: str) -> None:
    assert strip_answer_string(answer) == expected
