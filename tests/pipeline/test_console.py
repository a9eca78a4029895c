"""variational/pipeline/console.py: in a child process (its real file descriptors), the terminal gets the
flow's own lines and errors; prints, library logs, warnings and a grandchild's output go to the log file
only; `verbose` shows everything and still writes the file; the descriptors come back afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from variational.pipeline.console import is_flow_line, log_path

CHILD = textwrap.dedent(
    """
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from variational.pipeline import shardstats
    from variational.pipeline.console import run_console
    from variational.pipeline.progress import StageProgress

    logging.basicConfig(level=logging.WARNING)  # as Prefect's console handler: records to stderr
    logging.getLogger("variational").setLevel(logging.INFO)
    with run_console(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
        record = shardstats.new_record("rollouts", 1, 0, rows_out=4, seconds=2.0)
        StageProgress("rollouts", 2, [], logging.getLogger("variational")).advance(record)  # ours: INFO
        logging.getLogger("vllm.engine").warning("ENGINE-WARNING")  # a library's warning
        logging.getLogger("vllm.engine").error("ENGINE-ERROR")  # errors always reach the terminal
        print("PRINTED", flush=True)
        os.write(2, b"RAW-STDERR\\n")
        warnings.warn("PY-WARNING")
        subprocess.run([sys.executable, "-c", "print('GRANDCHILD')"], check=True)
    print("AFTER")
    """
)


def _run(tmp_path: Path, verbose: bool) -> tuple[str, str]:
    log = tmp_path / "logs" / "run.log"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(log), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout + out.stderr, log.read_text()


def test_terminal_gets_the_flow_lines_and_the_file_everything(tmp_path: Path) -> None:
    terminal, logged = _run(tmp_path, verbose=False)
    assert "rollouts: 1/2 shards; ETA 2s; shard 0: 4 rows in 2.0s" in terminal
    assert "ENGINE-ERROR" in terminal and "AFTER" in terminal
    for noise in ("ENGINE-WARNING", "PRINTED", "RAW-STDERR", "PY-WARNING", "GRANDCHILD"):
        assert noise not in terminal, noise
        assert noise in logged, noise
    assert "AFTER" not in logged  # the descriptors were given back
    assert "rollouts: 1/2 shards" in logged  # the flow's lines are in the file too


def test_verbose_shows_everything_and_still_writes_the_file(tmp_path: Path) -> None:
    terminal, logged = _run(tmp_path, verbose=True)
    for line in ("ENGINE-WARNING", "PRINTED", "RAW-STDERR", "PY-WARNING", "GRANDCHILD"):
        assert line in terminal and line in logged, line


def test_log_path_is_in_the_run_folder(tmp_path: Path) -> None:
    path = log_path(tmp_path, "tiny")
    assert path.parent == tmp_path / "tiny" / "logs" and path.name.startswith("run-")


def test_log_path_of_a_read_only_root_is_on_this_machine(tmp_path: Path) -> None:
    """A finished root on a read-only mount is reusable (issue 17 item 7): `variational run`'s log goes to
    $VARIATIONAL_HOME/logs/<run> there (as on object storage), never into the root."""
    from conftest import read_only_view

    root, home = tmp_path / "root", tmp_path / "home"
    (root / "tiny").mkdir(parents=True)
    code = (
        "import sys; from variational.pipeline.console import log_path; print(log_path(sys.argv[1], 'tiny'))"
    )
    env = {**os.environ, "VARIATIONAL_HOME": str(home)}
    cmd = [*read_only_view(root), sys.executable, "-c", code, str(root)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).parent == home / "logs" / "tiny"


@pytest.mark.parametrize(
    "name, path, level, shown",
    [
        ("prefect.task_runs", "/x/variational/pipeline/runner.py", 20, True),
        ("prefect.task_runs", "/site-packages/prefect/task_engine.py", 20, False),  # "Finished in state"
        ("prefect.flow_runs", "/site-packages/prefect/flow_engine.py", 20, True),  # the run's start and end
        ("vllm", "/site-packages/vllm/engine.py", 30, False),
        ("vllm", "/site-packages/vllm/engine.py", 40, True),
    ],
)
def test_which_records_are_flow_lines(name: str, path: str, level: int, shown: bool) -> None:
    import logging

    from variational.pipeline import console

    if path.startswith("/x/"):
        path = str(console.REPO / path.removeprefix("/x/"))
    record = logging.LogRecord(name, level, path, 1, "msg", None, None)
    assert is_flow_line(record) is shown
