"""Process-group checks for the stop tests: start a child in its own group, signal it, and see that the
child and everything it started (engine cores, pool workers, forkservers) are gone.

    proc = start_in_new_group([sys.executable, "-c", CODE])
    ...
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    assert wait_group_gone(proc.pid) == []

Zombies do not count: in a container whose PID 1 does not reap, an orphan's zombie can linger, yet it runs
nothing and holds no memory. `os.killpg(pgid, 0)` would count them, so this reads /proc instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path


def start_in_new_group(cmd: list[str], **popen: object) -> subprocess.Popen:
    """A child that leads its own session and process group (pgid == its pid). Its stdout and stderr are
    collected, line by line, into `proc.lines` by a thread (reading them never blocks the test)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)  # type: ignore[call-overload]
    proc.lines = []  # type: ignore[attr-defined]
    threading.Thread(target=_collect, args=(proc,), daemon=True).start()
    return proc


def _collect(proc: subprocess.Popen) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        proc.lines.append(line)  # type: ignore[attr-defined]


def output(proc: subprocess.Popen, last: int = 60) -> str:
    return "".join(proc.lines[-last:])  # type: ignore[attr-defined]


def group_members(pgid: int) -> list[str]:
    """'pid state command' of every live (non-zombie) process whose process group is pgid."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
            state, group = rest[0], int(rest[2])  # fields 3 and 5 of proc(5)
            if group == pgid and state != "Z":
                members.append(f"{stat.parent.name} {state} {name}")
    return members


def wait_group_gone(pgid: int, timeout_s: float = 10.0) -> list[str]:
    """Wait up to timeout_s for the group to empty; return who is left (empty when all are gone). Leftovers
    are then killed, so one failing test does not leave processes behind for the next."""
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return left


def wait_for_line(proc: subprocess.Popen, marker: str, timeout_s: float) -> None:
    """Wait until the child printed a line containing `marker`; kill it and fail with its output if it
    exits or stays silent for timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(marker in line for line in proc.lines):  # type: ignore[attr-defined]
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {marker!r} from the child within {timeout_s:.0f}s:\n{output(proc)}")
