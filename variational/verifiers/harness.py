"""The program that runs INSIDE the sandbox: executes one APPS/TACO candidate on every test input.

In (stdin, one JSON object): kind ("stdin" | "call"), code, fn_name, inputs (stdin: one text per test; call:
one argument list per test), timeout_s (per test), max_output_bytes, official_wrapping (stdin programs run
the way the official checker runs them: wrapped in `def code()`, in a module not named __main__), lcb (the
LiveCodeBench harness's exec: no import prelude, and call tests look fn_name up in the module itself).
Out (stdout, one JSON line per event): {"event": "compile_error", "error"}, then per test {"event": "test",
"i", "status": ran | runtime_error | timeout | sandbox_violation, "stdout" (stdin) or "value" (call, the
return value encoded by `encode`), "error", "ms"}, then {"event": "done"}.

This process never runs candidate code itself: every test runs in a forked child, so a program cannot
tamper with the harness, and the expected outputs never enter the sandbox (the trusted side compares).
When the harness is PID 1 of its own PID namespace (variational/verifiers/sandbox.py) it kills every other process
in the namespace after each test (`kill(-1)` spares only PID 1), so nothing a test started outlives it.
Standard library only (numpy for the official import prelude when installed and named by the program): it is passed to `python -c`
because the project tree is not visible inside the sandbox.
"""

import contextlib
import ctypes
import errno
import io
import json
import math
import os
import re
import resource
import select
import signal
import sys
import time
import traceback
import types

# The official checker's import prelude (method.md §9), made available to every program.
PRELUDE = """\
import sys
import time
import itertools
from itertools import accumulate, product, permutations, combinations
import collections
from collections import Counter, OrderedDict, deque, defaultdict, ChainMap
from functools import lru_cache
import math
from math import sqrt, sin, cos, tan, ceil, fabs, floor, gcd, exp, log, log2
import fractions
from typing import List, Tuple
import random
import heapq
from heapq import *
"""
EXIT_RUNTIME, EXIT_VIOLATION, EXIT_COMPILE = 101, 102, 103
# exceptions that mean "the jail said no": memory, processes, files outside the temp dir, the network,
# file size (Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE raises EFBIG), open files
_VIOLATION_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EAGAIN,
    errno.ENETUNREACH,
    errno.ENOSPC,
    errno.EFBIG,
    errno.EMFILE,
}


class PerTestTimeout(BaseException):  # BaseException: a program's `except Exception` does not swallow it
    pass


def official_wrap(code: str) -> str:
    """The official stdin wrapping: top-of-file import lines stay at module level, everything from the
    first other line on becomes the body of `def code()` (later import lines are indented into it)."""
    out, started = [], False
    for line in code.split("\n"):
        is_import = line.startswith(("from ", "import "))
        if not started and not is_import:
            out += ["stdin = sys.stdin", "stdout = sys.stdout", "def code():"]
            started = True
        out.append("\t" + line if started else line)
    return "\n".join(out) + "\n"


def encode(value, depth: int = 0):
    """A return value as JSON that keeps what the official `==` sees: tuples, sets and non-string dict
    keys are tagged; numpy scalars become Python numbers; anything else is opaque (never equal)."""
    if depth > 200:
        raise RecursionError("return value nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    for plain in (str, int, float):  # subclasses (IntEnum, numpy.float64) compare as their base type
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, list):
        return [encode(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, depth + 1) for v in value]}
    if isinstance(value, (set, frozenset)):
        tag = "__frozenset__" if isinstance(value, frozenset) else "__set__"
        return {tag: [encode(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"__dict__": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return encode(value.item(), depth + 1)
    return {"__opaque__": type(value).__name__}


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def classify(exc: BaseException) -> int:
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in _VIOLATION_ERRNOS):
        return EXIT_VIOLATION
    return EXIT_RUNTIME


def fresh_module(name: str, prelude: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(prelude)
    sys.modules[name] = module
    return module


def child_setup(cpu_s: int, stdin_path: str, stdout_path: str, keep_fd: int = 2) -> None:
    """In the forked child, before candidate code: its own stdio, a CPU limit, nothing else open but
    `keep_fd` (the call child's result pipe)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    for fd, path, flags in ((0, stdin_path, os.O_RDONLY), (1, stdout_path, os.O_WRONLY | os.O_APPEND)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.dup2(os.open("stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
    os.closerange(3, keep_fd)
    os.closerange(max(3, keep_fd + 1), 1 << 16)
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8")
    sys.argv = ["solution.py"]


def finish_child(exc: BaseException | None) -> None:
    try:
        sys.stdout.flush()
    except BaseException as e:  # a flush past RLIMIT_FSIZE is the program's output, not ours
        exc = exc or e
    if exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    os._exit(0 if exc is None else classify(exc))


def run_stdin_child(code_obj, prelude: dict, module_name: str, wrapped: bool) -> None:
    module = fresh_module(module_name, prelude)
    sys.modules["__main__"] = module
    try:
        exec(code_obj, module.__dict__)
    except SystemExit:
        finish_child(None)
    except BaseException as e:
        if wrapped:  # officially the module is loaded before the run: its failure is a compile error (-2)
            traceback.print_exception(e, file=sys.stderr)
            sys.stderr.flush()
            os._exit(EXIT_COMPILE)
        finish_child(e)
    try:
        if wrapped:  # the official wrapping defines code(); calling it runs the program
            module.code()
        exc = None
    except SystemExit:  # the official checker catches SystemExit and compares what was printed
        exc = None
    except BaseException as e:
        exc = e
    finish_child(exc)


def kill_others() -> None:
    """Kill every process of this namespace but us (PID 1), then reap them all."""
    if os.getpid() == 1:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if os.getpid() == 1 else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait_child(pid: int, timeout_s: float) -> tuple[int | None, float]:
    """(wait status or None on timeout, elapsed ms). On timeout the child's group is killed."""
    t0 = time.monotonic()
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    if not ready:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return (status if ready else None), (time.monotonic() - t0) * 1e3


def child_status(status: int | None) -> str:
    if status is None:
        return "timeout"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):  # the CPU rlimit: SIGXCPU at soft, SIGKILL at hard
            return "timeout"
        return "sandbox_violation" if sig == signal.SIGXFSZ else "runtime_error"
    code = os.WEXITSTATUS(status)
    return {0: "ran", EXIT_VIOLATION: "sandbox_violation", EXIT_COMPILE: "compile_error"}.get(
        code, "runtime_error"
    )


def read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def stderr_tail() -> str:
    try:
        return read_capped("stderr.txt", 1 << 16)[-800:]
    except OSError:
        return ""


def fresh_file(path: str, content: str = "") -> None:
    """A new regular file (a program may have left a symlink or a FIFO under that name)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(content)


def compile_stdin(code: str, official: bool):
    """(code object, wrapped). Officially every stdin program is wrapped in `def code()`; we run it as a
    script, and wrap only a program that compiles solely as a function body (a top-level `return`, which
    APPS reference solutions written for the official harness use)."""
    if official:
        return compile(official_wrap(code), "solution.py", "exec"), True
    try:
        return compile(code, "solution.py", "exec"), False
    except SyntaxError as e:
        if e.msg != "'return' outside function":
            raise
    return compile(official_wrap(code), "solution.py", "exec"), True


def run_stdin_tests(spec: dict, prelude: dict) -> None:
    official = bool(spec.get("official_wrapping"))
    try:
        code_obj, wrapped = compile_stdin(spec["code"], official)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        emit({"event": "compile_error", "error": f"{type(e).__name__}: {e}"})
        return
    module_name = "solution" if official else "__main__"  # officially the module is `tmp_sol`
    timeout_s = float(spec["timeout_s"])
    for i, text in enumerate(spec["inputs"]):
        fresh_file("stdin.txt", text)
        fresh_file("stdout.txt")
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # its own group, for the kill outside a PID namespace
            child_setup(math.ceil(timeout_s) + 1, "stdin.txt", "stdout.txt")
            run_stdin_child(code_obj, prelude, module_name, wrapped)
        status, ms = wait_child(pid, timeout_s)
        kill_others()  # daemons and forked children die with the test, whatever its verdict
        state = child_status(status)
        event = {"event": "test", "i": i, "status": state, "ms": round(ms, 1)}
        if state == "ran":
            event["stdout"] = read_capped("stdout.txt", int(spec["max_output_bytes"]))
        else:
            event["error"] = stderr_tail()
        emit(event)


def call_tests_child(code_obj, spec: dict, prelude: dict, results_fd: int) -> None:
    """One child for all call tests, as the official checker does (one Solution() instance for all)."""
    results = os.fdopen(results_fd, "w", encoding="utf-8")
    module = fresh_module("solution", prelude)  # not __main__: a `__main__` block must not run
    try:
        exec(code_obj, module.__dict__)
        lookup_solution = "class Solution" in spec["code"] and not spec.get("lcb")
        holder = module.Solution() if lookup_solution else module
        method = getattr(holder, spec["fn_name"])
    except BaseException as e:  # the official -2: the module, the instance or the function fails
        results.write(json.dumps({"event": "compile_error", "error": f"{type(e).__name__}: {e}"}) + "\n")
        results.flush()
        os._exit(0)

    def alarm(signum, frame):
        raise PerTestTimeout

    signal.signal(signal.SIGALRM, alarm)
    for i, args in enumerate(spec["inputs"]):
        event = {"event": "test", "i": i}
        t0 = time.monotonic()
        try:
            if isinstance(args, list) and args and isinstance(args[0], dict):
                # the official checker turns JSON's string keys back into ints (and keeps one argument)
                with contextlib.suppress(ValueError):
                    args = [{int(k): v for k, v in args[0].items()}]
            signal.setitimer(signal.ITIMER_REAL, float(spec["timeout_s"]))
            value = method(*args)
            signal.setitimer(signal.ITIMER_REAL, 0)
            event.update(status="ran", value=encode(value))
        except PerTestTimeout:
            event.update(status="timeout")
        except BaseException as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            state = "sandbox_violation" if classify(e) == EXIT_VIOLATION else "runtime_error"
            event.update(status=state, error=f"{type(e).__name__}: {e}"[-800:])
        event["ms"] = round((time.monotonic() - t0) * 1e3, 1)
        results.write(json.dumps(event) + "\n")
        results.flush()
    os._exit(0)


def run_call_tests(spec: dict, prelude: dict) -> None:
    try:
        code_obj = compile(spec["code"], "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        emit({"event": "compile_error", "error": f"{type(e).__name__}: {e}"})
        return
    n, timeout_s = len(spec["inputs"]), float(spec["timeout_s"])
    fresh_file("stdin.txt")
    fresh_file("stdout.txt")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.close(read_fd)
        results_fd = os.dup2(write_fd, 3)
        child_setup(math.ceil(timeout_s * n) + 2, "stdin.txt", "stdout.txt", keep_fd=results_fd)
        call_tests_child(code_obj, spec, prelude, results_fd)
    os.close(write_fd)
    relay_call_results(os.fdopen(read_fd, "rb"), pid, n, timeout_s)


def relay_call_results(results, pid: int, n: int, timeout_s: float) -> None:
    """Forward the child's result lines; a test past its deadline (the child ignored its alarm) or a
    child that died ends the run: the remaining tests get timeout (killed) or runtime_error."""
    done, buffer = 0, b""
    deadline = time.monotonic() + timeout_s + 2.0  # the first deadline includes the module's own start
    while done < n:
        ready, _, _ = select.select([results], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(results.fileno(), 1 << 20) if ready else None
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            event = json.loads(line)
            emit(event)
            if event["event"] == "compile_error":
                done = n
                break
            done += 1
            deadline = time.monotonic() + timeout_s + 1.0
    killed = done < n and chunk is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    kill_others()
    for i in range(done, n):
        state = "timeout" if killed else child_status(status)
        emit(
            {
                "event": "test",
                "i": i,
                "status": "runtime_error" if state == "ran" else state,
                "killed": killed,
                "error": stderr_tail(),
                "ms": 0.0,
            }
        )


def main() -> None:
    if os.getpid() == 1:  # our parent (unshare) dying must take the whole namespace with it
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; the uid change cleared it
    ctypes.CDLL(None).prctl(4, 0)  # PR_SET_DUMPABLE 0: tests cannot ptrace us or open /proc/1/fd
    spec = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    os.chdir(os.environ.get("HOME") or ".")  # the jail's only writable folder (sandbox.py sets HOME)
    prelude: dict = {}
    if not spec.get("lcb"):  # the LiveCodeBench harness execs the program in an empty namespace
        exec(PRELUDE, prelude)
    # numpy is part of the official prelude too, but importing it costs more than starting the jail
    # (measured 0.3-0.8 s): only a program that names it can tell, so only then is it imported
    if not spec.get("lcb") and re.search(r"\bnp\b|numpy", spec["code"]):
        # not installed, or the memory limit is below its footprint: the program will say so itself
        with contextlib.suppress(ImportError, MemoryError):
            exec("import numpy as np", prelude)
    if spec["kind"] == "call":
        run_call_tests(spec, prelude)
    else:
        run_stdin_tests(spec, prelude)
    emit({"event": "done"})


if __name__ == "__main__":
    main()
