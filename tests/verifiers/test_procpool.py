"""variational/verifiers/procpool.py: outcomes in order, soft and hard deadlines, dead and stuck workers replaced.

The worker functions are stdlib ones (the workers must import them by name): operator.truediv (ok, or an
error on division by zero), time.sleep (interruptible: the soft SIGALRM deadline). They use spawn: the
forkserver (and its preload list) is left to MathPool, whose tests cover that start method."""

from __future__ import annotations

import operator
import os
import signal
import time
from collections.abc import Iterator

import pytest

from variational.verifiers.procpool import DeadlinePool


@pytest.fixture(scope="module")
def pool() -> Iterator[DeadlinePool]:
    with DeadlinePool(operator.truediv, 2, start_method="spawn") as p:
        yield p


def test_outcomes_in_order(pool: DeadlinePool) -> None:
    out = pool.run([(i, 2) for i in range(100)] + [(1, 0)], timeout_s=5)
    assert [o.value for o in out[:-1]] == [i / 2 for i in range(100)]
    assert {o.status for o in out[:-1]} == {"ok"}
    assert out[-1].status == "error" and out[-1].error.startswith("ZeroDivisionError")
    assert pool.run([], timeout_s=1) == []


def test_soft_deadline_keeps_the_worker() -> None:
    with DeadlinePool(time.sleep, 1, start_method="spawn") as p:
        p.run([(0,)], timeout_s=1)
        pid = p.slots[0].proc.pid
        out = p.run([(0.01,), (30,), (0.01,)], timeout_s=0.5)
        assert [o.status for o in out] == ["ok", "timeout", "ok"]
        assert out[1].elapsed_ms > 400  # it ran to its deadline (a lower bound: load only adds to it)
        # the same worker answered: SIGALRM interrupted the sleep, the hard kill (its wall-clock fallback)
        # was not needed; no wall-clock assertion, the machine may be loaded
        assert p.slots[0].proc.pid == pid


def test_fresh_after_timeout_replaces_the_worker() -> None:
    # OfficialMathPool: an item interrupted inside sympy may leave global state half-updated
    with DeadlinePool(time.sleep, 1, start_method="spawn", fresh_after_timeout=True) as p:
        p.run([(0,)], timeout_s=1)
        pid = p.slots[0].proc.pid
        out = p.run([(0.01,), (30,), (0.01,), (0.01,)], timeout_s=0.5)
        assert [o.status for o in out] == ["ok", "timeout", "ok", "ok"]  # its batch-mates were re-queued
        assert p.slots[0].proc.pid != pid


def test_stuck_worker_is_killed_and_replaced(pool: DeadlinePool) -> None:
    pool.run([(1, 1)], timeout_s=1)  # workers up and idle
    stuck = pool.slots[0]
    os.kill(stuck.proc.pid, signal.SIGSTOP)  # like C code that never returns: no SIGALRM gets through
    out = pool.run([(i, 1) for i in range(20)], timeout_s=0.5)  # returns at all: the hard deadline works
    assert out[0].status == "timeout"  # the item the stopped worker held
    assert [o.value for o in out[1:]] == list(range(1, 20))  # its batch-mates were re-queued
    assert stuck.proc.pid not in [s.proc.pid for s in pool.slots]


def test_dead_worker_is_replaced(pool: DeadlinePool) -> None:
    pool.run([(1, 1)], timeout_s=1)
    dead = pool.slots[1]
    os.kill(dead.proc.pid, signal.SIGKILL)
    dead.proc.join()
    out = pool.run([(i, 1) for i in range(10)], timeout_s=5)
    assert [o.value for o in out] == list(range(10))
