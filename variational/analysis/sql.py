"""DuckDB over a run: one view per stage table, saved analyses from sql/, a listing of runs.

In: `<data_root>/<run>/run.json` (written by runs.record_stage: stage -> round -> {fingerprint, path, rows})
and the Parquet shards it points at. Out: a DuckDB connection with a VIEW per stage table over all part files
of all rounds (union_by_name), plus `run_stages` (one row per stage and round: manifest rows, Parquet rows,
status); `run_sql` returns a polars frame. Views are lazy, so a table missing from a run only breaks the
queries that use it, and those fail with a message naming the stages the run has; a shard that cannot be read
leaves its stage out (status `unreadable`) and the other tables queryable.

Read-only: `run_sql` accepts only SELECT-type statements (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW,
SUMMARIZE), and every connection is locked down once its views exist: no file outside the run's folders, no
extensions, no settings change. Errors are `SqlError`, one line.

Bounded: a query runs under a time limit (`timeout_s`, default 300 s) and a memory limit (default a quarter
of RAM, not DuckDB's 80%), spills to a private folder of this process (DuckDB's default, `.tmp` of the
working directory, would be readable by the query), and with `max_rows` computes only that many rows plus
one. It runs in a worker thread so that Ctrl-C stops it: DuckDB itself ignores SIGINT until a query ends.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import duckdb
import polars as pl

from variational.pipeline import shardstats
from variational.pipeline.runs import recorded_stages, run_folder, run_names, unrecorded_folders
from variational.pipeline.storage import open_root
from variational.pipeline.store import CorruptRecord
from variational.registry import OLD_STAGE_NAMES

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
TABLE_OF = OLD_STAGE_NAMES  # runs of earlier releases recorded stages under other names
META_VIEW = "run_stages"
# DuckDB's statement types that only read. COPY, ATTACH, EXPORT, INSERT, CREATE, LOAD/INSTALL, SET, PRAGMA,
# CALL and EXPLAIN (EXPLAIN ANALYZE runs the statement it explains) are refused before anything runs.
READ_ONLY_STATEMENTS = {duckdb.StatementType.SELECT}
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MEMORY_SHARE = 0.25  # of physical RAM; DuckDB's own default, 80%, is 18.8 GB of a 24 GB machine
_MEMORY_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_MEMORY_UNITS |= {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class SqlError(ValueError):
    """A query that was refused or failed; the message is one line."""


def _one_line(err: Exception) -> str:
    """DuckDB messages carry a caret diagram after a blank line or `LINE n:`; keep the text before it."""
    head = []
    for line in str(err).splitlines():
        if not line.strip() or line.startswith("LINE "):
            break
        head.append(line.strip())
    return " ".join(head) or type(err).__name__


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _files_sql(files: list[Path | str]) -> str:
    return "[" + ", ".join(_sql_string(str(f)) for f in files) + "]"


def parse_memory(text: str) -> int:
    """'4GB', '512MiB', '1.5 GB' -> bytes (GB = 10^9, GiB = 2^30, as DuckDB counts); SqlError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*", text, re.IGNORECASE)
    if match is None or (size := int(float(match[1]) * _MEMORY_UNITS[match[2].lower()])) < 1 << 20:
        raise SqlError(f"memory limit {text!r}: give a size of at least 1MB, e.g. 4GB or 512MiB")
    return size


def default_memory() -> int:
    """DEFAULT_MEMORY_SHARE of this machine's physical RAM, in bytes."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * DEFAULT_MEMORY_SHARE)


@functools.cache
def _spill_dir() -> str:
    """DuckDB's temporary folder, private to this process (mode 0700) and removed at exit. DuckDB lets
    queries read its temporary folder, and its default is `.tmp` of the working directory."""
    path = tempfile.mkdtemp(prefix="variational-sql-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def connect(data_root: str | Path, run: str, memory: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per stage table of `run` and the `run_stages` overview, locked so
    that queries read only the run's folders and use at most `memory` bytes (default: `default_memory`;
    see `_lock_down`)."""
    con = duckdb.connect()
    con.execute("SET autoinstall_known_extensions = false")  # before any read: s3:// never loads httpfs
    con.execute("SET autoload_known_extensions = false")
    open_root(data_root).register_duckdb(con)  # object storage: read through our fsspec filesystem
    readable = [run_folder(data_root, run)]
    meta: list[dict[str, Any]] = []
    sides: dict[str, Path | str] = {}  # side tables: eval_summary, problems_rejects
    stats: list[Path | str] = []  # every stage's shard_stats.parquet: one `shard_stats` view
    parts: dict[str, list[tuple[int, str]]] = {}
    for rec in recorded_stages(data_root, run):
        table = TABLE_OF.get(rec.stage, rec.stage)
        parquet_rows, status = None, "complete" if rec.complete else "missing"
        if rec.problem:  # a damaged or unsafe record: named here, nothing of it read, the others go on
            status = f"unreadable: {rec.problem}"
        else:
            readable.append(rec.folder)
            for side in rec.sides:
                if (stem := PurePosixPath(str(side)).stem) == shardstats.SIDE_TABLE:
                    stats.append(side)
                else:
                    sides[f"{table}_{stem}"] = side
        if rec.parts:
            scan = f"read_parquet({_files_sql(rec.parts)}, union_by_name=true)"
            try:
                parquet_rows = con.execute(f"SELECT count(*) FROM {scan}").fetchall()[0][0]
                parts.setdefault(table, []).append((rec.round, scan))
            except duckdb.Error as err:  # a damaged shard: leave this stage out, keep the others
                status = f"unreadable: {_one_line(err)}"
        meta.append(
            {
                "stage": rec.stage,
                "table_name": table if parquet_rows is not None else None,
                "round": rec.round,
                "status": status,
                "rows": rec.entry.get("rows"),
                "parquet_rows": parquet_rows,
                "shards": len(rec.parts),
                "fingerprint": str(rec.entry.get("fingerprint")),
                "wall_time_s": rec.entry.get("wall_time_s"),
                "path": str(rec.folder),
            }
        )
    for table, scans in parts.items():
        con.execute(f"CREATE VIEW {_quote(table)} AS {_union_rounds(con, scans)}")
    for name, path in sides.items():
        with contextlib.suppress(duckdb.Error):
            con.execute(f"CREATE VIEW {_quote(name)} AS SELECT * FROM read_parquet({_sql_string(str(path))})")
    con.register(META_VIEW, pl.DataFrame(meta, schema=_META_SCHEMA))
    _shard_stats_view(con, stats)
    _lock_down(con, readable, memory or default_memory())
    return con


def _shard_stats_view(con: duckdb.DuckDBPyConnection, files: list[Path | str]) -> None:
    """`shard_stats`: what each shard of each stage cost (variational/pipeline/shardstats.py), empty with
    its columns when no stage recorded any (runs of earlier releases)."""
    with contextlib.suppress(duckdb.Error):
        if files:
            scan = f"read_parquet({_files_sql(files)}, union_by_name=true)"
            con.execute(f"CREATE VIEW {shardstats.SIDE_TABLE} AS SELECT * FROM {scan}")
            return
    con.register(shardstats.SIDE_TABLE, shardstats.frame([]))


def _lock_down(con: duckdb.DuckDBPyConnection, readable: list[Path | str], memory: int) -> None:
    """No file access but reading the run's folders (paths, or URLs on object storage), no extensions, a
    memory limit, a private spill folder, and no way to change that back.

    `allowed_directories` lets DuckDB write there too (COPY TO, ATTACH), which is why `run_sql` also
    refuses every statement that is not a SELECT."""
    dirs = sorted({str(d.resolve() if isinstance(d, Path) else d).rstrip("/") + "/" for d in readable})
    con.execute(f"SET memory_limit = '{int(memory)}B'")
    con.execute(f"SET temp_directory = {_sql_string(_spill_dir())}")
    con.execute(f"SET allowed_directories = [{', '.join(_sql_string(d) for d in dirs)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_META_SCHEMA = {
    "stage": pl.String,
    "table_name": pl.String,
    "round": pl.Int64,
    "status": pl.String,
    "rows": pl.Int64,
    "parquet_rows": pl.Int64,
    "shards": pl.Int64,
    "fingerprint": pl.String,
    "wall_time_s": pl.Float64,
    "path": pl.String,
}


def _union_rounds(con: duckdb.DuckDBPyConnection, parts: list[tuple[int, str]]) -> str:
    """One round: its scan. Several: union by name, adding `round` where the table has no such column."""
    if len(parts) == 1:
        return f"SELECT * FROM {parts[0][1]}"
    selects = []
    for round_, scan in parts:
        columns = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
        extra = "" if "round" in columns else f", {round_}::BIGINT AS round"
        selects.append(f"SELECT *{extra} FROM {scan}")
    return " UNION ALL BY NAME ".join(selects)


def saved_queries() -> dict[str, str]:
    """name -> first comment line (what it answers) of every sql/*.sql."""
    out = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        lines = path.read_text().strip().splitlines()
        out[path.stem] = lines[0].removeprefix("--").strip() if lines else ""
    return out


def resolve_query(query: str) -> str:
    """SQL text from a saved query name (`accuracy_by_source`), a .sql path, or the SQL itself."""
    stripped = query.strip()
    if stripped.endswith(".sql") and Path(stripped).is_file():
        return Path(stripped).read_text()
    saved = SQL_DIR / f"{Path(stripped).stem}.sql"  # `sql/x.sql` from any working directory
    if "\n" not in stripped and " " not in stripped and saved.is_file():
        return saved.read_text()
    if stripped.endswith(".sql") and " " not in stripped:
        raise FileNotFoundError(f"no SQL file {stripped!r}; saved queries: {sorted(saved_queries())}")
    return query


def check_read_only(sql: str) -> None:
    """Refuse, before anything runs, SQL with a statement that is not a plain query (SqlError, one line)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise SqlError(_one_line(err)) from None
    for statement in statements:
        if statement.type not in READ_ONLY_STATEMENTS:
            raise SqlError(
                f"variational sql only reads: {statement.type.name} statements are refused "
                "(use SELECT, WITH, FROM, DESCRIBE, SHOW or SUMMARIZE)"
            )


def run_sql(
    data_root: str | Path,
    run: str,
    query: str,
    max_rows: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory: int | None = None,
) -> pl.DataFrame:
    """Run read-only SQL (text, .sql file or saved query name) over a run's views; the last statement's
    result, or with `max_rows` its first max_rows + 1 rows (only those are computed: more than max_rows
    means the result goes on). Refused or failing SQL, and a query past `timeout_s` seconds or `memory`
    bytes, raise SqlError with one line; Ctrl-C stops the query and raises KeyboardInterrupt."""
    sql = resolve_query(query)
    check_read_only(sql)
    con = connect(data_root, run, memory)

    def fetch() -> pl.DataFrame:
        rel = con.sql(sql)  # runs every statement; the result is the last one's
        if rel is None:
            return pl.DataFrame()
        return (rel if max_rows is None else rel.limit(max_rows + 1)).pl()

    try:
        return _bounded(con, fetch, timeout_s)
    except duckdb.OutOfMemoryException as err:
        limit = f"{(memory or default_memory()) / 1e9:.2f} GB"
        raise SqlError(f"{_one_line(err)} (the memory limit is {limit}: raise it with --memory)") from None
    except duckdb.CatalogException as err:
        views = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        tables = sorted({r[0] for r in views} | {META_VIEW})
        raise SqlError(
            f"{_one_line(err)} (run {run!r} has the tables {tables}; a missing table means its stage "
            f"has not run yet{_unreadable_note(con)})"
        ) from None
    except duckdb.PermissionException as err:
        raise SqlError(f"{_one_line(err)} (variational sql reads only the files of run {run!r})") from None
    except duckdb.Error as err:
        raise SqlError(_one_line(err)) from None
    finally:
        con.close()


def unreadable_stages(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """table -> why its stage cannot be read (damaged or unsafe), from `run_stages`."""
    rows = con.execute(
        f"SELECT stage, status FROM {META_VIEW} WHERE table_name IS NULL AND status LIKE 'unreadable%'"
    ).fetchall()
    return {TABLE_OF.get(stage, stage): status for stage, status in rows}


def _unreadable_note(con: duckdb.DuckDBPyConnection) -> str:
    bad = unreadable_stages(con)
    return "".join(f"; {table} is {why}" for table, why in sorted(bad.items()))


def _bounded(
    con: duckdb.DuckDBPyConnection, work: Callable[[], pl.DataFrame], timeout_s: float
) -> pl.DataFrame:
    """`work()` (a query on `con`) in a worker thread, the main thread waiting: DuckDB has no time limit and
    does not return to Python while it computes, so neither a deadline nor Ctrl-C could stop it from the
    thread that runs it. Past `timeout_s`: interrupted, SqlError. Ctrl-C: interrupted, KeyboardInterrupt."""
    outcome: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: a join interrupted by Ctrl-C marks a live thread as ended

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # handed to the waiting thread, raised there
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=target, name="variational-sql", daemon=True).start()
    try:
        done.wait(timeout_s)  # Ctrl-C interrupts the wait
    finally:
        while not done.is_set():  # past the deadline, or Ctrl-C: stop the query (retried: it may not run yet)
            con.interrupt()
            done.wait(0.1)
    if "error" in outcome and not isinstance(outcome["error"], duckdb.InterruptException):
        raise outcome["error"]
    if "value" not in outcome:
        raise SqlError(f"the query ran past its time limit of {timeout_s:g} s and was stopped (--timeout)")
    return outcome["value"]


def list_runs(data_root: str | Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(run, [{stage, round, status, rows, fingerprint}]) for every run under data_root.

    status: complete (manifest present), missing (recorded but its folder is gone), incomplete (a stage
    folder without manifest that run.json does not point at: running now, or crashed before finishing), or
    unreadable (a damaged or unsafe record: why). A run whose run.json is damaged has one row saying so."""
    out = []
    for run in run_names(data_root):
        try:
            records = recorded_stages(data_root, run)
        except CorruptRecord as err:
            out.append((run, [{"stage": "run.json", "round": None, "status": "damaged", "rows": None,
                               "fingerprint": "", "problem": str(err)}]))  # fmt: skip
            continue
        rows = [
            {
                "stage": rec.stage,
                "round": rec.round,
                "status": "unreadable" if rec.problem else "complete" if rec.complete else "missing",
                "rows": rec.entry.get("rows"),
                "fingerprint": str(rec.entry.get("fingerprint")),
                "problem": rec.problem,
            }
            for rec in records
        ]
        rows += [
            {
                "stage": stage,
                "round": None,
                "status": f"incomplete ({n} shards)",
                "rows": None,
                "fingerprint": fp,
                "problem": None,
            }
            for stage, fp, n in unrecorded_folders(data_root, run)
        ]
        out.append((run, rows))
    return out


def format_runs(runs: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """`list_runs` as text: one block per run, one line per stage and round."""
    lines = []
    for run, stages in runs:
        lines.append(run)
        for s in stages:
            r = "" if s["round"] is None else f" [round {s['round']}]"
            rows = "" if s["rows"] is None else f"{s['rows']} rows"
            lines.append(f"  {s['stage'] + r:<28} {s['status']:<22} {rows:<14} {s['fingerprint']}")
            if s.get("problem"):
                lines.append(f"    {s['problem']}")
    return "\n".join(lines)
