"""trainers/launch.py: the torchrun command, a child's output streamed into a logger, a failure raised with
its tail, a stop request forwarded to the child (real subprocesses, no torch in the children)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainers import launch

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_command() -> None:
    cmd = launch.torchrun_command(4, 1, ["--out", "o"])
    assert cmd[:2] == [sys.executable, "-c"] and cmd[3] == str(os.getpid())
    assert cmd[4:] == ["--nproc-per-node", "4", "--standalone", "-m", "trainers.perf", "--out", "o"]
    multi = launch.torchrun_command(8, 2, [], rdzv_endpoint="node0:29400")
    assert (
        multi[multi.index("--nnodes") + 1] == "2"
        and multi[multi.index("--rdzv-endpoint") + 1] == "node0:29400"
    )
    with pytest.raises(ValueError, match="VARIATIONAL_RDZV_ENDPOINT"):
        launch.torchrun_command(8, 2, [])
    env = launch.child_env(2)
    assert env["PYTHONUNBUFFERED"] == "1" and str(REPO) in env["PYTHONPATH"].split(os.pathsep)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_stream_logs_lines_and_raises_with_tail(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test_launch")
    with caplog.at_level(logging.INFO, logger="test_launch"):
        launch.stream(
            python("print('step 1'); import sys; print('warn', file=sys.stderr)"), log, dict(os.environ)
        )
    assert [r.getMessage() for r in caplog.records] == ["step 1", "warn"]
    code = "for i in range(100): print(f'line {i}')\nraise SystemExit(3)"
    with pytest.raises(RuntimeError, match="exit 3") as err:
        launch.stream(python(code), log, dict(os.environ))
    assert "line 99" in str(err.value) and "line 59" not in str(err.value)  # the last TAIL_LINES lines


CHILD = """
import signal, sys, time
def on_term(*_):
    print('child: checkpoint written', flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
print('child: training', flush=True)
time.sleep(120)
"""

HARNESS = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
from trainers import launch
from variational import shutdown
shutdown.install()
try:
    launch.stream([sys.executable, "-c", sys.argv[1]], logging.getLogger("h"), dict(os.environ))
except shutdown.StopRequested as stop:
    print("harness: stopped", stop.signal_name, flush=True)
    sys.exit(stop.exit_code)
"""


def test_stop_request_is_forwarded_to_the_child() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, CHILD],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until the child runs, then stop the harness as a scheduler would
        lines.append(line.strip())
        if line.startswith("child: training"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, lines
    assert "child: checkpoint written" in lines and "harness: stopped SIGTERM" in lines


def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    """SIGKILL the launching process: the torchrun bootstrap's PR_SET_PDEATHSIG ends the child."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    # the bootstrap runs torch.distributed.run; here it runs a plain module instead, to keep torch out
    bootstrap = launch._BOOTSTRAP.replace("torch.distributed.run", "runpy_child")
    (tmp_path / "runpy_child.py").write_text(child)
    parent_code = (
        "import subprocess, sys, os, time\n"
        f"subprocess.Popen([sys.executable, '-c', {bootstrap!r}, str(os.getpid())], cwd={str(tmp_path)!r},"
        f" env=dict(os.environ, PYTHONPATH={str(tmp_path)!r}))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    for _ in range(600):  # up to 60 s for the child to start
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(300):
        if not alive(child_pid):
            break
        time.sleep(0.1)
    assert not alive(child_pid)


def alive(pid: int) -> bool:
    """Running (a zombie reparented to init is as good as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
