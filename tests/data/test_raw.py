"""variational/data/raw.py: every row read on its own, rejects named by file, row and reason."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from variational.data.raw import read_rows, row_bytes


def test_jsonl_bad_lines_reject_only_themselves(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(
        b'{"a": 1}\n'
        b"\n"  # blank: not a row
        b'{"a": \n'  # broken JSON
        b"[1, 2]\n"  # JSON, but not an object
        b'{"a": "\xc3\x28"}\n'  # invalid UTF-8 sequence
        b'{"a": 5}\n'
    )
    rr = read_rows(str(path))
    assert rr.n_rows == 5
    assert rr.rows == [{"a": 1, "row_index": 0}, {"a": 5, "row_index": 4}]
    reasons = {r["row_index"]: r["reason"] for r in rr.rejects}
    assert reasons[1].startswith("line 3: not valid JSON")
    assert reasons[2] == "line 4: a JSON list, expected an object"
    assert reasons[3] == "line 5: not UTF-8 (byte 0xc3 at offset 7)"
    assert {r["file"] for r in rr.rejects} == {str(path)}


def test_max_row_bytes_counts_utf8_json(tmp_path: Path) -> None:
    small, big = {"t": "é" * 10}, {"t": "é" * 600}
    assert row_bytes(small) == len(json.dumps(small, ensure_ascii=False).encode())
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps(small) + "\n" + json.dumps(big) + "\n")
    rr = read_rows(str(path), max_row_bytes=1024)
    assert [r["row_index"] for r in rr.rows] == [0]
    assert rr.rejects[0]["reason"] == f"row is {row_bytes(big):,} bytes, over data.max_row_bytes=1,024"


def test_indices_read_only_the_rows_asked_for(tmp_path: Path) -> None:
    rows = [{"i": i, "io": json.dumps({"inputs": [str(i)]})} for i in range(2500)]
    folder = tmp_path / "snap"
    folder.mkdir()
    pl.DataFrame(rows[:1500]).write_parquet(folder / "test-00000-of-00002.parquet")
    pl.DataFrame(rows[1500:]).write_parquet(folder / "test-00001-of-00002.parquet")
    jsonl = tmp_path / "all.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wanted = {3, 1499, 1500, 2499, 7000}  # 7000 does not exist
    for dataset in (str(folder), str(jsonl)):
        rr = read_rows(dataset, "test", indices=wanted)
        assert rr.n_rows == 2500
        assert [(r["row_index"], r["i"]) for r in rr.rows] == [(i, i) for i in (3, 1499, 1500, 2499)]
    rr = read_rows(str(folder), "test")
    assert rr.locate(1600) == (str(folder / "test-00001-of-00002.parquet"), 100)


def test_json_array_file_and_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    path.write_text(json.dumps([{"a": 1}, "oops", {"a": 2}]))
    rr = read_rows(str(path))
    assert [r["a"] for r in rr.rows] == [1, 2]
    assert rr.rejects[0]["row_index"] == 1 and "expected an object" in rr.rejects[0]["reason"]
    bad = tmp_path / "raw.csv"
    bad.write_text("a\n1\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        read_rows(str(bad))


def test_a_deeply_nested_row_rejects_only_itself(tmp_path: Path) -> None:
    """100,000 nested brackets raised RecursionError out of the reader (issue 17 item 5); a row just deeper
    than MAX_NESTING, which Python's decoder still reads, is rejected the same way."""
    from variational.data.raw import MAX_NESTING, TOO_DEEP

    path = tmp_path / "raw.jsonl"
    just_deeper = '{"a": ' + "[" * MAX_NESTING + "]" * MAX_NESTING + "}"  # the row is a level of its own
    at_the_limit = '{"a": ' + "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1) + "}"
    path.write_text(
        '{"a": 1}\n'
        + '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
        + '{"a": ' + '{"b": ' * 5000 + "1" + "}" * 5000 + "}\n"
        + just_deeper + "\n" + at_the_limit + "\n"
    )  # fmt: skip
    rr = read_rows(str(path))
    assert rr.n_rows == 5 and [r["row_index"] for r in rr.rows] == [0, 4]
    assert [(r["row_index"], r["reason"]) for r in rr.rejects] == [
        (1, f"line 2: {TOO_DEEP}"),
        (2, f"line 3: {TOO_DEEP}"),
        (3, f"line 4: {TOO_DEEP}"),
    ]


def test_deep_rows_from_parquet_and_json_arrays(tmp_path: Path) -> None:
    from variational.data.raw import MAX_NESTING, TOO_DEEP, parse_json

    deep: object = 1
    for _ in range(MAX_NESTING + 5):
        deep = [deep]
    arr = tmp_path / "raw.json"
    arr.write_text(json.dumps([{"a": 1}, {"a": deep}, {"a": 2}]))
    rr = read_rows(str(arr))
    assert [r["a"] for r in rr.rows] == [1, 2] and rr.rejects[0]["reason"] == TOO_DEEP
    arr.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")  # one array: too deep to decode at all
    with pytest.raises(ValueError, match=f"not a readable JSON array \\({TOO_DEEP}\\)"):
        read_rows(str(arr))
    with pytest.raises(ValueError, match=TOO_DEEP):
        parse_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(json.JSONDecodeError):
        parse_json("{not json")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_a_dataset_without_rows_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"no rows in .*empty\.jsonl \(empty, or only blank lines\)"):
        read_rows(str(path))
    assert read_rows(str(path), indices={0}).n_rows == 0  # a lookup of some rows is not a dataset load
