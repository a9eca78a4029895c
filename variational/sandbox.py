"""Run an untrusted Python program on stdin/stdout tests: the code verifier's sandbox.

In:  a model output (the last fenced ```python block is the program) and tests [{input, output}].
Out: a status per program: ok (every test passed) / wrong (bad output or crash) / timeout / no_answer.

Each test runs `python -I main.py` in a fresh temp dir (cwd), in its own session (killed as a group at the
wall timeout), under RLIMIT_CPU / RLIMIT_AS / RLIMIT_FSIZE (stdout goes to a file, so a print loop dies of
SIGXFSZ instead of filling our memory), and without network: `unshare -n` (root) or `unshare -rn` (user
namespaces) gives it a namespace with only a downed loopback. Where neither works the program runs with
the host network; that is logged once. This is a guard against accidents, not a security boundary: for
adversarial code use a container / gVisor runner.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
PY_LANGS = {"python", "python3", "py", ""}
MAX_OUTPUT_MB = 64


def last_code_block(text: str | None) -> str | None:
    """The body of the last ```python (or unlabelled) fenced block; None when there is none."""
    if not text:
        return None
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in PY_LANGS]
    return blocks[-1] if blocks else None


@functools.cache
def net_prefix() -> tuple[str, ...]:
    """The command prefix that cuts the network off, or () when this machine has none."""
    if exe := shutil.which("unshare"):
        for flags in ("-n", "-rn"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if subprocess.run([exe, flags, "true"], capture_output=True, timeout=10).returncode == 0:
                    return (exe, flags)
    logging.getLogger("variational").warning(
        "sandbox: `unshare -n` unavailable; test programs run WITHOUT network isolation"
    )
    return ()


def _limits(cpu_s: int, memory_mb: int) -> None:
    # preexec_fn runs between fork and exec: only setrlimit calls here (no imports, no locks)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_OUTPUT_MB * 2**20, MAX_OUTPUT_MB * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def normalise(out: str) -> list[str]:
    """Whitespace-normalised lines: blanks collapse inside a line, leading/trailing blank lines go."""
    return [" ".join(line.split()) for line in out.strip().splitlines()]


def run_test(program: Path, stdin: str, expected: str, timeout_s: float, memory_mb: int) -> str:
    """Run `program` once, in its folder, on `stdin` -> ok / wrong / timeout."""
    cwd = program.parent
    (cwd / "stdin.txt").write_text(stdin)
    cmd = [*net_prefix(), sys.executable, "-I", program.name]
    with open(cwd / "stdin.txt", "rb") as fin, open(cwd / "stdout.txt", "wb") as fout:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=fin,
            stdout=fout,
            stderr=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(cwd)},
            start_new_session=True,  # the group dies on timeout, grandchildren included
            preexec_fn=functools.partial(_limits, math.ceil(timeout_s) + 1, memory_mb),
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"
    if code in (-signal.SIGXCPU, -signal.SIGKILL):  # the CPU rlimit: SIGXCPU at soft, SIGKILL at hard
        return "timeout"
    if code != 0:
        return "wrong"
    out = (cwd / "stdout.txt").read_bytes().decode("utf-8", errors="replace")
    return "ok" if normalise(out) == normalise(expected) else "wrong"


def run_tests(code: str, tests: list[dict], timeout_s: float, memory_mb: int) -> str:
    """`code` on every test, stopping at the first failure -> ok / wrong / timeout."""
    status = "ok"
    with tempfile.TemporaryDirectory(prefix="variational-sandbox-") as tmp:
        program = Path(tmp) / "main.py"
        program.write_text(code)
        for t in tests:
            status = run_test(program, t.get("input") or "", t.get("output") or "", timeout_s, memory_mb)
            if status != "ok":
                break
    return status
