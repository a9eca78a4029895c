"""What may come out of the code jail: the harness's records, and the one strict parser that reads them.

Written by variational/verifiers/harness.py inside the sandbox (this file's code travels into the jail ahead
of the harness's: apps_check.jail_program), read by variational/verifiers/apps_check.py outside it, and by
the harness itself for the call-form child's result channel. One JSON object per line, each of exactly one
of these shapes (no other key, no duplicate key):
  {"event": "start"}                                          the harness is up; no candidate code ran yet
  {"event": "compile_error", "error": str}                    the program does not load, or lacks fn_name
  {"event": "test", "i": k, "status": "ran", "ms": t, "stdout": base64}     stdin: what test k printed
  {"event": "test", "i": k, "status": "ran", "ms": t, "value": encoded}     call: what test k returned
  {"event": "test", "i": k, "status": s, "ms": t, "error": str}  s: one of TEST_STATUSES but ran
  {"event": "invalid", "error": str}                          the call-form child broke this format
  {"event": "done"}
A record can claim only what a program could cause by running: an output, a return value (plain data,
`encode_value`; an object's own __eq__ never reaches the trusted side), a crash, a timeout, a refused call.
Verdict statuses (ok, wrong) and row statuses (gold_unparsable) do not exist here: the trusted side decides
them. The order (start, then compile_error or tests 0..n-1 in turn, then done) is checked by the reader.
Standard library only and no `from __future__` import: the project tree is not visible inside the jail.
"""

import base64
import binascii
import collections
import json
import os
import select
import time

MAX_OUTPUT_BYTES = 16 * 2**20  # stdout read back per test: more than any APPS/TACO answer needs
MAX_RECORD_BYTES = 4 * -(-MAX_OUTPUT_BYTES // 3) + 2**16  # one record: the base64 output and its frame
MAX_ERROR_CHARS = 1000
MAX_DEPTH = 200  # nesting of a return value
MAX_MS = 1e8
_CHUNK = 1 << 20
# killed: past the deadline of the whole call-form run; compile_error: a wrapped stdin program whose module
# fails to load (officially -2, per test)
TEST_STATUSES = ("ran", "runtime_error", "timeout", "killed", "sandbox_violation", "compile_error")
_FRAMES = {"start": ("event",), "done": ("event",), "compile_error": ("event", "error")}
_FRAMES["invalid"] = _FRAMES["compile_error"]


class ProtocolError(ValueError):
    """A record that is not one of the shapes above, or out of its turn: the program's failure."""


class Opaque:
    """A return value that was not plain data: equal to nothing."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def encode_value(value, depth: int = 0):
    """A return value as JSON that keeps what the official `==` sees: tuples, sets and non-string dict
    keys are tagged; numpy scalars become Python numbers; anything else is opaque (never equal)."""
    if depth > MAX_DEPTH:
        raise RecursionError("return value nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    for plain in (str, int, float):  # subclasses (IntEnum, numpy.float64) compare as their base type
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, list):
        return [encode_value(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode_value(v, depth + 1) for v in value]}
    if isinstance(value, (set, frozenset)):
        tag = "__frozenset__" if isinstance(value, frozenset) else "__set__"
        return {tag: [encode_value(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {
            "__dict__": [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in value.items()]
        }
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return encode_value(value.item(), depth + 1)
    return {"__opaque__": type(value).__name__}


_COLLECTIONS = {"__tuple__": tuple, "__set__": set, "__frozenset__": frozenset}


def decode_value(value, depth: int = 0):
    """`encode_value`'s JSON -> the Python value; any other shape raises ProtocolError."""
    if depth > MAX_DEPTH + 1:
        raise ProtocolError("a return value nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_value(v, depth + 1) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise ProtocolError("a return value that is not encoded plain data")
    ((tag, body),) = value.items()
    if tag == "__opaque__" and isinstance(body, str):
        return Opaque(body[:100])
    if not isinstance(body, list) or (tag != "__dict__" and tag not in _COLLECTIONS):
        raise ProtocolError(f"a return value tagged {str(tag)[:40]!r}")
    try:
        if tag == "__dict__":
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in body):
                raise ProtocolError("a dict return value whose items are not pairs")
            return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in body}
        return _COLLECTIONS[tag](decode_value(v, depth + 1) for v in body)
    except TypeError:  # an unhashable set member or dict key: encode_value never writes one
        raise ProtocolError("a set member or dict key that cannot be hashed") from None


def _no_duplicate_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ProtocolError("a record with a duplicate key")
    return obj


def _checked_test(rec: dict, kind: str) -> dict:
    status, payload = rec.get("status"), "error"
    if status not in TEST_STATUSES:
        raise ProtocolError(f"a test status {str(status)[:40]!r}")
    if status == "ran":
        payload = "stdout" if kind == "stdin" else "value"
    if set(rec) != {"event", "i", "status", "ms", payload}:
        raise ProtocolError(f"a test record with keys {sorted(rec)[:8]}")
    i, ms = rec["i"], rec["ms"]
    if type(i) is not int or type(ms) not in (int, float) or not (0 <= ms <= MAX_MS):
        raise ProtocolError("a test record whose index or time is not a number in range")
    if payload == "error":
        _checked_error(rec)
    elif payload == "value":
        rec["value"] = decode_value(rec["value"])
    else:
        rec["stdout"] = _decoded_output(rec["stdout"])
    return rec


def _decoded_output(text) -> str:
    if not isinstance(text, str) or len(text) > MAX_RECORD_BYTES:
        raise ProtocolError("an output that is not base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("an output that is not base64 text") from None
    if len(raw) > MAX_OUTPUT_BYTES:
        raise ProtocolError("an output longer than the limit")
    return raw.decode("utf-8", errors="replace")


def _checked_error(rec: dict) -> None:
    if not isinstance(rec["error"], str) or len(rec["error"]) > MAX_ERROR_CHARS:
        raise ProtocolError("an error that is not a short text")


def parse_record(line: bytes, kind: str) -> dict:
    """One line from inside the jail -> its record (a test's `stdout` decoded to text, its `value` to the
    Python value), or ProtocolError. `kind`: "stdin" | "call", which payload a test that ran carries."""
    if len(line) > MAX_RECORD_BYTES:
        raise ProtocolError(f"a record longer than {MAX_RECORD_BYTES} bytes")
    try:
        rec = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:  # ProtocolError is a ValueError too: keep its message
        raise ProtocolError(
            str(e)[:200] if isinstance(e, ProtocolError) else "a line that is not JSON"
        ) from None
    event = rec.get("event") if isinstance(rec, dict) else None
    if event == "test":
        return _checked_test(rec, kind)
    if not isinstance(event, str) or event not in _FRAMES:
        raise ProtocolError(f"an event {str(event)[:40]!r}")
    if tuple(sorted(rec)) != tuple(sorted(_FRAMES[event])):
        raise ProtocolError(f"a {event} record with keys {sorted(rec)[:8]}")
    if "error" in rec:
        _checked_error(rec)
    return rec


def result_record(i: int, status: str, ms: float, **payload) -> dict:
    """A test record as the harness writes it (payload: stdout=bytes, value=<already encoded>, error=str)."""
    rec = {"event": "test", "i": i, "status": status, "ms": round(min(max(ms, 0.0), MAX_MS), 1)}
    if "stdout" in payload:
        rec["stdout"] = base64.b64encode(payload["stdout"][:MAX_OUTPUT_BYTES]).decode("ascii")
    elif "value" in payload:
        rec["value"] = payload["value"]
    else:
        rec["error"] = str(payload.get("error", ""))[-(MAX_ERROR_CHARS - 200) :]
    return rec


class LineReader:
    """The lines of a pipe, read in linear time and bounded: a line longer than `max_bytes` comes back cut
    at max_bytes + 1 (parse_record refuses it) and ends the reading; so does a last line without newline."""

    def __init__(self, fd: int, max_bytes: int = MAX_RECORD_BYTES) -> None:
        self.fd, self.max_bytes = fd, max_bytes
        self.timed_out = False
        self._lines: collections.deque = collections.deque()
        self._pending = bytearray()
        self._ended = False
        self._poll = select.poll()  # not select(): a busy trusted process may hold fds above 1023
        self._poll.register(fd, select.POLLIN)

    def next(self, deadline: float):
        """The next line (bytes, without its newline); None at the end, or when `deadline` (monotonic)
        passes first (then `timed_out`)."""
        self.timed_out = False
        while not self._lines:
            if self._ended:
                return None
            if not self._poll.poll(max(0, int((deadline - time.monotonic()) * 1e3))):
                self.timed_out = True
                return None
            chunk = os.read(self.fd, _CHUNK)
            if not chunk:
                self._ended = True
                if self._pending:
                    self._lines.append(bytes(self._pending))
                continue
            self._take(chunk)
        return self._lines.popleft()

    def _take(self, chunk: bytes) -> None:
        start = 0
        while not self._ended and (newline := chunk.find(b"\n", start)) >= 0:
            self._pending += chunk[start:newline]
            start = newline + 1
            self._push(complete=True)
        if not self._ended:
            self._pending += chunk[start:]
            self._push(complete=False)

    def _push(self, complete: bool) -> None:
        if len(self._pending) > self.max_bytes:
            self._lines.append(bytes(self._pending[: self.max_bytes + 1]))
            self._ended = True
        elif not complete:
            return
        else:
            self._lines.append(bytes(self._pending))
        self._pending.clear()
