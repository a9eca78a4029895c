"""The program that runs INSIDE the sandbox: executes one APPS/TACO candidate on every test input.

In (stdin, one JSON object): kind ("stdin" | "call"), code, fn_name, inputs (stdin: one text per test; call:
one argument list per test), timeout_s (per test), official_wrapping (stdin programs run the way the
official checker runs them: wrapped in `def code()`, in a module not named __main__), lcb (the
LiveCodeBench harness's exec: no import prelude, and call tests look fn_name up in the module itself).
Out (stdout): the records of variational/verifiers/protocol.py, one JSON line each: start, then
compile_error or one test record per test in turn (what it printed or returned, or how it failed), or
invalid, then done. Nothing here judges: the expected outputs never enter the sandbox, and the trusted side
(apps_check.py) checks every record and compares the outputs itself.

This process never runs candidate code: every test runs in a forked child, which is handed its stdin,
stdout and stderr as anonymous memory files (memfd), so no name in /sandbox the program could replace (a
FIFO, a symlink) or lock away (chmod) is ever read by the harness; stdout is read back bounded. The
call-form child runs the program's module and all its calls (one Solution() instance, as officially) and
writes one record per test on a pipe: the program shares that process, so the harness checks each line
(`parse_record`, index in turn, nothing after the last) before passing it on, and a line out of shape ends
the run as `invalid`. What a well-formed forged line can claim, the program could have returned itself.
When the harness is PID 1 of its own PID namespace (variational/verifiers/sandbox.py) the kernel delivers
it only signals it handles, and it handles none (SIGINT is reset from Python's KeyboardInterrupt), so the
program cannot signal it; it kills every other process of the namespace after each test (`kill(-1)` spares
only PID 1), so nothing a test started outlives it; it is not dumpable, so it cannot be ptraced and its
/proc/1/fd cannot be opened.
Standard library only (numpy for the official import prelude when installed and named by the program): it
is passed to `python -c`, after protocol.py's code, because the project tree is not visible inside the jail.
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

if "parse_record" not in globals():  # imported (tests); in the jail protocol.py's code runs ahead of ours
    from variational.verifiers.protocol import (
        MAX_ERROR_CHARS,
        MAX_OUTPUT_BYTES,
        MAX_RECORD_BYTES,
        LineReader,
        ProtocolError,
        encode_value,
        parse_record,
        result_record,
    )

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


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
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


def memory_file(name: str, data: bytes = b"") -> int:
    """An anonymous file (no name anywhere a program can reach); RLIMIT_FSIZE caps what it may hold."""
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_head(fd: int, limit: int) -> bytes:
    """The first `limit` bytes of a file, from offset 0 whatever the child did with the shared offset."""
    parts, offset = [], 0
    while offset < limit and (part := os.pread(fd, min(limit - offset, 1 << 22), offset)):
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


def stderr_tail(fd: int) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, 1 << 16, max(0, size - (1 << 16))).decode("utf-8", errors="replace")[-800:]


def child_setup(cpu_s: int, stdio: tuple[int, int, int], keep_fd: int = 2) -> None:
    """In the forked child, before candidate code: its own stdio (memory files), a CPU limit, nothing
    else open but `keep_fd` (the call child's result pipe)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
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
        emit({"event": "compile_error", "error": f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]})
        return
    module_name = "solution" if official else "__main__"  # officially the module is `tmp_sol`
    timeout_s = float(spec["timeout_s"])
    for i, text in enumerate(spec["inputs"]):
        stdio = (
            memory_file("stdin", text.encode("utf-8", errors="replace")),
            memory_file("stdout"),
            memory_file("stderr"),
        )
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # its own group, for the kill outside a PID namespace
            child_setup(math.ceil(timeout_s) + 1, stdio)
            run_stdin_child(code_obj, prelude, module_name, wrapped)
        status, ms = wait_child(pid, timeout_s)
        kill_others()  # daemons and forked children die with the test, whatever its verdict
        state = child_status(status)
        if state == "ran":
            emit(result_record(i, state, ms, stdout=read_head(stdio[1], MAX_OUTPUT_BYTES)))
        else:
            emit(result_record(i, state, ms, error=stderr_tail(stdio[2])))
        for fd in stdio:
            os.close(fd)


def call_tests_child(code_obj, spec: dict, prelude: dict, results_fd: int, token: bytes) -> None:
    """One child for all call tests, as the official checker does (one Solution() instance for all).
    Each line it sends starts with `token`, so a line the program writes blindly is refused."""
    results = os.fdopen(results_fd, "wb")

    def send(record: dict) -> None:
        results.write(token + b" " + json.dumps(record).encode() + b"\n")
        results.flush()

    module = fresh_module("solution", prelude)  # not __main__: a `__main__` block must not run
    try:
        exec(code_obj, module.__dict__)
        lookup_solution = "class Solution" in spec["code"] and not spec.get("lcb")
        holder = module.Solution() if lookup_solution else module
        method = getattr(holder, spec["fn_name"])
    except BaseException as e:  # the official -2: the module, the instance or the function fails
        send({"event": "compile_error", "error": f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]})
        os._exit(0)

    def alarm(signum, frame):
        raise PerTestTimeout

    signal.signal(signal.SIGALRM, alarm)
    for i, args in enumerate(spec["inputs"]):
        send(call_test(method, args, i, float(spec["timeout_s"])))
    os._exit(0)


def call_test(method, args, i: int, timeout_s: float) -> dict:
    """Test i of the call form -> its record: the return value (plain data; a value too large or too deep
    to carry is opaque, so it equals nothing, as it would equal no expected output), or how it failed."""
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        returned = call(method, args)
        ms = (time.monotonic() - t0) * 1e3
        try:  # the program's code may run here too (a str subclass's __str__)
            value = encode_value(returned)
            carried = len(json.dumps(value)) < MAX_RECORD_BYTES - 1000
        except (RecursionError, ValueError):  # nested past MAX_DEPTH, an int past Python's digit limit
            carried = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        return result_record(i, "ran", ms, value=value if carried else {"__opaque__": "too large to carry"})
    except PerTestTimeout:
        return result_record(i, "timeout", (time.monotonic() - t0) * 1e3, error="")
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        state = "sandbox_violation" if classify(e) == EXIT_VIOLATION else "runtime_error"
        return result_record(i, state, (time.monotonic() - t0) * 1e3, error=f"{type(e).__name__}: {e}")


def call(method, args):
    if isinstance(args, list) and args and isinstance(args[0], dict):
        # the official checker turns JSON's string keys back into ints (and keeps one argument)
        with contextlib.suppress(ValueError):
            args = [{int(k): v for k, v in args[0].items()}]
    return method(*args)


def run_call_tests(spec: dict, prelude: dict) -> None:
    try:
        code_obj = compile(spec["code"], "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        emit({"event": "compile_error", "error": f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]})
        return
    n, timeout_s = len(spec["inputs"]), float(spec["timeout_s"])
    stdio = (memory_file("stdin"), memory_file("stdout"), memory_file("stderr"))
    read_fd, write_fd = os.pipe()
    token = os.urandom(16).hex().encode()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.close(read_fd)
        results_fd = os.dup2(write_fd, 3)
        child_setup(math.ceil(timeout_s * n) + 2, stdio, keep_fd=results_fd)
        call_tests_child(code_obj, spec, prelude, results_fd, token)
    os.close(write_fd)
    relay_call_results(read_fd, pid, n, timeout_s, stdio[2], token)


def relay_call_results(
    read_fd: int, pid: int, n: int, timeout_s: float, stderr_fd: int, token: bytes
) -> None:
    """Check and pass on the child's records; a line without `token`, out of shape or out of turn, or
    anything after the last test, ends the run as `invalid`. A test past its deadline (the child ignored
    its alarm) or a child that died ends it too: the remaining tests get `killed`, or its exit status."""
    lines, done, invalid = LineReader(read_fd, MAX_RECORD_BYTES + len(token) + 1), 0, None
    deadline = time.monotonic() + timeout_s + 2.0  # the first deadline includes the module's own start
    while done < n:
        line = lines.next(deadline)
        if line is None:
            break
        try:
            if not line.startswith(token + b" "):
                raise ProtocolError("a line the harness's code did not write")
            line = line[len(token) + 1 :]
            record = parse_record(line, "call")
            if not (record["event"] == "test" and record["i"] == done) and not (
                record["event"] == "compile_error" and done == 0
            ):
                raise ProtocolError(f"a {record['event']} record where test {done} was due")
        except ProtocolError as e:
            invalid = f"test {done}: {e}"
            break
        sys.stdout.buffer.write(line + b"\n")
        sys.stdout.flush()
        done = n if record["event"] == "compile_error" else done + 1
        deadline = time.monotonic() + timeout_s + 1.0
    killed = lines.timed_out
    if done == n and lines.next(time.monotonic() + 1.0) is not None:  # an honest child exits right away
        invalid = "a record after the last test"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    kill_others()
    if invalid is not None:
        emit({"event": "invalid", "error": invalid[:MAX_ERROR_CHARS]})
        return
    state = "killed" if killed else child_status(status)
    for i in range(done, n):
        emit(
            result_record(i, "runtime_error" if state == "ran" else state, 0.0, error=stderr_tail(stderr_fd))
        )


def main() -> None:
    # PID 1 of a namespace receives only the signals it handles: Python's SIGINT handler (KeyboardInterrupt)
    # would let a program stop the harness with kill(1, SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
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
    emit({"event": "start"})  # from here on, a harness that stops early was stopped by the program
    if spec["kind"] == "call":
        run_call_tests(spec, prelude)
    else:
        run_stdin_tests(spec, prelude)
    emit({"event": "done"})


if __name__ == "__main__":
    main()
