"""variational/verifiers/lcb_check.py: the LiveCodeBench harness's rules as pure functions, on literal examples
(the judging path in the sandbox: tests/verifiers/test_apps_check.py, comparison="lcb")."""

from __future__ import annotations

import pytest

from variational.verifiers import lcb_check


def test_the_harness_parser_reads_functional_inputs() -> None:
    assert lcb_check.call_args("[1, 2]\n3\n") == [[1, 2], 3]
    assert lcb_check.call_args('"abc"\n1.5\ntrue\n{"a": 1}') == ["abc", 1.5, "true", '{"a": 1}']
    assert lcb_check.call_args('nums = 3, s = "xy"') == [3, "xy"]  # key=value pairs, keys dropped
    with pytest.raises(ValueError):
        lcb_check.call_args("x = [1, 2], y = 3")  # split on every comma: the harness fails the test
    with pytest.raises(ValueError):
        lcb_check.call_args("[1, 2,]")  # a line in brackets that is no JSON
    assert lcb_check.expected_value(" [1, 2] ") == [1, 2] and lcb_check.expected_value("ab") == "ab"


def test_stdin_is_the_whole_output_stripped() -> None:
    assert lcb_check.expected_stdout("5 -\n") == "5" and lcb_check.expected_stdout("1\n2\n") == "1\n2"
    assert lcb_check.output_matches("stdin", "1\n2\n\n", "1\n2\n")
    assert not lcb_check.output_matches("stdin", "2 1\n", "1 2\n")  # no word sets
    assert not lcb_check.output_matches("stdin", "0.5000001\n", "0.5\n")  # no float tolerance
    assert lcb_check.output_matches("call", [1, 2], [1, 2]) and not lcb_check.output_matches("call", (6,), 6)


def test_function_name_code_block_and_budget() -> None:
    assert lcb_check.function_name("from typing import List\n\ndef best(xs: List[int]):") == "best"
    assert lcb_check.function_name("class Solution:\n    def best(self, xs):") == "best"  # not in the module
    assert lcb_check.function_name("   ") is None
    assert lcb_check.code_block("```python\nx = 1</code>\n```") == "x = 1"
    assert lcb_check.code_block("```python3\nx = 1\n```") is None  # a fence of letters only
    assert lcb_check.code_block("no code") is None
    assert lcb_check.budget_s(3) == 26.0  # (6 + 1) * 3 + 5
