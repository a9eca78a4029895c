"""Stop cleanly when told to: the one place that knows about SIGTERM and SIGINT.

In:  the signals a user or a scheduler sends (Slurm `scancel`, Kubernetes, `timeout`, Ctrl-C, and a Prefect
     cancellation: the runner sends SIGTERM to the flow-run process, then SIGKILL after its 30 s grace).
Out: a flag that long loops poll at safe points (`stop_requested()`, `check()` between micro-batches and
     shards), `StopRequested` raised out of the main thread, and the exit codes 143 / 130 the shell expects.

The protocol, once `install()` ran in the main thread:
- The first signal sets the flag and returns: the code gets to finish its micro-batch and save a
  checkpoint. Inside `interruptible()` (a vLLM generate, a worker-pool map: blocking calls that would hold
  the stop for minutes and whose work is thrown away anyway) it raises StopRequested at once instead.
- A second signal raises StopRequested at once, wherever the main thread is. Once StopRequested is on its
  way out, further signals are only logged: they must not break the `finally` blocks that end the engines.
- Nobody polled the flag within GRACE_S (a stage without safe points, C code that never returns): a
  watchdog thread re-sends the signal to the main thread, which then raises. Python runs handlers between
  bytecodes, and a blocking system call (a pipe read, a lock, a sleep) returns EINTR to run them.
StopRequested is a BaseException, so `except Exception` in stage code cannot swallow it; `finally` blocks
(closing engines and pools) still run on its way out.

Prefect: its flow engine swaps in its own SIGTERM handler (`capture_sigterm`: raise TerminationSignal at
once) for the duration of a flow run, so the flow calls `install()` again once it runs; a StopRequested
that leaves the flow marks the run Crashed (Prefect does the same for a plain SIGTERM), and on a
cancellation the runner then forces it to Cancelled once the process has exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal number, what a shell reports
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Below the usual 30 s between a scheduler's SIGTERM and its SIGKILL, leaving time for the cleanup.
GRACE_S = float(os.environ.get("VARIATIONAL_STOP_GRACE_S", "10"))

log = logging.getLogger("variational")


class StopRequested(BaseException):
    """A signal asked this process to stop; `signal_name` is SIGTERM or SIGINT."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal_name, 1)


_requested: str | None = None  # the name of the first signal received
_seen = threading.Event()  # someone polled the flag after it was set: the watchdog stands down
_interruptible = 0  # depth of interruptible() regions on the main thread
_raised = False  # StopRequested was raised (by a signal or check()): the process is unwinding
_lock = threading.Lock()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _requested, _raised
    name = signal.Signals(signum).name
    if _raised:  # StopRequested is already unwinding: let the `finally` blocks end the engines in peace
        log.warning("%s received: already stopping, ending engines and workers", name)
        return
    if _requested is not None or _interruptible > 0:
        _requested = _requested or name
        _seen.set()
        _raised = True
        raise StopRequested(_requested)
    _requested = name
    log.warning(
        "%s received: stopping at the next safe point (send it again to stop at once); rerun the same "
        "command to resume",
        name,
    )
    watch = threading.Thread(target=_watchdog, args=(signum, _seen), name="stop-watchdog", daemon=True)
    watch.start()


def _watchdog(signum: int, seen: threading.Event) -> None:
    if seen.wait(GRACE_S) or seen is not _seen:  # polled in time, or reset() began a new request
        return
    # only our own handler turns the signal into StopRequested; with any other (SIG_DFL after the flow
    # restored it, Prefect's bridge) re-sending it would kill or crash the run without our cleanup
    if signal.getsignal(signum) is _on_signal:
        log.warning("no safe point reached within %.0fs of %s: interrupting", GRACE_S, _requested)
        signal.pthread_kill(threading.main_thread().ident or 0, signum)


def install() -> None:
    """Route SIGTERM and SIGINT to the stop protocol. Idempotent; call it again after a library replaced the
    handlers (Prefect's flow engine does for SIGTERM). A no-op outside the main thread, where Python cannot
    set handlers (a task in a worker thread keeps whatever the main thread installed)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        for signum in SIGNALS:
            # always set, even when getsignal() says it is ours: a C library can replace the handler with
            # sigaction behind Python's back (Ray's core worker installs its own SIGTERM handler at
            # ray.init, which prints a stack and aborts the run), and getsignal() cannot see that
            signal.signal(signum, _on_signal)


def installed() -> bool:
    """Whether the stop protocol currently owns both signals (False off the main thread)."""
    try:
        return all(signal.getsignal(s) is _on_signal for s in SIGNALS)
    except ValueError:
        return False


def stop_requested() -> bool:
    """Cheap; poll it at safe points. True once a signal arrived (the poller now owns the stop)."""
    if _requested is None:
        return False
    _seen.set()
    return True


def requested_signal() -> str | None:
    """The name of the signal that asked to stop (SIGTERM / SIGINT), or None."""
    return _requested


def check() -> None:
    """Raise StopRequested(signal name) if a stop was requested."""
    global _raised
    if stop_requested():
        _raised = _raised or threading.current_thread() is threading.main_thread()
        raise StopRequested(_requested or "SIGTERM")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A region whose work is thrown away on a stop (a shard's generate, a pool map): the first signal
    raises StopRequested at once, even out of a blocking call, instead of waiting for a safe point."""
    global _interruptible
    main = threading.current_thread() is threading.main_thread()
    check()
    if not main:  # signal handlers run in the main thread only; there this region means nothing
        yield
        return
    _interruptible += 1
    try:
        yield
    finally:
        _interruptible -= 1


def exit_code(err: BaseException | None = None) -> int:
    """The exit code for a stopped process: 143 after SIGTERM, 130 after SIGINT."""
    name = err.signal_name if isinstance(err, StopRequested) else _requested
    return EXIT_CODES.get(name or "", 1)


def request(signal_name: str) -> str | None:
    """Record a stop asked for by another handler (the deployment server's own SIGTERM handler); returns
    the request that was there before, if any."""
    global _requested
    earlier = _requested
    _requested = _requested or signal_name
    return earlier


def reset() -> None:
    """Forget a stop request (a test's or a long-lived server's next unit of work starts fresh)."""
    global _requested, _seen, _raised
    _requested, _raised = None, False
    _seen.set()  # releases the watchdog of the old request
    _seen = threading.Event()
