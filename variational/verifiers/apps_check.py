"""Judge one model output on APPS/TACO tests the way the official checker does (method.md §9), minus its bug.

In:  a model output (the program is its last fenced code block) and the tests: the APPS/TACO `input_output`
     JSON string as stored ({"inputs", "outputs"} for stdin programs, plus "fn_name" for call-based ones), or
     the older in-repo list of {input, output}.
Out: `Verdict(status, correct, code, detail)`; status is ok / wrong / timeout / runtime_error /
     compile_error / no_code / sandbox_violation, or gold_unparsable (no usable tests: the row is skipped
     like a math row without gold) / error (the sandbox itself failed to start).

The trusted side decides every verdict. The program runs in variational/verifiers/sandbox.py through the
harness variational/verifiers/harness.py, which only runs it; the expected outputs never enter the jail.
From the jail this module accepts only the records of variational/verifiers/protocol.py, each parsed
strictly and in its turn: start, then per test index one output (stdin) or return value (call) or how the
program failed, then done, then nothing. It compares each output HERE. Anything else (another event or
status, a duplicate, skipped or out-of-range index, an extra line, a malformed or oversized record, a
harness that stops after `start`) is the program's failure: status wrong, correct False in both modes,
since only a program that interferes with its harness can cause it. gold_unparsable is decided here before
anything runs, from the tests alone; `error` only when the jail fails before `start` (no candidate code ran).
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
`comparison="lcb"`: LiveCodeBench as SkyThought's harness judges it (method.md §10; its rules:
variational/verifiers/lcb_check.py).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from variational.verifiers import lcb_check, sandbox
from variational.verifiers.protocol import Opaque, ProtocolError, decode_value, parse_record

log = logging.getLogger("variational")
# a fence line: ``` + language + anything up to the end of the line; the body runs to the next ```
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OFFICIAL_FENCE = re.compile(r"```[A-Za-z]*\n(.*?)```", re.DOTALL)
PY_LANGS = {"python", "python3", "py", ""}
STATUSES = ("ok", "wrong", "timeout", "runtime_error", "compile_error", "no_code", "sandbox_violation")
STARTUP_S = 30.0  # namespaces + interpreter + numpy on a loaded 2-core machine (measured ~0.3-1 s idle)
GRACE_S = 5.0  # past the harness's own per-test deadline (timeout_s + 2 s): the harness itself is stuck


@functools.cache
def jail_program() -> str:
    """The source run inside the jail: protocol.py (the format the harness writes), then the harness."""
    here = Path(__file__).parent
    return (here / "protocol.py").read_text() + "\n\n" + (here / "harness.py").read_text()


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


decode = decode_value  # a return value as the harness encoded it (protocol.encode_value) -> the Python value
_Opaque = Opaque


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
COMPARISONS = ("apps", "lcb")  # apps: the official APPS checker; lcb: variational/verifiers/lcb_check.py


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
    name = lcb_check.function_name(code)
    if name is None or not name.isidentifier():
        return Verdict("compile_error", False, code, f"the harness would call {name!r}: not a function name")
    try:
        inputs = [lcb_check.call_args(str(x)) for x in raw["raw_inputs"]]
    except ValueError as e:
        return Verdict("wrong", False, code, f"the harness's parser fails on a test input: {e}")
    return Tests(
        inputs=inputs, outputs=[lcb_check.expected_value(x) for x in raw["raw_outputs"]], fn_name=name
    )


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
    caps the tests' time together. `mode`: a verify.sandbox setting (None: auto); raises
    sandbox.SandboxUnavailable when it cannot be set up. `comparison`: "apps" (the official APPS checker) or
    "lcb" (the LiveCodeBench harness: its code block, parser, comparison and time budget; no quirks)."""
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown comparison {comparison!r}; use one of {COMPARISONS}")
    lcb = comparison == "lcb"
    code = lcb_check.code_block(text) if lcb else last_code_block(text, official=official_quirks)
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
        official_quirks, timeout_s = False, lcb_check.budget_s(len(parsed.inputs))
        problem_timeout_s = timeout_s
    spec = {
        "kind": parsed.kind,
        "code": code,
        "fn_name": parsed.fn_name,
        "inputs": parsed.inputs,
        "timeout_s": timeout_s,
        "official_wrapping": official_quirks,
        "lcb": lcb,
    }
    limits = sandbox.Limits(memory_mb=memory_mb, max_processes=max_processes)
    rules = Rules(
        timeout_s, problem_timeout_s, official_quirks, lcb_check.output_matches if lcb else output_matches
    )
    with sandbox.start_python(jail_program(), json.dumps(spec).encode(), limits, mode) as jail:
        return read_verdict(jail, parsed, timeout_s, official_quirks, code, rules=rules)


@dataclass(frozen=True)
class Rules:
    """How a program's records are judged: time per test and per problem, the quirks, the comparison."""

    timeout_s: float  # per test
    problem_timeout_s: float | None = None  # all tests together (the test times the harness reports)
    quirks: bool = False
    matches: Any = None  # (kind, what a test printed or returned, expected) -> passed; None: APPS rules


def output_matches(kind: str, got: Any, expected: Any) -> bool:
    """The official APPS checker's comparison of one test's output."""
    if kind == "stdin":
        return stdin_output_matches(got, expected)
    return call_output_matches(got, expected)


def read_verdict(
    jail: sandbox.Jail, tests: Tests, timeout_s: float, quirks: bool, code: str, *, rules: Rules | None = None
) -> Verdict:
    """The verdict from a started jail's records (the harness's, or whatever else runs there): `error`
    when its first record is not `start`; wrong when a later one breaks the format or its turn. `rules`
    (judge's): the problem's time cap and the comparison too; default the APPS rules, no cap."""
    rules = rules or Rules(timeout_s, None, quirks)
    if not _started(jail, tests.kind):
        return Verdict("error", False, code, f"sandbox failed: {jail.stderr()[-500:]}")
    try:
        results, detail = _collect(jail, tests, rules)
    except ProtocolError as e:
        return Verdict("wrong", False, code, f"protocol violation: {e}"[:600])
    except _HarnessStopped as e:
        log.warning("check_code: the harness stopped early (%s); stderr: %s", e, jail.stderr()[-300:])
        return Verdict("wrong", False, code, f"the harness stopped early: {e}")
    return _verdict(results, len(tests.inputs), rules.quirks, code, detail)


class _HarnessStopped(Exception):
    """The harness ended (or was stopped) after `start` without its last record: the program's doing."""


def _started(jail: sandbox.Jail, kind: str) -> bool:
    """Whether the harness's first record is `start` (no candidate code runs before it)."""
    line = jail.read_line(time.monotonic() + STARTUP_S)
    try:
        return line is not None and parse_record(line, kind)["event"] == "start"
    except ProtocolError:
        return False


def _collect(jail: sandbox.Jail, tests: Tests, rules: Rules) -> tuple[list[str], str]:
    """Read the harness's records after `start`, each in its turn, comparing each test's output as it
    arrives; stop at the first test that decides the verdict, or when the tests' time together passes
    rules.problem_timeout_s (then "killed", as the official checker kills the problem's process).
    -> (per-test states, detail). Raises ProtocolError / _HarnessStopped: the program's failure."""
    results: list[str] = []
    detail, n = "", len(tests.inputs)
    spent_s, cap, timeout_s = 0.0, rules.problem_timeout_s, rules.timeout_s
    while True:
        wait = timeout_s if cap is None else min(timeout_s, max(cap - spent_s, 0.0))
        record = _next_record(jail, tests.kind, wait)
        if record is None:  # the harness stopped answering: the whole run's deadline
            return [*results, "killed"], detail or "the sandbox deadline passed"
        event = record["event"]
        if event == "invalid":
            raise ProtocolError(record["error"])
        if event == "compile_error" and not results:
            _expect_done(jail, tests.kind, rules.timeout_s)
            return ["compile_error"], record["error"]
        if event == "done" and len(results) == n:
            _expect_end(jail)
            return results, detail
        if event != "test" or record["i"] != len(results) or len(results) >= n:
            where = f"test {len(results)}" if len(results) < n else "done"
            raise ProtocolError(f"a {event} record (index {record.get('i')}) where {where} was due")
        state = _judged(record, tests, rules.matches or output_matches)
        spent_s += min(max(float(record.get("ms") or 0.0) / 1e3, 0.0), timeout_s + GRACE_S)
        if cap is not None and spent_s > cap:
            state = "killed"
        results.append(state)
        if state != "ok":
            said = record.get("error") or f"printed {record.get('stdout', record.get('value'))!r:.200}"
            detail = detail or f"test {record['i']}: {state}: {said}"[:600]
            # officially a crash or a timeout does not end the run: under quirks only `wrong` decides
            if not rules.quirks or state in ("wrong", "killed"):
                return results, detail


def _judged(record: dict, tests: Tests, matches: Any) -> str:
    state = record["status"]
    if state != "ran":
        return state
    got = record["stdout"] if tests.kind == "stdin" else record["value"]
    return "ok" if matches(tests.kind, got, tests.outputs[record["i"]]) else "wrong"


def _next_record(jail: sandbox.Jail, kind: str, timeout_s: float) -> dict | None:
    line = jail.read_line(time.monotonic() + timeout_s + GRACE_S)
    if line is None:
        if jail.timed_out:
            return None
        raise _HarnessStopped("no record after the last one it sent")
    return parse_record(line, kind)


def _expect_done(jail: sandbox.Jail, kind: str, timeout_s: float) -> None:
    record = _next_record(jail, kind, timeout_s)
    if record is None or record["event"] != "done":
        raise ProtocolError("a compile_error record followed by more than done")
    _expect_end(jail)


def _expect_end(jail: sandbox.Jail) -> None:
    """After done the harness exits: one more line (not an end of output or a stuck jail) is a violation."""
    if jail.read_line(time.monotonic() + GRACE_S) is not None:
        raise ProtocolError("a line after done")


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
