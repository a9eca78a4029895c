"""Judge one model output on APPS/TACO tests the way the official checker does (method.md §9), minus its bug.

In:  a model output (the program is its last fenced code block) and the tests: the APPS/TACO `input_output`
     JSON string as stored ({"inputs", "outputs"} for stdin programs, plus "fn_name" for call-based ones), or
     the older in-repo list of {input, output}.
Out: `Verdict(status, correct, code, detail)`; status is ok / wrong / timeout / runtime_error /
     compile_error / no_code / sandbox_violation, or gold_unparsable (no usable tests: the row is skipped
     like a math row without gold) / error (the sandbox itself failed).

The program runs in variational/verifiers/sandbox.py through the harness variational/verifiers/harness.py, which only
runs it; the outputs are compared HERE, outside the sandbox, so a program never sees the expected outputs.
Official behaviour kept: the import prelude, stdin programs judged by the six comparison rules in turn,
`class Solution` methods called on one instance, tuple -> list, `out == expected[0]`, floats compared exactly
in call tests, SystemExit is a normal end. Deliberate differences (official_quirks=False, the default):
- a crash, a timeout or a compile failure is wrong (officially -1/-2, and `np.all` counts them as passing);
- stdin programs run as `__main__` with real stdin/stdout (officially: wrapped in `def code()` inside a
  module named tmp_sol, so an `if __name__ == "__main__":` program prints nothing, and stdin is a StringIO);
  only a program with a top-level `return` (valid solely when wrapped; APPS references have them) is wrapped;
- the program is the last ```python / ```py / ```python3 / unlabelled block (officially: the last block
  whose fence is letters only, so ```python3 is skipped and a ```cpp block is taken);
- a return value that is not plain data (numbers, strings, lists, tuples, sets, dicts, None) never matches;
  officially `==` decides, so an object whose __eq__ always says True passes;
- each stdin test runs in a fresh process (officially one process for all tests: state carried over).
official_quirks=True restores the verdict rule, the wrapping and the fence rule, for re-deriving the
paper's data. Not reproduced even then: the StringIO stdin, the 11 s cap per problem, `reliability_guard`.
Problems that need a special judge (any valid output accepted; TACO marks 218 of its test split, SOURCES.md
§6, and APPS train 2287 is one) are judged by exact comparison, as officially: correct programs can fail.
`problem_timeout_s` caps all tests of a problem together (the official checker: 11 s), then wrong.
`comparison="lcb"`: LiveCodeBench as SkyThought's harness judges it (method.md §10, section below).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from variational.verifiers import sandbox

_HARNESS = Path(__file__).with_name("harness.py")
# a fence line: ``` + language + anything up to the end of the line; the body runs to the next ```
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OFFICIAL_FENCE = re.compile(r"```[A-Za-z]*\n(.*?)```", re.DOTALL)
PY_LANGS = {"python", "python3", "py", ""}
STATUSES = ("ok", "wrong", "timeout", "runtime_error", "compile_error", "no_code", "sandbox_violation")
STARTUP_S = 30.0  # namespaces + interpreter + numpy on a loaded 2-core machine (measured ~0.3-1 s idle)
GRACE_S = 2.0
# stdout read back per test: more than any APPS/TACO answer, little enough for the harness to hold in JSON
MAX_REPORTED_OUTPUT = 16 * 2**20


def last_code_block(text: str | None, official: bool = False) -> str | None:
    """The body of the last Python fenced block; None when there is none. `official`: the official rule."""
    if not text:
        return None
    if official:
        blocks = _OFFICIAL_FENCE.findall(text)
    else:
        blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in PY_LANGS]
    return blocks[-1] if blocks else None


# ================================================================ tests
@dataclass(frozen=True)
class Tests:
    inputs: list  # stdin: one text per test; call: one argument list per test
    outputs: list
    fn_name: str | None = None

    @property
    def kind(self) -> str:
        return "stdin" if self.fn_name is None else "call"


def parse_tests(value: Any) -> Tests | None:
    """The `tests` cell -> Tests, or None when it holds no test. Raises ValueError on a malformed cell."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"tests is not valid JSON ({e.msg}); expected the APPS input_output string"
            ) from None
    if isinstance(value, list):  # the older in-repo form: [{input, output}, ...]
        if not all(isinstance(t, dict) and "input" in t for t in value):
            raise ValueError("tests list must hold {input, output} objects")
        value = {"inputs": [t["input"] for t in value], "outputs": [t.get("output") for t in value]}
    if not isinstance(value, dict) or "inputs" not in value or "outputs" not in value:
        raise ValueError("tests must be an APPS input_output object with inputs and outputs")
    inputs, outputs, fn_name = value["inputs"] or [], value["outputs"] or [], value.get("fn_name")
    if len(inputs) != len(outputs):
        raise ValueError(f"tests have {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        return None
    if fn_name is None:
        inputs = [_stdin_text(i) for i in inputs]
    elif not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise ValueError(f"fn_name {fn_name!r} is not a Python identifier")
    return Tests(inputs=inputs, outputs=outputs, fn_name=fn_name)


def _stdin_text(value: Any) -> str:
    if isinstance(value, list):  # official: a list of input lines is joined with newlines
        return "\n".join(map(str, value))
    return "" if value is None else str(value)


# ================================================================ the official comparison rules
def _close(a: float, b: float) -> bool:
    """np.allclose(a, b) for one pair: |a - b| <= 1e-8 + 1e-5 |b| (b is the expected value)."""
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-8 + 1e-5 * abs(b)


def _word_sets(lines: list[str]) -> set[frozenset]:
    return {frozenset(words) for line in lines if (words := line.split())}


def _rounded_sets(lines: list[str]) -> set[frozenset]:
    return {frozenset(round(float(w), 3) for w in words) for line in lines if (words := line.split())}


def stdin_output_matches(printed: str, expected: Any) -> bool:
    """The official stdin comparison: the first of these rules that holds passes the test.
    1 stripped text; 2 stripped lines; 3 the same without blank lines; 4 every line a number, each within
    relative tolerance 1e-5; 5 per-line sets of words (word and line order ignored); 6 those words as
    numbers rounded to 3 decimals."""
    if isinstance(expected, list):
        expected = "\n".join(map(str, expected))
    expected = "" if expected is None else str(expected)
    lines = printed.splitlines()  # what the official capture of sys.stdout yields
    if "\n".join(lines).strip() == expected.strip():
        return True
    if "\n".join(line.strip() for line in lines).strip() == expected.strip() or lines == [expected]:
        return True
    expected_lines = [line.strip() for line in expected.split("\n") if line]
    nonblank = [line for line in lines if line]
    if lines == expected_lines or nonblank == expected_lines:
        return True
    try:
        got, want = [float(x) for x in nonblank], [float(x) for x in expected_lines]
        if len(got) == len(want) and all(_close(a, b) for a, b in zip(got, want, strict=True)):
            return True
    except ValueError:
        pass
    if _word_sets(nonblank) == _word_sets(expected_lines):
        return True
    try:
        return _rounded_sets(nonblank) == _rounded_sets(expected_lines)
    except (ValueError, OverflowError):
        return False


def decode(value: Any) -> Any:
    """A return value as the harness encoded it (harness.encode) -> the Python value."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        if "__set__" in value:
            return {decode(v) for v in value["__set__"]}
        if "__frozenset__" in value:
            return frozenset(decode(v) for v in value["__frozenset__"])
        if "__dict__" in value:
            return {decode(k): decode(v) for k, v in value["__dict__"]}
        return _Opaque(value.get("__opaque__", "?"))
    return value


class _Opaque:
    """A return value that was not plain data: equal to nothing."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def _int_keys(expected: Any) -> Any:
    """Official: JSON turned int dict keys into strings; an expected dict (or [dict]) gets int keys back."""
    try:
        if isinstance(expected, dict):
            return [{int(k): v for k, v in expected.items()}]
        if isinstance(expected, list) and expected and isinstance(expected[0], dict):
            return [{int(k): v for k, v in expected[0].items()}]
    except ValueError:
        pass
    return expected


def call_output_matches(value: Any, expected: Any) -> bool:
    """The official call-based comparison: tuple -> list; out == expected, or out == expected[0] (outputs
    are usually wrapped in a one-element list), or a list of tuples equal to expected[0]."""
    expected = _int_keys(expected)
    if isinstance(value, tuple):
        value = list(value)
    if value == expected:
        return True
    if isinstance(expected, list) and expected and value == expected[0]:
        return True
    try:
        return isinstance(value[0], tuple) and [list(x) for x in value] == expected[0]
    except (TypeError, IndexError, KeyError):
        return False


# ================================================================ LiveCodeBench, as the harness judges it
# SkyThought 0d190f1 skythought/evals/tasks/livecodebench (method.md §10), behaviour re-stated:
# - the program: the last block of a fence whose language is letters only, with `</code>` / `<code>` removed;
# - stdin tests: the whole printed output, stripped, equals the expected output stripped (one trailing "-"
#   and what follows it dropped, as its test preparation does); no per-line or float tolerance;
# - functional tests: the arguments parsed from the raw test text by its parser (key=value pairs, or one
#   argument per line: quoted text, a JSON list, a number, else the text), the expected value JSON or text;
#   the function is named by the word before the first `(` of the program and looked up in the module
#   (no `class Solution` instance, no import prelude), and its return value must `==` the expected value;
# - time: no per-test limit, (6 + 1) * n_tests + 5 s for the whole suite; the first failing test ends it.
COMPARISONS = ("apps", "lcb")
LCB_TEST_S, LCB_SUITE_EXTRA_S = 6.0, 5.0


def lcb_budget_s(n_tests: int) -> float:
    return (LCB_TEST_S + 1.0) * n_tests + LCB_SUITE_EXTRA_S


def lcb_code(text: str | None) -> str | None:
    blocks = _OFFICIAL_FENCE.findall(text or "")
    if not blocks:
        return None
    return blocks[-1].split("</code>")[0].replace("```python", "").split("```")[0].replace("<code>", "")


def lcb_function_name(code: str) -> str | None:
    """The harness's guess at the function to call: the last word before the first `(`."""
    words = code.split("(")[0].split()
    return words[-1] if words else None


def lcb_expected_stdout(expected: Any) -> str:
    text = ("\n".join(map(str, expected)) if isinstance(expected, list) else str(expected or "")).strip()
    if text.endswith("-"):
        text = text[: text.rfind("-")].rstrip()
    return text


def _lcb_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def lcb_call_args(raw: str) -> list:
    """A functional test's input text -> the argument list, by the harness's parser (raises ValueError
    where it raises: then the harness fails the test whatever the program)."""
    if "=" in raw:  # `a = 1, b = "x"`: every value cast to int, float, else text without quotes
        parts = [part.strip() for part in raw.split(",")] if "," in raw else [raw]
        args = []
        for part in parts:
            _, value = part.split("=")
            value = value.strip()
            cast = _lcb_scalar(value)
            args.append(cast.strip('"') if isinstance(cast, str) else cast)
        return args
    args = []
    for line in (line.strip() for line in raw.split("\n")):
        if not line:
            continue
        if line.startswith('"') and line.endswith('"'):
            args.append(line.strip('"'))
        elif line.startswith("[") and line.endswith("]"):
            args.append(json.loads(line))
        else:
            args.append(_lcb_scalar(line))
    return args


def lcb_expected_value(raw: str) -> Any:
    text = str(raw).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def lcb_tests(value: Any, code: str | None) -> Tests | Verdict | None:
    """The `tests` cell judged the LiveCodeBench way. Functional tests need the raw test texts
    (`raw_inputs` / `raw_outputs`, as variational/data/benchmarks.lcb_input_output stores them)."""
    parsed = parse_tests(value)
    if parsed is None or parsed.kind == "stdin":
        return parsed
    raw = json.loads(value) if isinstance(value, str) else value
    if not isinstance(raw.get("raw_inputs"), list) or not isinstance(raw.get("raw_outputs"), list):
        raise ValueError("functional tests without raw_inputs / raw_outputs: not a LiveCodeBench row")
    if code is None:
        return Verdict("no_code", False)
    name = lcb_function_name(code)
    if name is None or not name.isidentifier():
        return Verdict("compile_error", False, code, f"the harness would call {name!r}: not a function name")
    try:
        inputs = [lcb_call_args(str(x)) for x in raw["raw_inputs"]]
    except ValueError as e:
        return Verdict("wrong", False, code, f"the harness's parser fails on a test input: {e}")
    return Tests(inputs=inputs, outputs=[lcb_expected_value(x) for x in raw["raw_outputs"]], fn_name=name)


def lcb_output_matches(kind: str, got: Any, expected: Any) -> bool:
    if kind == "stdin":
        return got.strip() == lcb_expected_stdout(expected)
    return decode(got) == expected


# ================================================================ one program
@dataclass(frozen=True)
class Verdict:
    status: str
    correct: bool
    code: str | None = None
    detail: str = ""  # the failing test and why (for logs; not stored)


def judge(
    text: str | None,
    tests: Any,
    timeout_s: float = 4.0,
    memory_mb: int = 1024,
    max_processes: int = 64,
    official_quirks: bool = False,
    mode: str | None = None,
    *,
    problem_timeout_s: float | None = None,
    comparison: str = "apps",
) -> Verdict:
    """One model output on its tests -> Verdict. `timeout_s` is per test (official: 4 s); `problem_timeout_s`
    caps the tests' time together. `comparison`: "apps" (the official APPS checker) or "lcb" (the
    LiveCodeBench harness: its code block, parser, comparison and time budget; quirks do not apply)."""
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown comparison {comparison!r}; use one of {COMPARISONS}")
    lcb = comparison == "lcb"
    code = lcb_code(text) if lcb else last_code_block(text, official=official_quirks)
    try:
        parsed = lcb_tests(tests, code) if lcb else parse_tests(tests)
    except ValueError as e:
        return Verdict("gold_unparsable", False, detail=str(e))
    if isinstance(parsed, Verdict):
        return parsed
    if parsed is None:
        return Verdict("gold_unparsable", False, code, "no tests")
    if code is None:
        return Verdict("no_code", False)
    if lcb:  # no per-test limit officially: one budget for the suite
        official_quirks, timeout_s = False, lcb_budget_s(len(parsed.inputs))
        problem_timeout_s = timeout_s
    spec = {
        "kind": parsed.kind,
        "code": code,
        "fn_name": parsed.fn_name,
        "inputs": parsed.inputs,
        "timeout_s": timeout_s,
        "max_output_bytes": MAX_REPORTED_OUTPUT,
        "official_wrapping": official_quirks,
        "lcb": lcb,
    }
    limits = sandbox.Limits(memory_mb=memory_mb, max_processes=max_processes)
    rules = _Rules(
        timeout_s, problem_timeout_s, official_quirks, lcb_output_matches if lcb else output_matches
    )
    with sandbox.start_python(_HARNESS.read_text(), json.dumps(spec).encode(), limits, mode) as jail:
        results, detail = _collect(jail, parsed, rules)
        if results is None:
            return Verdict("error", False, code, f"sandbox failed: {jail.stderr()[-500:]}")
    return _verdict(results, len(parsed.inputs), official_quirks, code, detail)


@dataclass(frozen=True)
class _Rules:
    timeout_s: float  # per test
    problem_timeout_s: float | None  # all tests together (the harness's reported test times)
    quirks: bool
    matches: Any  # (kind, what the test printed or returned, expected) -> passed


def output_matches(kind: str, got: Any, expected: Any) -> bool:
    """The official APPS checker's comparison of one test's output."""
    if kind == "stdin":
        return stdin_output_matches(got, expected)
    return call_output_matches(decode(got), expected)


def _collect(jail: sandbox.Jail, tests: Tests, rules: _Rules) -> tuple[list | None, str]:
    """Read the harness's events, comparing each test's output as it arrives; stop at the first test that
    decides the verdict, or when the tests' time together passes rules.problem_timeout_s (then "killed",
    as the official checker kills the problem's process). -> (per-test states, detail); None when the
    harness died without a word."""
    results: list[str] = []
    detail, deadline = "", time.monotonic() + STARTUP_S + rules.timeout_s
    spent_s, cap = 0.0, rules.problem_timeout_s
    # a fresh generator per line: each waits until the deadline of its own test
    while (line := next(jail.lines(deadline), None)) is not None:
        event = json.loads(line)
        if event["event"] == "compile_error":
            return ["compile_error"], event.get("error", "")
        if event["event"] == "done":
            return results, detail
        i, state = event["i"], event["status"]
        if state == "ran":
            got = event["stdout"] if tests.kind == "stdin" else event["value"]
            state = "ok" if rules.matches(tests.kind, got, tests.outputs[i]) else "wrong"
        spent_s += min(max(float(event.get("ms", 0.0)) / 1e3, 0.0), rules.timeout_s + GRACE_S)
        if event.get("killed") or (cap is not None and spent_s > cap):
            state = "killed"
        results.append(state)
        if state != "ok":
            said = event.get("error") or f"printed {event.get('stdout', event.get('value'))!r:.200}"
            detail = detail or f"test {i}: {state}: {said}"[:600]
            # officially a crash or a timeout does not end the run: under quirks only `wrong` decides
            if not rules.quirks or state in ("wrong", "killed"):
                return results, detail
        left = rules.timeout_s if cap is None else min(rules.timeout_s, max(cap - spent_s, 0.0))
        deadline = time.monotonic() + left + GRACE_S
    if len(results) == len(tests.inputs):
        return results, detail
    if time.monotonic() >= deadline:  # the harness itself stopped answering: the jail's own deadline
        return [*results, "killed"], detail or "the sandbox deadline passed"
    return (results or None), detail or "the harness ended early"


def _verdict(results: list[str], n_tests: int, quirks: bool, code: str, detail: str) -> Verdict:
    first_bad = next((s for s in results if s != "ok"), None)
    status = "timeout" if first_bad == "killed" else first_bad or "ok"
    if quirks:
        # official: results are True / False / -1 (crash, timeout) / -2 (compile error) and the verdict is
        # np.all(results), so only False fails; a problem killed past its deadline is wrong too
        correct = "wrong" not in results and "killed" not in results
        correct = correct and (len(results) == n_tests or results == ["compile_error"])
    else:
        correct = status == "ok" and len(results) == n_tests
    return Verdict(status, correct, code, detail)
