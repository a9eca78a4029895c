"""variational/sandbox.py: code extraction, output comparison, and the limits of one test run."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from variational.sandbox import last_code_block, net_prefix, normalise, run_test, run_tests

TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5   7", "output": "  12  \n\n"}]


def fenced(code: str) -> str:
    return f"Reasoning...\n```python\nprint('not this one')\n```\nFinal:\n```python\n{code}\n```\n"


def test_last_code_block() -> None:
    assert last_code_block(fenced("x = 1")) == "x = 1\n"
    assert last_code_block("```cpp\nint main(){}\n```") is None
    assert last_code_block("```\nprint(1)\n```") == "print(1)\n"
    assert last_code_block("```py\nprint(2)\n```\n```text\nout\n```") == "print(2)\n"
    assert last_code_block("no code") is None
    assert last_code_block("```python\nunclosed") is None
    assert last_code_block(None) is None


def test_normalise() -> None:
    assert normalise("\n  1   2 \n3\t\n\n") == normalise("1 2\n3") == ["1 2", "3"]
    assert normalise("1\n\n2") != normalise("1\n2")  # inner blank lines count


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("a, b = map(int, input().split())\nprint(a + b)", "ok"),
        ("print(3)", "wrong"),  # passes the first test only
        ("raise SystemExit(1)", "wrong"),
        ("while True:\n    pass", "timeout"),  # CPU limit / wall timeout
        ("import time\ntime.sleep(60)", "timeout"),  # wall timeout
        ("x = bytearray(2 * 1024**3)\nprint(3)", "wrong"),  # MemoryError under RLIMIT_AS
        ("import os\nos.fork() or print(3)", "wrong"),  # a child process is no way around the check
    ],
)
def test_run_tests(code: str, status: str) -> None:
    t0 = time.perf_counter()
    assert run_tests(code, TESTS, timeout_s=1.0, memory_mb=256) == status
    assert time.perf_counter() - t0 < 6


def test_print_flood_is_cut(tmp_path: Path) -> None:
    program = tmp_path / "main.py"
    program.write_text("while True:\n    print('x' * 10**6)")
    assert run_test(program, "", "x", timeout_s=5, memory_mb=256) in {"wrong", "timeout"}
    assert (tmp_path / "stdout.txt").stat().st_size <= 64 * 2**20


def test_no_network(tmp_path: Path) -> None:
    if not net_prefix():
        pytest.skip("no `unshare -n` on this machine: programs keep the host network")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    code = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\n"
        "except OSError:\n    print('blocked')"
    )
    try:
        assert run_tests(code, [{"input": "", "output": "blocked"}], timeout_s=5, memory_mb=256) == "ok"
    finally:
        srv.close()
