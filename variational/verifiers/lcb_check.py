"""LiveCodeBench as SkyThought's harness judges it (0d190f1 skythought/evals/tasks/livecodebench, method.md
§10), behaviour re-stated as pure functions; apps_check.judge(..., comparison="lcb") runs a program in our
sandbox under these rules (the official column of the `eval` table).

- the program: the last block of a fence whose language is letters only, with `</code>` / `<code>` removed;
- stdin tests: the whole printed output, stripped, equals the expected output stripped (one trailing "-" and
  what follows it dropped, as its test preparation does); no per-line or float tolerance;
- functional tests: the arguments parsed from the raw test text by its parser (key=value pairs, or one
  argument per line: quoted text, a JSON list, a number, else the text), the expected value JSON or text;
  the function is named by the word before the first `(` of the program and looked up in the module (no
  `class Solution` instance, no import prelude: the harness execs the program in an empty namespace), and
  its return value must `==` the expected value;
- time: no per-test limit, (6 + 1) * n_tests + 5 s for the whole suite; the first failing test ends it.
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```[A-Za-z]*\n(.*?)```", re.DOTALL)  # its has_code: a fence of letters only
TEST_S, SUITE_EXTRA_S = 6.0, 5.0  # check_correctness(timeout=6); the suite joins (timeout + 1) * n + 5


def budget_s(n_tests: int) -> float:
    return (TEST_S + 1.0) * n_tests + SUITE_EXTRA_S


def code_block(text: str | None) -> str | None:
    blocks = _FENCE.findall(text or "")
    if not blocks:
        return None
    return blocks[-1].split("</code>")[0].replace("```python", "").split("```")[0].replace("<code>", "")


def function_name(code: str) -> str | None:
    """The harness's guess at the function to call: the last word before the first `(`."""
    words = code.split("(")[0].split()
    return words[-1] if words else None


def expected_stdout(expected: Any) -> str:
    text = ("\n".join(map(str, expected)) if isinstance(expected, list) else str(expected or "")).strip()
    if text.endswith("-"):
        text = text[: text.rfind("-")].rstrip()
    return text


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def call_args(raw: str) -> list:
    """A functional test's input text -> the argument list, by the harness's parser (raises ValueError
    where it raises: then the harness fails the test whatever the program)."""
    if "=" in raw:  # `a = 1, b = "x"`: every value cast to int, float, else text without quotes
        parts = [part.strip() for part in raw.split(",")] if "," in raw else [raw]
        args = []
        for part in parts:
            _, value = part.split("=")
            cast = _scalar(value.strip())
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
            args.append(_scalar(line))
    return args


def expected_value(raw: str) -> Any:
    text = str(raw).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def output_matches(kind: str, got: Any, expected: Any) -> bool:
    """One test: a stdin program's printed text, or a call's returned value (decoded from its record)."""
    if kind == "stdin":
        return got.strip() == expected_stdout(expected)
    return got == expected
