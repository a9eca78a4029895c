"""The console of `variational run`: the flow's own lines on the terminal, everything in the run's log file.

Everything this process and its children write to stdout and stderr (file descriptors 1 and 2: vLLM's
engine processes and progress bars, library warnings, torchrun, Ray workers, Prefect's console handler)
goes to `<data_root>/<run>/logs/run-<time>.log` (on object storage or a read-only root:
$VARIATIONAL_HOME/logs/<run>/). The terminal shows:
- by default, the flow's own lines: log records of this project's code at INFO or above (stage computing /
  done, shards done of total with an ETA, engine ready, training steps), Prefect's flow-run lines (its
  start, the UI link, the final state), and every ERROR; other libraries' INFO and WARNING lines (vLLM's
  ~250 per tiny run) are in the file only;
- with `verbose`, every byte, as before (and the file still gets them all).
Prefect's API still receives the task-run logs as before (its handlers are untouched).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from variational.pipeline.records import check_name
from variational.pipeline.runs import run_folder
from variational.pipeline.storage import home, is_url, open_root

REPO = Path(__file__).resolve().parents[2]
_OURS = tuple(str(REPO / p) + os.sep for p in ("variational", "flows", "tasks", "trainers"))


def log_path(data_root: str | Path, run: str) -> Path:
    """A new log file's path for a run started now: in the run's folder on a writable local root; on
    object storage or a read-only mount, on this machine under $VARIATIONAL_HOME/logs/<run>."""
    name = f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    if not is_url(data_root) and open_root(data_root).writable():
        return Path(run_folder(data_root, run)) / "logs" / name
    return home() / "logs" / check_name(run, "run") / name


def is_flow_line(record: logging.LogRecord) -> bool:
    """Whether a record belongs on the terminal by default (see the module docstring)."""
    if record.levelno >= logging.ERROR:
        return True
    if record.pathname.startswith(_OURS):
        return record.levelno >= logging.INFO
    return record.name == "prefect.flow_runs" and record.levelno >= logging.INFO


class TerminalHandler(logging.Handler):
    """Writes the flow's lines to the terminal's file descriptor (kept aside while fds 1 and 2 go to the
    log file): `HH:MM:SS | LEVEL | run name - message`."""

    def __init__(self, fd: int):
        super().__init__(logging.INFO)
        self.fd = fd
        self.addFilter(is_flow_line)
        self.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if run:
            head, _, rest = text.partition(" | ")
            level, _, message = rest.partition(" | ")
            text = f"{head} | {level} | {run} - {message}"
        return text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            with contextlib.suppress(OSError):  # a closed terminal must not stop the run
                os.write(self.fd, line.encode(errors="replace"))
        except Exception:
            self.handleError(record)


def _pump(read_fd: int, log_file: Path, terminal_fd: int) -> None:
    """Copy the pipe into the log file and the terminal until every writer has closed it. It never stops
    reading before that (a full pipe would block every writer, the run with them)."""
    with open(log_file, "ab", buffering=0) as out:
        while chunk := os.read(read_fd, 1 << 16):
            with contextlib.suppress(OSError):
                out.write(chunk)
            with contextlib.suppress(OSError):
                os.write(terminal_fd, chunk)
    os.close(read_fd)


@contextlib.contextmanager
def run_console(log_file: Path, verbose: bool = False) -> Iterator[Path]:
    """Inside this block fds 1 and 2 go to `log_file` (and, with `verbose`, still to the terminal); the
    flow's lines go to the terminal (see the module docstring). The descriptors are restored on exit, so a
    final message or a traceback reaches the terminal."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    reader = None
    if verbose:  # a pipe and a thread that tees it
        read_fd, write_fd = os.pipe()
        reader = threading.Thread(target=_pump, args=(read_fd, log_file, saved[0]), daemon=True)
        reader.start()
    else:
        write_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    handler = None if verbose else TerminalHandler(saved[1])
    if handler is not None:
        logging.getLogger().addHandler(handler)
    try:
        yield log_file
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        if reader is not None:
            reader.join(timeout=5)  # child processes still holding the pipe keep it open: do not wait
        os.close(saved[1])
        if reader is None or not reader.is_alive():  # else the thread still writes to it
            os.close(saved[0])
