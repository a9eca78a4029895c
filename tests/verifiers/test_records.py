"""variational/verifiers/records.py: the only shapes the trusted side accepts from the code jail, parsed
strictly, and the bounded linear line reader. Pure functions and a pipe: no sandbox, milliseconds."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time

import numpy as np
import pytest

from variational.verifiers.records import (
    MAX_OUTPUT_BYTES,
    MAX_RECORD_BYTES,
    LineReader,
    Opaque,
    ProtocolError,
    decode_value,
    encode_value,
    parse_record,
    result_record,
)


def line(record: dict) -> bytes:
    return json.dumps(record).encode()


def test_the_shapes_the_harness_writes_parse() -> None:
    assert parse_record(b'{"event": "start"}', "stdin") == {"event": "start"}
    assert parse_record(b'{"event": "done"}', "call") == {"event": "done"}
    assert (
        parse_record(line({"event": "compile_error", "error": "SyntaxError"}), "call")["error"]
        == "SyntaxError"
    )
    ran = parse_record(line(result_record(0, "ran", 12.5, stdout=b"3\n\xff")), "stdin")
    assert ran["stdout"] == "3\n\ufffd" and ran["ms"] == 12.5  # bytes as the official capture decodes them
    value = parse_record(line(result_record(1, "ran", 1.0, value=encode_value((1, [2.5], {3: "x"})))), "call")
    assert value["value"] == (1, [2.5], {3: "x"})
    for state in ("runtime_error", "timeout", "killed", "sandbox_violation", "compile_error"):
        assert parse_record(line(result_record(2, state, 0.0, error="boom")), "call")["status"] == state


RAN = {"event": "test", "i": 0, "status": "ran", "ms": 1.0, "value": 3}


@pytest.mark.parametrize(
    "raw",
    [
        # statuses that judge or drop a row are never claimed from inside
        line({**RAN, "status": "ok"}),
        line({**RAN, "status": "wrong"}),
        line({**RAN, "status": "gold_unparsable"}),
        line({"event": "gold_unparsable"}),
        line({"event": "verdict", "correct": True}),
        # shapes: an extra, a missing or a duplicate key, the other form's payload, bad types
        line({**RAN, "correct": True}),
        line({k: v for k, v in RAN.items() if k != "ms"}),
        b'{"event": "test", "i": 0, "i": 1, "status": "ran", "ms": 1, "value": 3}',
        line({**{k: v for k, v in RAN.items() if k != "value"}, "stdout": "Mw=="}),
        line({**RAN, "i": True}),
        line({**RAN, "i": "0"}),
        b'{"event": "test", "i": 0, "status": "ran", "ms": NaN, "value": 3}',
        line({**RAN, "ms": -1}),
        line({**RAN, "ms": 1e300}),
        line({"event": "start", "extra": 1}),
        line({"event": "compile_error", "error": "x" * 5000}),
        line({"event": "test", "i": 0, "status": "timeout", "ms": 1, "error": ["not", "text"]}),
        # values: only encode_value's tags, hashable members, bounded depth
        line({**RAN, "value": {"__eq__": "always"}}),
        line({**RAN, "value": {"__tuple__": [1], "__set__": [2]}}),
        line({**RAN, "value": {"__set__": [[1, 2]]}}),
        line({**RAN, "value": {"__dict__": [[1, 2, 3]]}}),
        line({**RAN, "value": {"__opaque__": 5}}),
        b'{"event": "test", "i": 0, "status": "ran", "ms": 1, "value": ' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"event": "test", "i": 0, "status": "ran", "ms": 1, "value": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"event": "test", "i": 0, "status": "ran", "ms": 1, "value": ' + b"9" * 5000 + b"}",
        # not JSON, not an object, not one line's worth
        b"",
        b"ok",
        b"[1, 2]",
        b'{"event": "done"} trailing',
        b"\xff\xfe",
        b" " * (MAX_RECORD_BYTES + 1),
    ],
)
def test_anything_else_is_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_record(raw, "call")


def test_stdin_outputs_are_base64_and_bounded() -> None:
    base = {"event": "test", "i": 0, "status": "ran", "ms": 1}
    for bad in ("3\n", "Mw", "M w==", 3):
        with pytest.raises(ProtocolError):
            parse_record(line({**base, "stdout": bad}), "stdin")
    too_long = base64.b64encode(b"x" * (MAX_OUTPUT_BYTES + 3)).decode()
    with pytest.raises(ProtocolError):
        parse_record(line({**base, "stdout": too_long}), "stdin")
    # what the harness cuts is the longest output that parses
    biggest = line(result_record(0, "ran", 1.0, stdout=b"\0" * (MAX_OUTPUT_BYTES + 10)))
    assert len(parse_record(biggest, "stdin")["stdout"]) == MAX_OUTPUT_BYTES


def test_encode_decode_round_trip() -> None:
    value = {1: (2, [3.5, None]), "k": {frozenset({1, 2})}, (1, "a"): True, "inf": float("inf")}
    assert decode_value(json.loads(json.dumps(encode_value(value)))) == value
    assert (
        decode_value(encode_value(np.int64(7))) == 7
        and type(decode_value(encode_value(np.float64(0.5)))) is float
    )

    class AlwaysEqual:
        def __eq__(self, other: object) -> bool:
            return True

    opaque = decode_value(encode_value(AlwaysEqual()))
    assert isinstance(opaque, Opaque) and opaque != opaque and repr(opaque) == "<AlwaysEqual>"


def feed(fd: int, parts: list[bytes]) -> threading.Thread:
    def write() -> None:
        with contextlib.suppress(BrokenPipeError), open(fd, "wb") as pipe:  # the reader may stop early
            for part in parts:
                pipe.write(part)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_line_reader_splits_and_ends() -> None:
    read_fd, write_fd = os.pipe()
    feed(write_fd, [b"a\nb", b"c\n\n", b"tail without newline"])
    reader = LineReader(read_fd, max_bytes=100)
    got = [reader.next(time.monotonic() + 10) for _ in range(5)]
    assert got == [b"a", b"bc", b"", b"tail without newline", None] and not reader.timed_out
    os.close(read_fd)


def test_line_reader_cuts_a_huge_line_after_reading_only_its_limit() -> None:
    # 15 MB of NUL bytes and no newline (the line that cost the old reader 35 s of CPU): the reader hands
    # back max_bytes + 1 bytes and stops, having read about max_bytes, not the whole stream
    read_fd, write_fd = os.pipe()
    writer = feed(write_fd, [b"\0" * 2**16] * 240)
    reader = LineReader(read_fd, max_bytes=2**20)
    cut = reader.next(time.monotonic() + 10)
    assert cut == b"\0" * (2**20 + 1) and reader.next(time.monotonic() + 10) is None
    os.close(read_fd)  # the writer gets EPIPE: nobody reads the rest
    writer.join(5)


def test_line_reader_times_out() -> None:
    read_fd, write_fd = os.pipe()
    reader = LineReader(read_fd)
    t0 = time.monotonic()
    assert reader.next(t0 + 0.2) is None and reader.timed_out
    os.write(write_fd, b"late\n")
    assert reader.next(time.monotonic() + 5) == b"late" and not reader.timed_out
    os.close(read_fd)
    os.close(write_fd)
