"""Read a dataset one row at a time, so a bad row rejects only itself (issue 11 §8).

In:  a dataset name: `embedded:<name>` (variational/data/<name>.jsonl), a local .jsonl/.json/.parquet file, a
     folder of them (a hub snapshot: `data/<split>-0000x-of-....parquet`), or a hub id (`datasets.load_dataset`).
Out: `RawRows`: the rows that could be read, as dicts, each with `row_index` (its 0-based position in the
     dataset, counting every row, bad ones too) and the read rejects (`row_index`, `file`, `file_row`, `reason`).

A read reject is a jsonl line that is not UTF-8, not JSON or not a JSON object, a row nested deeper than
MAX_NESTING lists/objects, or a row larger than `max_row_bytes` (its UTF-8 JSON size). Blank jsonl lines are
not rows (as in `datasets`' json loader). A dataset without a single row is an error (ValueError).
Why not `datasets.load_dataset("json", ...)` for local files: it types each column over the whole file, so one
row with a string where the others have a list fails the load or retypes every row, and a non-UTF-8 byte
aborts it without a row index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

EMBEDDED = "embedded:"
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Levels of lists/objects in one row. A Bespoke-Stratos row has 3 (row, conversations, turn); Python's JSON
# decoder and encoder recurse, so a row of 100,000 nested brackets raised RecursionError and killed
# `variational data check` and the problems stage instead of rejecting itself (issue 17).
MAX_NESTING = 100
TOO_DEEP = f"nested deeper than {MAX_NESTING} levels of lists/objects"


@dataclass
class RawRows:
    """The readable rows of a dataset and the rows that could not be read."""

    dataset: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    n_rows: int = 0  # every row, read or rejected
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (file, first row_index, rows)

    def locate(self, row_index: int) -> tuple[str, int]:
        """(file, row within that file) of a dataset row."""
        for name, first, count in self.spans:
            if first <= row_index < first + count:
                return name, row_index - first
        return self.dataset, row_index


def embedded_path(dataset: str) -> Path:
    """`embedded:<name>` -> the jsonl shipped in variational/data/<name>.jsonl."""
    name = dataset.removeprefix(EMBEDDED)
    path = Path(str(resources.files("variational") / "data" / f"{name}.jsonl"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise FileNotFoundError(f"no embedded dataset {name!r}; shipped: {shipped}")
    return path


def local_files(dataset: str, split: str) -> list[Path] | None:
    """The data files of a local dataset (file or folder), or None when `dataset` is not a local path."""
    if dataset.startswith(EMBEDDED):
        return [embedded_path(dataset)]
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{path}: unsupported data file; use one of {sorted(DATA_SUFFIXES)}")
        return [path]
    if not path.is_dir():
        return None
    for suffix in (".parquet", ".jsonl", ".json"):  # a hub snapshot folder: data/<split>-0000x-of-....parquet
        files = sorted(p for p in path.rglob(f"*{suffix}") if not p.name.startswith("."))
        in_split = [p for p in files if p.name.startswith(f"{split}-") or p.name.startswith(f"{split}.")]
        if files:
            return in_split or files
    raise FileNotFoundError(f"{path}: folder holds no .parquet/.jsonl/.json data files")


def content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def row_bytes(row: dict[str, Any]) -> int:
    """Size of a row as UTF-8 JSON: what a jsonl line of it would take."""
    return len(json.dumps(row, ensure_ascii=False, default=str).encode())


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether `value` nests lists/dicts more than `limit` levels deep (iterative: no recursion to exhaust)."""
    stack = [(value, 1)] if isinstance(value, dict | list | tuple) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))
    return False


def parse_json(text: str | bytes) -> Any:
    """`json.loads` whose answer to a document nested deeper than MAX_NESTING is ValueError (a reject reason),
    never RecursionError; a syntax error stays json.JSONDecodeError (a ValueError too)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None
    if too_deep(value):
        raise ValueError(TOO_DEEP)
    return value


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of every non-blank line."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, line


def _parse_line(line: bytes, number: int) -> dict[str, Any]:
    """One jsonl line -> its object; ValueError names the line and what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"line {number}: not UTF-8 (byte 0x{line[err.start]:02x} at offset {err.start})"
        ) from None
    try:
        value = parse_json(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:
        raise ValueError(f"line {number}: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"line {number}: a JSON {type(value).__name__}, expected an object")
    return value


def _file_rows(path: Path, wanted: set[int] | None) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(row within the file, row dict or the reason it cannot be read); rows outside `wanted` yield {}."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        first = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            if wanted is None:
                rows = batch.to_pylist()
            else:  # aux lookups: convert only the rows asked for (APPS tests run to megabytes a row)
                take = [i for i in range(batch.num_rows) if first + i in wanted]
                rows = [{} for _ in range(batch.num_rows)]
                for i, row in zip(take, batch.take(take).to_pylist(), strict=True):
                    rows[i] = row
            for i, row in enumerate(rows):
                yield first + i, row
            first += batch.num_rows
        return
    with path.open("rb") as fh:
        is_array = path.suffix == ".json" and fh.read(4096).lstrip()[:1] == b"["
    if is_array:  # a .json file holding one array of objects: readable only as a whole
        try:
            items = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable JSON array ({err}); write it as jsonl") from None
        except RecursionError:  # one array: a row too deep to decode takes the file with it
            raise ValueError(f"{path}: not a readable JSON array ({TOO_DEEP}); write it as jsonl") from None
        for i, item in enumerate(items):
            yield i, item if isinstance(item, dict) else f"a JSON {type(item).__name__}, expected an object"
        return
    for i, (number, line) in enumerate(_jsonl_lines(path)):
        if wanted is not None and i not in wanted:
            yield i, {}
            continue
        try:
            yield i, _parse_line(line, number)
        except ValueError as err:
            yield i, str(err)


def read_rows(
    dataset: str, split: str = "train", max_row_bytes: int | None = None, indices: set[int] | None = None
) -> RawRows:
    """Every row of `dataset` (or only `indices`), each read on its own; see the module docstring."""
    out = RawRows(dataset)
    files = local_files(dataset, split)
    if files is None:
        _read_hub(dataset, split, max_row_bytes, indices, out)
    for path in files or []:
        first = out.n_rows
        local = None if indices is None else {i - first for i in indices if i >= first}
        count = 0
        for file_row, row in _file_rows(path, local):
            count += 1
            _add(out, first + file_row, str(path), file_row, row, max_row_bytes, indices)
        out.spans.append((str(path), first, count))
        out.n_rows += count
    if out.n_rows == 0 and indices is None:  # nothing to run on: say so here, not as "0 rows, 0 rejected"
        where = ", ".join(map(str, files)) if files else f"{dataset} (split {split})"
        raise ValueError(f"no rows in {where} (empty, or only blank lines)")
    return out


def _add(
    out: RawRows,
    row_index: int,
    file: str,
    file_row: int,
    row: dict[str, Any] | str,
    max_row_bytes: int | None,
    indices: set[int] | None,
) -> None:
    if indices is not None and row_index not in indices:
        return
    reason = row if isinstance(row, str) else None
    if reason is None and too_deep(row):  # parquet, hub and JSON-array rows; jsonl lines are checked already
        reason = TOO_DEEP
    if reason is None and max_row_bytes is not None and (size := row_bytes(row)) > max_row_bytes:
        reason = f"row is {size:,} bytes, over data.max_row_bytes={max_row_bytes:,}"
    if reason is None:
        out.rows.append({**row, "row_index": row_index})
    else:
        out.rejects.append({"row_index": row_index, "file": file, "file_row": file_row, "reason": reason})


def _read_hub(
    dataset: str, split: str, max_row_bytes: int | None, indices: set[int] | None, out: RawRows
) -> RawRows:
    """A hub dataset through `datasets` (Parquet/Arrow typed by the hub, memory-mapped: cheap to index)."""
    import datasets  # heavy import, only where a hub dataset is actually loaded

    ds = datasets.load_dataset(dataset, split=split)
    out.n_rows = len(ds)
    out.spans.append((f"{dataset}:{split}", 0, len(ds)))
    picked = range(len(ds)) if indices is None else sorted(i for i in indices if 0 <= i < len(ds))
    subset = ds if indices is None else ds.select(picked)
    for row_index, row in zip(picked, subset, strict=True):
        _add(out, row_index, f"{dataset}:{split}", row_index, row, max_row_bytes, None)
    return out
