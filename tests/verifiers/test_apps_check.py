"""Code verification (variational/verifiers/apps_check.py, tasks/verify.check_code): the official APPS comparison
rules as pure functions, each status end to end in the sandbox, the official-quirks flag, and the real
APPS rows of shared/data (reference solutions pass, mangled ones fail)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tasks.verify import check_code
from variational.data import benchmarks
from variational.verifiers import apps_check
from variational.verifiers.apps_check import (
    call_output_matches,
    judge,
    last_code_block,
    parse_tests,
    stdin_output_matches,
)
from variational.verifiers.harness import official_wrap
from variational.verifiers.protocol import decode_value as decode
from variational.verifiers.protocol import encode_value as encode

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
APPS_FILE = DATA / "apps_taco_problems.jsonl"  # absent in a worktree without ../shared: the rows skip
APPS_ROWS = (
    [json.loads(x) for x in APPS_FILE.read_text().splitlines() if x.strip()] if APPS_FILE.exists() else []
)
ADD = json.dumps({"inputs": ["1 2\n", "5   7\n"], "outputs": ["3\n", "12\n"]})
GUARDED = "def main():\n    print(sum(map(int, input().split())))\nif __name__ == '__main__':\n    main()"


def fenced(code: str, lang: str = "python") -> str:
    return f"Reasoning...\n```python\nprint('not this one')\n```\nFinal:\n```{lang}\n{code}\n```\n"


# ---------------------------------------------------------------- extraction and tests
def test_last_code_block() -> None:
    assert last_code_block(fenced("x = 1")) == "x = 1\n"
    assert last_code_block("```\nprint(1)\n```") == "print(1)\n"
    assert last_code_block("```py\nprint(2)\n```\n```text\nout\n```") == "print(2)\n"
    assert last_code_block("```cpp\nint main(){}\n```") is None
    assert last_code_block("no code") is None and last_code_block(None) is None
    assert last_code_block("```python\nunclosed") is None
    # official rule: letters-only fence, any language: ```python3 is skipped, ```cpp is taken
    text = "```python\na = 1\n```\n```python3\nb = 2\n```"
    assert last_code_block(text) == "b = 2\n"
    assert last_code_block(text, official=True) == "a = 1\n"
    assert last_code_block("```cpp\nint main(){}\n```", official=True) == "int main(){}\n"


def test_parse_tests_forms() -> None:
    stdin = parse_tests(ADD)
    assert stdin.kind == "stdin" and stdin.inputs == ["1 2\n", "5   7\n"]
    call = parse_tests(json.dumps({"inputs": [[[1, 2], 3]], "outputs": [[4]], "fn_name": "f"}))
    assert call.kind == "call" and call.inputs == [[[1, 2], 3]]
    legacy = parse_tests([{"input": "1\n", "output": "2\n"}])  # the older in-repo list form
    assert legacy.kind == "stdin" and legacy.outputs == ["2\n"]
    assert parse_tests(json.dumps({"inputs": [["a", "b"]], "outputs": ["x"]})).inputs == ["a\nb"]
    assert parse_tests(None) is None and parse_tests("") is None
    assert parse_tests(json.dumps({"inputs": [], "outputs": []})) is None
    for bad in ("{not json", json.dumps({"inputs": ["1"], "outputs": []}), json.dumps([1, 2])):
        with pytest.raises(ValueError):
            parse_tests(bad)


# ---------------------------------------------------------------- the official comparison rules
@pytest.mark.parametrize(
    ("printed", "expected"),
    [
        ("  3 \n\n", "3"),  # 1: stripped text
        ("1 \n 2", "1\n2\n"),  # 2: stripped lines
        ("1\n\n2\n", "1\n2"),  # 3: blank lines dropped
        ("0.33333334\n2.0000001", "0.333333333\n2"),  # 4: numeric lines within relative 1e-5
        ("0.000000001", "0"),  # 4: ... plus np.allclose's absolute 1e-8
        ("2 1\n4 3", "3 4\n1 2"),  # 5: per-line word sets, line order ignored
        ("1\n1\n2", "1\n2"),  # 5: ... so a repeated line is not noticed (official)
        ("0.12345 2", "0.1234 2.0"),  # 6: numbers rounded to 3 decimals
        ("Yes\n5", ["Yes", "5"]),  # a list of expected lines is joined
    ],
)
def test_stdin_rules_accept(printed: str, expected: str) -> None:
    assert stdin_output_matches(printed, expected)


@pytest.mark.parametrize(
    ("printed", "expected"),
    [
        ("No", "Yes"),
        ("1 2", "1 2 3"),
        ("0.33", "0.3333333"),  # outside 1e-5, and different at 3 decimals
        ("", "0"),
        ("inf", "1e308"),
        # apps-train-2287 test 0 accepts any valid labelling ("Yes\n7\n6\n8\n9\n7" is one): the official rules
        # reject it, so such problems need a special judge (SOURCES.md §6). (5 6 6 7 7 would pass by rule 5.)
        ("Yes\n7\n6\n8\n9\n7", "Yes\n5\n6\n6\n5\n7\n"),
    ],
)
def test_stdin_rules_reject(printed: str, expected: str) -> None:
    assert not stdin_output_matches(printed, expected)


def test_call_rules() -> None:
    assert call_output_matches((1, 2), [1, 2])  # a returned tuple is a list
    assert call_output_matches(9, [9])  # outputs come wrapped in a one-element list
    assert call_output_matches([(1, 2), (3, 4)], [[[1, 2], [3, 4]]])  # list of tuples vs expected[0]
    assert call_output_matches({1: "a"}, {"1": "a"})  # JSON's string keys become ints again
    assert call_output_matches([False], [False]) and not call_output_matches(True, [False])
    assert not call_output_matches(0.1 + 0.2, [0.3])  # floats compared exactly
    assert not call_output_matches([1, 2], [[2, 1]])
    assert not call_output_matches(decode({"__opaque__": "Cheater"}), [1])  # its __eq__ never ran


def test_encode_decode_round_trip() -> None:
    value = {1: (2, [3.5, None]), "k": {frozenset({1, 2})}, (1, "a"): True}
    assert decode(json.loads(json.dumps(encode(value)))) == value
    assert decode(encode(np.int64(7))) == 7 and type(decode(encode(np.float64(0.5)))) is float

    class AlwaysEqual:
        def __eq__(self, other: object) -> bool:
            return True

    assert not call_output_matches(decode(encode(AlwaysEqual())), [1])


def test_official_wrap() -> None:
    wrapped = official_wrap("import sys\nn = int(input())\nif n:\n    return\nprint(n)")
    assert wrapped.startswith("import sys\nstdin = sys.stdin\nstdout = sys.stdout\ndef code():\n\tn = int")
    compile(wrapped, "w", "exec")  # a top-level return is fine inside code()


# ---------------------------------------------------------------- every status, end to end
@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("a, b = map(int, input().split())\nprint(a + b)", "ok"),
        ("print(3)", "wrong"),  # passes the first test only
        ("raise ValueError('boom')", "runtime_error"),
        ("while True:\n    pass", "timeout"),
        ("def f(:\n    pass", "compile_error"),
        ("x = bytearray(4 * 1024**3)", "sandbox_violation"),  # MemoryError under RLIMIT_AS
        # official behaviours kept: SystemExit ends a program normally; the import prelude is there
        ("import sys\nprint(sum(map(int, input().split())))\nsys.exit(1)", "ok"),
        ("print(sum(Counter(map(int, input().split())).elements()))", "ok"),
        ("print(int(np.sum(np.array(input().split(), dtype=int))))", "ok"),
        # ours: a __main__ guard runs; a top-level return (APPS references use it) is run wrapped
        (GUARDED, "ok"),
        ("a, b = map(int, input().split())\nprint(a + b)\nif a:\n    return\nprint('never')", "ok"),
    ],
)
def test_stdin_statuses(code: str, status: str) -> None:
    v = judge(fenced(code), ADD, timeout_s=1.0, memory_mb=512)
    assert (v.status, v.correct) == (status, status == "ok"), v.detail


def test_no_code_and_no_tests() -> None:
    assert judge("I would write a program.", ADD).status == "no_code"
    assert judge("```cpp\nprint(1)\n```", ADD).status == "no_code"
    assert judge(fenced("print(1)"), None).status == "gold_unparsable"


CALL = {"inputs": [[[2, 3, 4, 7, 11], 5], [[1, 2, 3, 4], 2]], "outputs": [[9], [6]], "fn_name": "kth"}


@pytest.mark.parametrize(
    ("code", "status"),
    [
        # a class Solution method, starter code needing List (the prelude has it), one instance for all tests
        (
            "class Solution:\n    def kth(self, arr: List[int], k: int) -> int:\n"
            "        s = set(arr)\n        i = 0\n        while k:\n            i += 1\n"
            "            k -= i not in s\n        return i",
            "ok",
        ),
        ("def kth(arr, k):\n    return (9, 6)[len(arr) == 4]", "ok"),  # a bare function
        ("def kth(arr, k):\n    return 9", "wrong"),
        ("def other(arr, k):\n    return 9", "compile_error"),  # officially -2: the function is missing
        ("import nosuchmodule\ndef kth(arr, k):\n    return 9", "compile_error"),
        ("def kth(arr, k):\n    return arr[10]", "runtime_error"),
        ("def kth(arr, k):\n    while True:\n        pass", "timeout"),
        ("if __name__ == '__main__':\n    input()\ndef kth(arr, k):\n    return (9, 6)[len(arr) == 4]", "ok"),
    ],
)
def test_call_statuses(code: str, status: str) -> None:
    v = judge(fenced(code), json.dumps(CALL), timeout_s=1.0, memory_mb=512)
    assert (v.status, v.correct) == (status, status == "ok"), v.detail


# ---------------------------------------------------------------- official quirks
@pytest.mark.parametrize(
    ("code", "ours", "theirs"),
    [
        ("raise ValueError('boom')", "runtime_error", ("runtime_error", True)),  # -1 is truthy under np.all
        ("def f(:\n    pass", "compile_error", ("compile_error", True)),  # -2 is truthy too
        ("import time\ntime.sleep(5)", "timeout", ("timeout", True)),  # a per-test timeout is -1
        ("print(3)", "wrong", ("wrong", False)),  # False is the only failing result
        (GUARDED, "ok", ("wrong", False)),  # the official module is not __main__: the guard prints nothing
    ],
)
def test_official_quirks(code: str, ours: str, theirs: tuple[str, bool]) -> None:
    mine = judge(fenced(code), ADD, timeout_s=1.0, memory_mb=512)
    official = judge(fenced(code), ADD, timeout_s=1.0, memory_mb=512, official_quirks=True)
    assert (mine.status, mine.correct) == (ours, ours == "ok"), mine.detail
    assert (official.status, official.correct) == theirs, official.detail


def test_official_quirks_fence() -> None:
    # officially a ```cpp block is the program: it cannot compile (-2), so it "passes"
    v = judge("```cpp\nint main() { return 0; }\n```", ADD, official_quirks=True)
    assert (v.status, v.correct) == ("compile_error", True)


# ---------------------------------------------------------------- the real APPS rows (shared/data)
def mangle(row: dict, solution: str) -> str:
    """A plausible wrong program: one extra output line (stdin), or a changed return value (call)."""
    if row["test_type"] == "stdin":
        return solution + "\nprint(0)\n"
    fn = json.loads(row["input_output"])["fn_name"]
    owner = "Solution" if "class Solution" in solution else None
    target = f"{owner}.{fn}" if owner else fn
    return (
        f"{solution}\n_right = {target}\n"
        f"def _wrong(*a):\n    v = _right(*a)\n    return (not v) if isinstance(v, bool) else v + 1\n"
        f"{target} = _wrong\n"
    )


@pytest.mark.parametrize("row", APPS_ROWS, ids=[r["id"] for r in APPS_ROWS])
def test_apps_reference_solution_passes_and_mangled_fails(row: dict) -> None:
    solution = row["solutions"][0]
    right = judge(f"```python\n{solution}\n```", row["input_output"], timeout_s=4.0)
    assert (right.status, right.correct) == ("ok", True), right.detail
    wrong = judge(f"```python\n{mangle(row, solution)}\n```", row["input_output"], timeout_s=4.0)
    assert (wrong.status, wrong.correct) == ("wrong", False), wrong.detail


# ---------------------------------------------------------------- the frame API
def test_check_code_frame() -> None:
    df = pl.DataFrame(
        {
            "name": ["ok", "wrong", "legacy", "none"],
            "text": [
                fenced("print(sum(map(int, input().split())))"),
                fenced("print(3)"),
                fenced("print(2)"),
                "x",
            ],
            "tests": [ADD, ADD, json.dumps([{"input": "", "output": "2"}]), None],
        }
    )
    out = check_code(df, timeout_s=2.0, memory_mb=512)
    assert out.columns == [
        "name",
        "text",
        "tests",
        "extracted",
        "correct",
        "status",
        "verifier",
        "elapsed_ms",
    ]
    assert out["status"].to_list() == ["ok", "wrong", "ok", "gold_unparsable"]
    assert out["correct"].to_list() == [True, False, True, False]
    assert out["extracted"][0].startswith("print(sum(")


# ---------------------------------------------------------------- time limits per problem
SLEEPY = "import time\ntime.sleep(0.6)\nprint(sum(map(int, input().split())))"
ADD4 = json.dumps({"inputs": ["1 2\n"] * 4, "outputs": ["3\n"] * 4})


def test_problem_cap_ends_a_program_slow_on_every_test() -> None:
    """verify.code_problem_timeout_s: 4 tests of 0.6 s pass alone (1 s each), not within 1.5 s together."""
    alone = judge(fenced(SLEEPY), ADD4, timeout_s=1.0, memory_mb=512)
    capped = judge(fenced(SLEEPY), ADD4, timeout_s=1.0, memory_mb=512, problem_timeout_s=1.5)
    assert (alone.status, alone.correct) == ("ok", True), alone.detail
    assert (capped.status, capped.correct) == ("timeout", False), capped.detail


def test_official_limits_fail_a_program_that_hangs_on_every_test() -> None:
    """Officially each hanging test is -1 (truthy under np.all) but the problem's process is killed at 11 s:
    wrong. Scaled down: 0.5 s per test, 1.2 s per problem, 3 tests. Without the cap it passed."""
    hang, tests = "while True:\n    pass", json.dumps({"inputs": ["1\n"] * 3, "outputs": ["1\n"] * 3})
    uncapped = judge(fenced(hang), tests, timeout_s=0.5, memory_mb=512, official_quirks=True)
    capped = judge(fenced(hang), tests, timeout_s=0.5, official_quirks=True, problem_timeout_s=1.2)
    assert (uncapped.status, uncapped.correct) == ("timeout", True), uncapped.detail
    assert (capped.status, capped.correct) == ("timeout", False), capped.detail


def test_each_test_gets_its_own_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for a test's result restarts after each test: a correct program whose tests together take
    longer than the first deadline (startup + one test) is judged on all of them (it was cut off, wrong)."""
    monkeypatch.setattr(apps_check, "STARTUP_S", 3.0)
    tests = json.dumps({"inputs": ["1 2\n"] * 8, "outputs": ["3\n"] * 8})  # 8 x 0.6 s > 3 s + 1 s
    v = judge(fenced(SLEEPY), tests, timeout_s=1.0, memory_mb=512)
    assert (v.status, v.correct) == ("ok", True), v.detail


# ---------------------------------------------------------------- LiveCodeBench, as its harness judges
def lcb_call(fn_name: str, raw: list[tuple[str, str]]) -> str:
    """A functional LiveCodeBench row as variational/data/benchmarks.lcb_input_output writes it."""
    tests = [{"input": i, "output": o, "testtype": "functional"} for i, o in raw]
    return benchmarks.lcb_input_output(tests, fn_name)


@pytest.mark.parametrize(
    ("code", "expected", "apps", "lcb"),
    [
        ("print(3)", "3\n", "ok", "ok"),
        ("print('2 1')", "1 2\n", "ok", "wrong"),  # APPS: per-line word sets; LCB: the whole text
        ("print(0.5000001)", "0.5\n", "ok", "wrong"),  # APPS: float tolerance; LCB: exact
        ("print(1)\nprint()\nprint(2)", "1\n2\n", "ok", "wrong"),  # APPS drops blank lines
        ("print(3)", "3 -\n", "wrong", "ok"),  # LCB drops a trailing "-" from the expected output
    ],
)
def test_lcb_stdin_is_the_whole_output_stripped(code: str, expected: str, apps: str, lcb: str) -> None:
    tests = json.dumps({"inputs": ["\n"], "outputs": [expected]})
    ours = judge(fenced(code), tests, timeout_s=2.0, memory_mb=512)
    theirs = judge(fenced(code), tests, memory_mb=512, comparison="lcb")
    assert (ours.status, ours.correct) == (apps, apps == "ok"), ours.detail
    assert (theirs.status, theirs.correct) == (lcb, lcb == "ok"), theirs.detail


@pytest.mark.parametrize(
    ("code", "apps", "lcb"),
    [
        ("def total(xs, k):\n    return sum(xs) * k", "ok", "ok"),
        # a class Solution answer (the starter code's form): the harness calls `total` in the module
        ("class Solution:\n    def total(self, xs, k):\n        return sum(xs) * k", "ok", "compile_error"),
        # the harness calls whatever function comes first: a helper defined above is called instead
        (
            "def helper(xs):\n    return sum(xs)\ndef total(xs, k):\n    return helper(xs) * k",
            "ok",
            "runtime_error",
        ),
        # another name: our verifier wants func_name, the harness takes the first def
        ("def solve(xs, k):\n    return sum(xs) * k", "compile_error", "ok"),
        # no import prelude in the harness: List is undefined where the def is executed
        ("def total(xs: List[int], k: int) -> int:\n    return sum(xs) * k", "ok", "compile_error"),
        # the harness's `==` on the raw value: APPS also takes a list wrapping the answer, or a tuple of it
        ("def total(xs, k):\n    return [sum(xs) * k]", "ok", "wrong"),
        ("def total(xs, k):\n    return (sum(xs) * k,)", "ok", "wrong"),
        ("def total(xs, k):\n    return sum(xs)", "wrong", "wrong"),
    ],
)
def test_lcb_functional_call_rules(code: str, apps: str, lcb: str) -> None:
    tests = lcb_call("total", [("[1, 2]\n2", "6"), ("[3]\n1", "3")])
    ours = judge(fenced(code), tests, timeout_s=2.0, memory_mb=512)
    theirs = judge(fenced(code), tests, memory_mb=512, comparison="lcb")
    assert (ours.status, ours.correct) == (apps, apps == "ok"), ours.detail
    assert (theirs.status, theirs.correct) == (lcb, lcb == "ok"), theirs.detail


def test_lcb_needs_the_raw_tests_and_ignores_quirks() -> None:
    apps_call = json.dumps(CALL)  # an APPS call row: no raw LiveCodeBench texts to parse
    assert (
        judge(fenced("def kth(a, k):\n    return 9"), apps_call, comparison="lcb").status == "gold_unparsable"
    )
    crash = judge(fenced("raise ValueError"), ADD, official_quirks=True, comparison="lcb")
    assert (crash.status, crash.correct) == ("runtime_error", False)
    with pytest.raises(ValueError, match="unknown comparison"):
        judge(fenced("print(1)"), ADD, comparison="exact")
