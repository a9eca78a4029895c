"""Hostile programs against the harness (variational/verifiers/harness.py) and the trusted side that reads
it (apps_check.read_verdict): forged records, a tampered harness, and a fake harness whose every broken
stream must end as the program's failure. Every program runs through the real path (judge -> sandbox ->
harness), about 1 s each, in both verdict modes (default and code_official_quirks)."""

from __future__ import annotations

import json
import time

import pytest

from variational.verifiers import apps_check, sandbox
from variational.verifiers.apps_check import judge, parse_tests
from variational.verifiers.records import result_record

JAIL_MODES = [m for m in ("root", "userns") if sandbox.probe(m) is None]  # PID 1 of a namespace
ADD = json.dumps({"inputs": ["1 2\n", "5 7\n", "2 2\n"], "outputs": ["3\n", "12\n", "4\n"]})
CALL = json.dumps({"inputs": [[1, 2], [5, 7]], "outputs": [[3], [12]], "fn_name": "add"})
QUIRKS = pytest.mark.parametrize("quirks", [False, True], ids=["ours", "official_quirks"])
SUM = "print(sum(map(int, input().split())))"


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def forger(records: list[dict]) -> str:
    """Module code (no `add` defined) that writes `records` as JSON lines everywhere a result channel could
    be: every inherited fd (the call child's pipe is fd 3), the harness's stdout through /proc, then exits."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    return (
        f"import os\nDATA = {lines.encode()!r}\n"
        "for fd in range(256):\n    try:\n        os.write(fd, DATA)\n    except OSError:\n        pass\n"
        "for path in ('/proc/1/fd/1', '/proc/1/fd/3', f'/proc/{os.getppid()}/fd/1'):\n"
        "    try:\n        with open(path, 'wb') as f:\n            f.write(DATA)\n    except OSError:\n"
        "        pass\nos._exit(0)"
    )


OK_RECORDS = [{"event": "test", "i": i, "status": "ok", "ms": 1.0} for i in range(2)] + [{"event": "done"}]
RIGHT_VALUES = [result_record(i, "ran", 1.0, value=v) for i, v in enumerate([3, 12])] + [{"event": "done"}]
GOLD = [
    {"event": "test", "i": 0, "status": "gold_unparsable", "ms": 1.0, "error": ""},
    {"event": "gold_unparsable"},
    {"event": "done"},
]


@QUIRKS
@pytest.mark.parametrize(
    "code",
    [
        forger(OK_RECORDS),  # claims `ok` for every test: the old trusted side took it as passed
        forger(RIGHT_VALUES),  # the right return values in the record shape, without defining add()
        forger(GOLD),  # claims its row is unjudgeable: the old side dropped it from the averages
        forger([{"event": "done"}]),  # claims the run ended before any test
        # add() is right, but the module first writes a stray line on the result channel
        "import os\nos.write(3, b'{}\\n')\ndef add(a, b):\n    return a + b",
        # add() is right, but the module claims an extra test after the real ones (from a daemon thread)
        "import os, threading, time\ndef late():\n    time.sleep(0.5)\n    os.write(3, b'x\\n')\n"
        "threading.Thread(target=late, daemon=True).start()\ndef add(a, b):\n    time.sleep(0.4)\n"
        "    return a + b",
    ],
    ids=["claims-ok", "claims-values", "claims-gold-unparsable", "claims-done", "stray-line", "extra-line"],
)
def test_forged_call_records_are_the_programs_failure(code: str, quirks: bool) -> None:
    v = judge(fenced(code), CALL, timeout_s=2.0, memory_mb=512, official_quirks=quirks)
    assert (v.status, v.correct) == ("wrong", False), v.detail


@QUIRKS
def test_printed_markers_are_only_output(quirks: bool) -> None:
    markers = json.dumps(OK_RECORDS[0]) + "\\n" + json.dumps({"event": "done"})
    # call form: what a program prints never reaches the trusted side; its return values decide
    call = f"print('{markers}')\nimport sys\nsys.stderr.write('{markers}')\ndef add(a, b):\n    return a + b"
    v = judge(fenced(call), CALL, timeout_s=2.0, memory_mb=512, official_quirks=quirks)
    assert (v.status, v.correct) == ("ok", True), v.detail
    # stdin form: the markers are its output, compared like any other
    stdin = f"print('{markers}')"
    v = judge(fenced(stdin), ADD, timeout_s=2.0, memory_mb=512, official_quirks=quirks)
    assert (v.status, v.correct) == ("wrong", False), v.detail
    # the stdin child has no result channel to write to: forging there is just a program printing nothing
    v = judge(fenced(forger(OK_RECORDS)), ADD, timeout_s=2.0, memory_mb=512, official_quirks=quirks)
    assert (v.status, v.correct) == ("wrong", False), v.detail


# ---------------------------------------------------------------- the harness survives its guest
SIGNALS = (
    "import os, signal, time\n"
    "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,\n"
    "            signal.SIGALRM, signal.SIGPIPE, signal.SIGTSTP, signal.SIGSEGV, signal.SIGCHLD):\n"
    "    os.kill(1, sig)\ntime.sleep(0.2)\n" + SUM
)
FIFOS = (
    "import os\nfor name in ('stdout.txt', 'stdin.txt', 'stderr.txt', 'out', 'in', 'err'):\n"
    "    try:\n        os.unlink(name)\n    except OSError:\n        pass\n    os.mkfifo(name)\n" + SUM
)
# after test 0 (its input is "1 2"), lock the jail's only writable folder
CHMOD = (
    "import os\nline = input()\nif line != '1 2':\n    os.chmod('/sandbox', 0)\n"
    "print(sum(map(int, line.split())))"
)


@QUIRKS
@pytest.mark.parametrize("mode", JAIL_MODES)
@pytest.mark.parametrize("code", [SIGNALS, FIFOS, CHMOD], ids=["signals-to-pid-1", "fifos", "chmod-sandbox"])
def test_sabotage_does_not_reach_the_harness(code: str, mode: str, quirks: bool) -> None:
    # the old harness: SIGINT killed it (verdict `error`), a FIFO at stdout.txt blocked it for 32 s,
    # chmod made it crash after test 0 (status ok with correct False). Now none of them reaches it: these
    # programs print the right sums, so they pass, in about a second.
    t0 = time.monotonic()
    v = judge(fenced(code), ADD, timeout_s=2.0, memory_mb=512, official_quirks=quirks, mode=mode)
    assert (v.status, v.correct) == ("ok", True), v.detail
    assert time.monotonic() - t0 < 15


@QUIRKS
@pytest.mark.parametrize("mode", JAIL_MODES)
def test_a_harness_stopped_by_its_guest_is_the_programs_failure(mode: str, quirks: bool) -> None:
    # same uid: a program may lower the harness's own limits (prlimit on PID 1); the harness then dies at
    # its next test. Old: status ok with correct False; now wrong, in both modes (never `error`, never ok)
    code = f"import resource\n{SUM}\nresource.prlimit(1, resource.RLIMIT_NOFILE, (3, 3))"
    v = judge(fenced(code), ADD, timeout_s=2.0, memory_mb=512, official_quirks=quirks, mode=mode)
    assert (v.status, v.correct) == ("wrong", False), v.detail


@QUIRKS
def test_a_huge_nul_line_costs_the_trusted_side_little(quirks: bool) -> None:
    # 15 MB of NUL bytes on one line: the old reader's cost grew with the square of the line (35 s of CPU
    # in the issue, 40 s measured here); now the output travels as one bounded base64 record
    cpu0 = time.process_time()
    v = judge(
        fenced("import sys\nsys.stdout.write('\\0' * 15_000_000)"), ADD, timeout_s=5.0, official_quirks=quirks
    )
    assert (v.status, v.correct) == ("wrong", False), v.detail
    assert time.process_time() - cpu0 < 10


# ---------------------------------------------------------------- a fake harness: the trusted side alone
def out(i: int, printed: bytes) -> dict:
    return result_record(i, "ran", 1.0, stdout=printed)


START, DONE = {"event": "start"}, {"event": "done"}
RIGHT = [out(0, b"3\n"), out(1, b"12\n"), out(2, b"4\n")]


def fake_harness(records: list, tail: str = "") -> str:
    """A program that writes these records (a dict: one JSON line; bytes: as they are) as if it were the
    harness, then runs `tail`."""
    data = b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in records)
    return f"import sys\nsys.stdout.buffer.write({data!r})\nsys.stdout.flush()\n{tail}"


def verdict_of(source: str, quirks: bool) -> apps_check.Verdict:
    limits = sandbox.Limits(memory_mb=512)
    with sandbox.start_python(source, b"", limits) as jail:
        return apps_check.read_verdict(jail, parse_tests(ADD), 2.0, quirks, "code")


@QUIRKS
def test_a_well_formed_stream_is_judged(quirks: bool) -> None:
    assert verdict_of(fake_harness([START, *RIGHT, DONE]), quirks).correct
    v = verdict_of(fake_harness([START, RIGHT[0], out(1, b"13\n"), RIGHT[2], DONE]), quirks)
    assert (v.status, v.correct) == ("wrong", False)
    # only a jail that never starts is the sandbox's failure: no candidate code ran before `start`
    assert verdict_of(fake_harness([]), quirks).status == "error"
    assert verdict_of(fake_harness([*RIGHT, DONE]), quirks).status == "error"


BAD_STREAMS = {
    "duplicate-index": [START, RIGHT[0], RIGHT[0], RIGHT[1], RIGHT[2], DONE],
    "skipped-index": [START, RIGHT[0], RIGHT[2], RIGHT[1], DONE],
    "out-of-range-index": [START, *RIGHT, out(3, b"4\n"), DONE],
    "negative-index": [START, out(-1, b"3\n"), *RIGHT, DONE],
    "done-too-early": [START, RIGHT[0], DONE],
    "line-after-done": [START, *RIGHT, DONE, DONE],
    "status-ok": [START, *({"event": "test", "i": i, "status": "ok", "ms": 1.0} for i in range(3)), DONE],
    "gold-unparsable": [START, {"event": "gold_unparsable"}, DONE],
    "compile-error-after-a-test": [START, RIGHT[0], {"event": "compile_error", "error": ""}, DONE],
    "test-after-compile-error": [START, {"event": "compile_error", "error": ""}, *RIGHT, DONE],
    "second-start": [START, START, *RIGHT, DONE],
    "call-payload-in-stdin-run": [START, result_record(0, "ran", 1.0, value="3\n"), *RIGHT[1:], DONE],
    "extra-key": [START, {**RIGHT[0], "verdict": "ok"}, *RIGHT[1:], DONE],
    "not-json": [START, b"{'event': 'test'}\n", *RIGHT, DONE],
    "invalid": [START, {"event": "invalid", "error": "the child wrote garbage"}, DONE],
    "no-done": [START, *RIGHT],
    "no-newline-at-the-end": [START, *RIGHT, b'{"event": "done"}\n{"event"'],
}


@QUIRKS
@pytest.mark.parametrize("records", list(BAD_STREAMS.values()), ids=list(BAD_STREAMS))
def test_any_other_stream_is_the_programs_failure(records: list, quirks: bool) -> None:
    raw = records[-1] if isinstance(records[-1], bytes) and records[-1].endswith(b'{"event"') else None
    source = (
        fake_harness(records[:-1]) + f"sys.stdout.buffer.write({raw!r})\n" if raw else fake_harness(records)
    )
    v = verdict_of(source, quirks)
    assert (v.status, v.correct) == ("wrong", False), v.detail


@QUIRKS
def test_an_endless_line_is_cut_and_refused(quirks: bool) -> None:
    tail = "while True:\n    sys.stdout.buffer.write(b'x' * 2**20)"
    cpu0 = time.process_time()
    v = verdict_of(fake_harness([START], tail), quirks)
    assert (v.status, v.correct) == ("wrong", False) and "longer than" in v.detail, v.detail
    assert time.process_time() - cpu0 < 10
