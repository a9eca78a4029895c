"""Stage `verify`: is each answer rollout right? math-verify for math (gold first), stdin/stdout tests for code.

In:  rollouts (prompt_idx, sample_idx, rollout_idx, [round], text), problems (prompt_idx, kind, gold, tests).
Out: table `verdicts`: the rollout keys plus extracted, correct, status, verifier, elapsed_ms (design.md).
     status: ok / wrong / no_answer / timeout / error / gold_unparsable.

Pieces (design.md "Verifier contract"):
- `check_answers(df[text, gold])`: math-verify in worker PROCESSES (`MathPool`). math-verify's own timeouts
  use SIGALRM (main thread only) and a parse can still hang inside C code, so every row gets a soft deadline
  in the worker (our own SIGALRM -> status timeout, worker survives) and a hard one in the parent (the worker
  is killed and replaced, the row is `timeout`, its batch-mates are re-queued). Rows go to workers in batches.
- `check_code(df[text, tests])`: the last fenced code block, run once per test with `python -I` in a temp
  dir, under CPU/memory/file-size rlimits, a wall timeout, and without network (`unshare -n`) when possible.
- `verify` (the stage core), `verify_task` / `verify_prior_task` (Prefect wrappers), `verifier_report`
  (agreement with the labelled pairs in shared/data, `variational verifier-report`).
math_verify is imported here only, and lazily (inside the workers), so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from variational import templates
from variational.config import RunConfig, VerifyConfig
from variational.stage import finish_stage, logger, open_store, reuse_stage, run_shards, stage_task
from variational.store import code_version, fingerprint, read_stage

STAGE, TABLE = "verify", "verdicts"
STATUSES = ("ok", "wrong", "no_answer", "timeout", "error", "gold_unparsable")
KEYS = ("prompt_idx", "sample_idx", "rollout_idx", "round")  # those present are carried through
VERDICT_SCHEMA = {
    "extracted": pl.String,
    "correct": pl.Boolean,
    "status": pl.String,
    "verifier": pl.String,
    "elapsed_ms": pl.Float64,
}
MATH_VERIFIER, CODE_VERIFIER = "math_verify", "code_tests"
HARD_GRACE_S = 1.0  # parent kills a worker this long after the row's soft deadline
MAX_REGION = 20_000  # chars handed to math-verify; the answer is at the end (see _answer_region)
MAX_EXTRACTED = 2_000
# LaTeX delimiters: text that has one is parsed as is; a bare answer without any is wrapped in $\boxed{}$
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
_COMMAND = re.compile(r"\\+[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")


# ================================================================ math: inside a worker process
class _RowTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException because math-verify and sympy swallow Exception."""


_armed = False  # the alarm only raises while a row is being checked


def _on_alarm(signum: int, frame: Any) -> None:
    if _armed:
        raise _RowTimeout


def _parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # boxed_match_priority=0: a \boxed answer beats other candidates; among equals the last one wins, and
    # several \boxed in one display combine into a set (measured: +13 agreements over wrapping last_boxed
    # alone on the math_verify pairs). Timeouts are ours (SIGALRM above), so math-verify's are off.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(text, config, parsing_timeout=None)


@functools.lru_cache(maxsize=8192)  # golds repeat over the K x M rollouts of a prompt
def _parse_gold(gold: str) -> list:
    s = gold.strip()
    if not s:
        return []
    if _DELIMITED.search(s):
        return _parse(s)
    # a bare gold ("\frac{1}{2}", "10, 4, -2") is LaTeX without delimiters: box it so the LaTeX extractor
    # reads all of it (measured: +2 agreements over a plain parse), falling back to the plain parse
    return _parse(f"$\\boxed{{{s}}}$") or _parse(s)


def _answer_region(text: str) -> str:
    """The solution section when there is one, capped to its last MAX_REGION chars (extended back to the
    start of the line holding the last \\boxed, so a boxed answer and its $...$ pairs stay whole)."""
    sol = templates.extract_solution(text)
    region = sol if sol and sol.strip() else text
    if len(region) <= MAX_REGION:
        return region
    start = len(region) - MAX_REGION
    boxed = max(region.rfind("\\boxed"), region.rfind("\\fbox"))
    if 0 <= boxed < start:
        start = boxed
    line = region.rfind("\n", 0, start) + 1
    return region[line if start - line < MAX_REGION else start :]


def _looks_bare(s: str) -> bool:
    """A short one-line answer with no delimiters and no words ("\\frac34i", "(x-2)(x+2)", "\\$10")."""
    s = s.strip()
    return (
        0 < len(s) <= 200
        and "\n" not in s
        and not _DELIMITED.search(s.replace("\\$", ""))
        and not _WORD.search(_COMMAND.sub(" ", s))
    )


def _parse_pred(text: str) -> list:
    region = _answer_region(text)
    pred = _parse(region)
    if _looks_bare(region):
        # without delimiters only the expression extractor sees it, and it stops at the first LaTeX command
        # ("\frac{3}{4}i" -> 3/4): when the match does not cover the whole answer, read it as boxed LaTeX
        covered = bool(pred) and isinstance(pred[-1], str) and len(re.sub(r"\s", "", pred[-1])) >= len(
            re.sub(r"\s", "", region)
        )
        if not covered:
            wrapped = _parse(f"$\\boxed{{{region.strip()}}}$")
            if wrapped and not isinstance(wrapped[0], str):
                return wrapped
    if not pred and (boxed := templates.last_boxed(region)) is not None and boxed.strip():
        pred = _parse(f"$\\boxed{{{boxed}}}$") or [boxed]
    return pred


def _extracted(pred: list) -> str:
    s = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    return s[:MAX_EXTRACTED]


def check_math_row(text: str | None, golds: list[str]) -> tuple[str | None, bool, str]:
    """(extracted, correct, status) of one row, in-process and without a deadline (workers call this)."""
    from math_verify import verify

    gold_parsed = [p for g in golds if g is not None and (p := _parse_gold(g))]
    if not gold_parsed:
        return None, False, "gold_unparsable"
    if text is None or not text.strip():
        return None, False, "no_answer"
    pred = _parse_pred(text)
    if not pred:
        return None, False, "no_answer"
    # gold first: verify is asymmetric (assignments and intervals are simplified on the gold side)
    correct = any(verify(g, pred, timeout_seconds=None) for g in gold_parsed)
    return _extracted(pred), correct, "ok" if correct else "wrong"


def _timed_row(text: str | None, golds: list[str], timeout_s: float) -> tuple:
    global _armed
    t0 = time.perf_counter()
    err = None
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    _armed = True
    try:
        extracted, correct, status = check_math_row(text, golds)
        _armed = False
    except _RowTimeout:
        extracted, correct, status = None, False, "timeout"
    except Exception as e:  # RecursionError / MemoryError from a pathological expression included
        _armed = False
        extracted, correct, status, err = None, False, "error", f"{type(e).__name__}: {e}"[:500]
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    return extracted, correct, status, (time.perf_counter() - t0) * 1e3, err


def _limit_memory(extra_mb: int) -> None:
    """RLIMIT_AS = what the worker maps after its imports + extra_mb, so a runaway power tower fails with
    MemoryError instead of taking the machine."""
    with contextlib.suppress(OSError, ValueError):
        vm_kb = next(
            int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")
        )
        limit = vm_kb * 1024 + extra_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _math_worker(conn: Connection, memory_mb: int) -> None:
    """Worker loop: receive (timeout_s, [(row, text, golds)]), send one result per row, in order."""
    import logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # math-verify warns that its timeout is off (ours is on) and logs every failed parse
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _parse("$1$")  # import and warm up sympy / latex2sympy before saying ready
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
        timeout_s, rows = msg
        for row, text, golds in rows:
            try:
                result = _timed_row(text, golds, timeout_s)
            except _RowTimeout:  # the alarm hit between the row's end and its cancellation
                result = (None, False, "timeout", timeout_s * 1e3, None)
            conn.send((row, *result))


# ================================================================ math: the parent's pool
@dataclass
class _Worker:
    proc: Any
    conn: Connection
    ready: bool = False
    rows: deque[int] = field(default_factory=deque)  # in flight, in the order the worker runs them
    since: float = 0.0  # when the current row started (the previous result arrived, or the batch was sent)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class MathPool:
    """Spawned math-verify workers with a hard per-row deadline; reuse one pool across calls and shards.

    `with MathPool(4) as pool: check_answers(df, pool=pool)`. Workers start lazily on the first `run`.
    A row that outlives timeout_s + HARD_GRACE_S gets status timeout; its worker is killed and replaced."""

    def __init__(self, workers: int = 0, memory_mb: int = 4096, batch_size: int = 32):
        self.size = workers or _cpu_count()
        self.memory_mb, self.batch_size = memory_mb, batch_size
        self._ctx = mp.get_context("spawn")  # fork is unsafe with polars / Prefect threads in the parent
        self._workers: list[_Worker] = []

    def __enter__(self) -> MathPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_math_worker, args=(child, self.memory_mb), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _kill(self, w: _Worker) -> None:
        with contextlib.suppress(Exception):
            w.proc.kill()
        w.proc.join(timeout=5)
        w.conn.close()

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        self._workers[self._workers.index(w)] = self._spawn()

    def close(self) -> None:
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.conn.send(None)
        for w in self._workers:
            w.proc.join(timeout=1)
            self._kill(w)
        self._workers = []

    def run(
        self, items: list[tuple[str | None, list[str]]], timeout_s: float, desc: str = "verify math"
    ) -> list[tuple]:
        """(text, golds) per row -> (extracted, correct, status, elapsed_ms, error) per row, same order."""
        n = len(items)
        results: list[tuple | None] = [None] * n
        if n == 0:
            return []
        while len(self._workers) < min(self.size, n):
            self._workers.append(self._spawn())
        queue = deque(range(n))
        # small batches near the end keep all workers busy; large ones amortise the pipe round trips
        batch = max(1, min(self.batch_size, n // (4 * len(self._workers))))
        hard = timeout_s + HARD_GRACE_S
        done, started = 0, time.monotonic()
        bar = tqdm(total=n, desc=desc, unit="row", disable=n < 1000)
        while done < n:
            for w in self._workers:
                if w.ready and not w.rows and queue:
                    rows = [queue.popleft() for _ in range(min(batch, len(queue)))]
                    try:
                        w.conn.send((timeout_s, [(i, *items[i]) for i in rows]))
                    except OSError:  # died while idle: replace it, nothing of ours was lost
                        queue.extendleft(reversed(rows))
                        self._replace(w)
                        continue
                    w.rows, w.since = deque(rows), time.monotonic()
            busy = [w for w in self._workers if w.rows or not w.ready]
            now = time.monotonic()
            deadlines = [w.since + hard for w in busy if w.rows]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            for conn in wait([w.conn for w in busy], timeout=wait_s):
                w = next(w for w in self._workers if w.conn is conn)
                try:
                    while conn.poll():
                        msg = conn.recv()
                        if msg[0] == "ready":
                            w.ready = True
                            continue
                        row = w.rows.popleft()
                        assert msg[0] == row, f"worker answered row {msg[0]}, expected {row}"
                        results[row], w.since = msg[1:], time.monotonic()
                        done += 1
                        bar.update()
                except (EOFError, OSError):  # crashed (segfault, OOM kill): its current row is an error
                    code = w.proc.exitcode
                    done += self._fail(w, results, queue, "error", f"worker died (exit code {code})")
                    if not w.ready and time.monotonic() - started > 120:
                        raise RuntimeError("math-verify workers fail to start; run `import math_verify`")
            now = time.monotonic()
            for w in list(self._workers):
                if w.rows and now > w.since + hard:
                    done += self._fail(w, results, queue, "timeout", None, (now - w.since) * 1e3)
        bar.close()
        self._log_errors(items, results)
        return results  # type: ignore[return-value]

    def _fail(
        self,
        w: _Worker,
        results: list,
        queue: deque[int],
        status: str,
        err: str | None,
        ms: float = 0.0,
    ) -> int:
        """Kill/replace `w`; its current row gets `status`, the rest of its batch goes back to the queue."""
        n = 0
        if w.rows:
            results[w.rows.popleft()] = (None, False, status, ms, err)
            n = 1
        queue.extendleft(reversed(w.rows))
        self._replace(w)
        return n

    @staticmethod
    def _log_errors(items: list, results: list) -> None:
        errors = [(i, r[4]) for i, r in enumerate(results) if r[2] == "error"]
        for i, err in errors[:5]:
            text = (items[i][0] or "")[:80]
            logger().warning("check_answers: row %d (text %r...) failed: %s", i, text, err)
        if len(errors) > 5:
            logger().warning("check_answers: %d more rows failed", len(errors) - 5)


def _as_list(g: Any) -> list[str]:
    if g is None:
        return []
    return [g] if isinstance(g, str) else [x for x in g if x is not None]


def _require(df: pl.DataFrame, cols: Iterable[str], who: str) -> None:
    if missing := [c for c in cols if c not in df.columns]:
        raise ValueError(f"{who}: input lacks columns {missing}; it has {df.columns}")


def _with_verdicts(df: pl.DataFrame, rows: list[tuple], verifier: str) -> pl.DataFrame:
    cols = list(zip(*rows, strict=True)) if rows else [[], [], [], [], []]
    return df.with_columns(
        pl.Series("extracted", cols[0], pl.String),
        pl.Series("correct", cols[1], pl.Boolean),
        pl.Series("status", cols[2], pl.String),
        pl.Series("verifier", [verifier] * df.height, pl.String),
        pl.Series("elapsed_ms", cols[3], pl.Float64),
    )


def check_answers(
    df: pl.DataFrame, timeout_s: float = 5.0, workers: int = 0, *, pool: MathPool | None = None
) -> pl.DataFrame:
    """df[text, gold (list of accepted answers, or one string)] -> df + extracted, correct, status,
    verifier, elapsed_ms. Every row returns within timeout_s + HARD_GRACE_S (+ a process kill)."""
    _require(df, ("text", "gold"), "check_answers")
    items = [(t, _as_list(g)) for t, g in zip(df["text"].to_list(), df["gold"].to_list(), strict=True)]
    own = pool is None
    pool = pool or MathPool(min(workers or _cpu_count(), max(1, len(items))))
    try:
        rows = pool.run(items, timeout_s)
    finally:
        if own:
            pool.close()
    return _with_verdicts(df, rows, MATH_VERIFIER)
