"""A process pool with a hard per-item deadline, for work that can hang (math-verify parsing, sympy).

In:  a picklable module-level function `fn`, items (tuples of its arguments), a per-item timeout.
Out: one `Outcome(status, value, elapsed_ms, error)` per item, in order; status ok / timeout / error.

Why not ProcessPoolExecutor: a hung task cannot be cancelled there, and killing its process breaks the pool.
Here each worker runs items one by one in its MAIN thread under its own SIGALRM (soft deadline: the item is
`timeout`, the worker survives), and the parent kills a worker whose item outlives timeout + HARD_GRACE_S
(C code that never returns to the interpreter): the item is `timeout`, the worker is replaced, the rest of
its batch is re-queued. A worker that dies (segfault, OOM kill) costs its current item (`error`) only.
Items go out in batches (few pipe round trips) and only to idle workers, so the parent never blocks on a
full pipe and keeps watching every deadline.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from variational import shutdown

HARD_GRACE_S = 1.0  # the parent kills a worker this long after its item's soft deadline
CLOSE_WAIT_S = 1.0  # close(): how long idle workers get to exit by themselves, all together
MAX_START_FAILURES = 3  # workers (per pool slot) dying before they are ready: a broken import, give up


class Outcome(NamedTuple):
    status: str  # ok (fn returned `value`) / timeout / error
    value: Any
    elapsed_ms: float
    error: str | None


class _ItemTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that `except Exception` in fn cannot swallow it."""


_armed = False  # the alarm raises only while an item runs


def _on_alarm(signum: int, frame: Any) -> None:
    if _armed:
        raise _ItemTimeout


def _call(fn: Callable[..., Any], args: tuple, timeout_s: float) -> tuple:
    global _armed
    t0 = time.perf_counter()
    status, value, err = "ok", None, None
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    _armed = True
    try:
        value = fn(*args)
        _armed = False
    except _ItemTimeout:
        status = "timeout"
    except Exception as e:  # RecursionError / MemoryError of a pathological input included
        _armed = False
        status, err = "error", f"{type(e).__name__}: {e}"[:500]
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    return status, value, (time.perf_counter() - t0) * 1e3, err


def _limit_memory(extra_mb: int) -> None:
    """RLIMIT_AS = what the worker maps after its imports + extra_mb: a runaway computation gets a
    MemoryError instead of taking the machine."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        limit = vm_kb * 1024 + extra_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _worker(conn: Connection, fn: Callable, warmup: Callable | None, memory_mb: int) -> None:
    """Receive (timeout_s, [(item index, args)]), send (index, *Outcome) per item, in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # SIGTERM ends a worker at once (its item is thrown away with the shard); a forked worker would
    # otherwise inherit the parent's stop handler and only set a flag nobody reads
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if warmup is not None:
        warmup()
    _limit_memory(memory_mb)
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        timeout_s, batch = msg
        for i, args in batch:
            try:
                out = _call(fn, args, timeout_s)
            except _ItemTimeout:  # the alarm hit between the item's end and its cancellation
                out = ("timeout", None, timeout_s * 1e3, None)
            conn.send((i, *out))


@dataclass
class _Slot:
    proc: Any
    conn: Connection
    ready: bool = False
    items: deque[int] = field(default_factory=deque)  # in flight, in the order the worker runs them
    since: float = 0.0  # when its current item started (last result, or the batch was sent)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _context(preload: Sequence[str], start_method: str | None) -> Any:
    """forkserver (default): workers fork from one clean server that imported `preload` once, so a start or
    a replacement after a kill takes ~0.5 s instead of a fresh interpreter's 5-10 s (measured on 2 busy
    cores). Plain fork is unsafe with the polars / Prefect threads of the parent; spawn is the fallback.
    The forkserver is one per process and reads its preload list when it starts: a pool created after
    another one started it imports its modules in each worker instead (slower starts, same results)."""
    method = start_method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(preload))
    return ctx


class DeadlinePool:
    """`with DeadlinePool(fn, 4) as pool: pool.run(items, timeout_s)`; workers start on the first run and
    are reused across runs, so share one pool over many calls (shards, test modules)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        workers: int = 0,
        *,
        warmup: Callable[[], None] | None = None,
        preload: Sequence[str] = (),
        memory_mb: int = 4096,
        batch_size: int = 32,
        start_method: str | None = None,
        fresh_after_timeout: bool = False,
    ):
        """`fresh_after_timeout`: replace a worker whose item hit its soft deadline too (the rest of its
        batch is re-queued), for work whose global state an interrupted item can leave half-updated."""
        self.fn, self.warmup = fn, warmup
        self.fresh_after_timeout = fresh_after_timeout
        self.size = workers or cpu_count()
        self.memory_mb, self.batch_size = memory_mb, batch_size
        self._ctx = _context([fn.__module__, *preload], start_method)
        self.slots: list[_Slot] = []
        self._start_failures = 0

    def __enter__(self) -> DeadlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> _Slot:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker, args=(child, self.fn, self.warmup, self.memory_mb), daemon=True
        )
        proc.start()
        child.close()
        return _Slot(proc, parent)

    @staticmethod
    def _kill(s: _Slot) -> None:
        with contextlib.suppress(Exception):
            s.proc.kill()
        s.proc.join(timeout=5)
        s.conn.close()

    def _replace(self, s: _Slot) -> None:
        self._kill(s)
        self.slots[self.slots.index(s)] = self._spawn()

    def close(self) -> None:
        """Ask idle workers to exit, give them CLOSE_WAIT_S in all (not each: a stop must end within the
        scheduler's grace), then kill the rest (busy on an item, or hung)."""
        for s in self.slots:
            with contextlib.suppress(Exception):
                s.conn.send(None)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for s in self.slots:
            s.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(s)
        self.slots = []

    def run(self, items: Sequence[tuple], timeout_s: float, desc: str = "items") -> list[Outcome]:
        """fn(*item) for every item, each within timeout_s + HARD_GRACE_S; outcomes in item order."""
        n = len(items)
        results: list[Outcome | None] = [None] * n
        while len(self.slots) < min(self.size, n):
            self.slots.append(self._spawn())
        queue = deque(range(n))
        # batches shrink near the end so all workers stay busy; large ones amortise pipe round trips
        batch = max(1, min(self.batch_size, n // (4 * max(1, len(self.slots)))))
        hard = timeout_s + HARD_GRACE_S
        done = 0
        bar = tqdm(total=n, desc=desc, unit="item", disable=n < 1000)

        def fail(s: _Slot, status: str, err: str | None, ms: float = 0.0) -> None:
            nonlocal done
            if s.items:  # the item it was running pays; the rest of its batch goes back to the queue
                results[s.items.popleft()] = Outcome(status, None, ms, err)
                done += 1
                bar.update()
            queue.extendleft(reversed(s.items))
            self._replace(s)

        while done < n:
            # a stop abandons the map (the caller's shard is thrown away); close() then ends the workers
            shutdown.check()
            for s in self.slots:
                if s.ready and not s.items and queue:
                    todo = [queue.popleft() for _ in range(min(batch, len(queue)))]
                    try:
                        s.conn.send((timeout_s, [(i, tuple(items[i])) for i in todo]))
                    except OSError:  # died while idle: nothing of ours was lost
                        queue.extendleft(reversed(todo))
                        self._replace(s)
                        continue
                    s.items, s.since = deque(todo), time.monotonic()
            busy = [s for s in self.slots if s.items or not s.ready]
            deadlines = [s.since + hard for s in busy if s.items]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
            # a signal interrupts the wait (EINTR); the handler raises at once inside interruptible()
            with shutdown.interruptible():
                ready = wait([s.conn for s in busy], timeout=wait_s)
            for conn in ready:
                s = next(s for s in self.slots if s.conn is conn)
                try:
                    while conn.poll():
                        msg = conn.recv()
                        if msg[0] == "ready":
                            s.ready = True
                            continue
                        i = s.items.popleft()
                        assert msg[0] == i, f"worker answered item {msg[0]}, expected {i}"
                        results[i], s.since = Outcome(*msg[1:]), time.monotonic()
                        done += 1
                        bar.update()
                        if self.fresh_after_timeout and results[i].status == "timeout":
                            queue.extendleft(reversed(s.items))
                            self._replace(s)
                            break
                except (EOFError, OSError):  # crashed: segfault, OOM kill, broken warmup
                    shutdown.check()  # or killed by the SIGTERM sent to our whole process group
                    if not s.ready:
                        self._start_failures += 1
                        if self._start_failures > MAX_START_FAILURES * self.size:
                            raise RuntimeError(
                                f"{desc}: workers die before they are ready (exit {s.proc.exitcode}); "
                                f"check that `import {self.fn.__module__}` works"
                            ) from None
                    fail(s, "error", f"worker died (exit code {s.proc.exitcode})")
            now = time.monotonic()
            for s in list(self.slots):
                if s.items and now > s.since + hard:
                    fail(s, "timeout", None, (now - s.since) * 1e3)
        bar.close()
        return results  # type: ignore[return-value]
