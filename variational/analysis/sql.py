"""DuckDB over a run: one view per stage table, saved analyses from sql/, a listing of runs.

In: `<data_root>/<run>/run.json` (written by store.record_stage: stage -> round -> {fingerprint, path, rows})
and the Parquet shards it points at. Out: a DuckDB connection with a VIEW per stage table over all part files
of all rounds (union_by_name), plus `run_stages` (one row per stage and round: manifest rows, Parquet rows,
status); `run_sql` returns a polars frame. Views are lazy, so a table missing from a run only breaks the
queries that use it, and those fail with a message naming the stages the run has; a shard that cannot be read
leaves its stage out (status `unreadable`) and the other tables queryable.

Read-only: `run_sql` accepts only SELECT-type statements (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW,
SUMMARIZE), and every connection is locked down once its views exist: no file outside the run's folders, no
extensions, no settings change. Errors are `SqlError`, one line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from variational.pipeline import shardstats
from variational.pipeline.store import recorded_stages, run_names, unrecorded_folders
from variational.registry import OLD_STAGE_NAMES

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
TABLE_OF = OLD_STAGE_NAMES  # runs of earlier releases recorded stages under other names
META_VIEW = "run_stages"
# DuckDB's statement types that only read. COPY, ATTACH, EXPORT, INSERT, CREATE, LOAD/INSTALL, SET, PRAGMA,
# CALL and EXPLAIN (EXPLAIN ANALYZE runs the statement it explains) are refused before anything runs.
READ_ONLY_STATEMENTS = {duckdb.StatementType.SELECT}


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


def _files_sql(files: list[Path]) -> str:
    return "[" + ", ".join(_sql_string(str(f)) for f in files) + "]"


def connect(data_root: str | Path, run: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per stage table of `run` and the `run_stages` overview, locked so
    that queries read only the run's folders (see `_lock_down`)."""
    data_root = Path(data_root)
    con = duckdb.connect()
    readable = [data_root / run]
    meta: list[dict[str, Any]] = []
    sides: dict[str, Path] = {}  # side tables: eval_summary, problems_rejects
    stats: list[Path] = []  # every stage's shard_stats.parquet: one `shard_stats` view
    parts: dict[str, list[tuple[int, str]]] = {}
    for rec in recorded_stages(data_root, run):
        table = TABLE_OF.get(rec.stage, rec.stage)
        readable.append(rec.folder)
        sides.update({f"{table}_{p.stem}": p for p in rec.sides if p.stem != shardstats.SIDE_TABLE})
        stats += [p for p in rec.sides if p.stem == shardstats.SIDE_TABLE]
        parquet_rows, status = None, "complete" if rec.complete else "missing"
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
                "fingerprint": rec.entry["fingerprint"],
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
    _lock_down(con, readable)
    return con


def _shard_stats_view(con: duckdb.DuckDBPyConnection, files: list[Path]) -> None:
    """`shard_stats`: what each shard of each stage cost (variational/pipeline/shardstats.py), empty with
    its columns when no stage recorded any (runs of earlier releases)."""
    with contextlib.suppress(duckdb.Error):
        if files:
            scan = f"read_parquet({_files_sql(files)}, union_by_name=true)"
            con.execute(f"CREATE VIEW {shardstats.SIDE_TABLE} AS SELECT * FROM {scan}")
            return
    con.register(shardstats.SIDE_TABLE, shardstats.frame([]))


def _lock_down(con: duckdb.DuckDBPyConnection, readable: list[Path]) -> None:
    """No file access but reading the run's folders, no extensions, and no way to change that back.

    `allowed_directories` lets DuckDB write there too (COPY TO, ATTACH), which is why `run_sql` also
    refuses every statement that is not a SELECT."""
    dirs = sorted({str(d.resolve()).rstrip("/") + "/" for d in readable})  # the slash: not `run2/` too
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
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


def run_sql(data_root: str | Path, run: str, query: str) -> pl.DataFrame:
    """Run read-only SQL (text, .sql file or saved query name) over a run's views; the last statement's
    result. Refused or failing SQL raises SqlError with one line."""
    sql = resolve_query(query)
    check_read_only(sql)
    con = connect(data_root, run)
    try:
        rel = con.sql(sql)  # runs every statement; the result is the last one's
        return pl.DataFrame() if rel is None else rel.pl()
    except duckdb.CatalogException as err:
        views = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        tables = sorted({r[0] for r in views} | {META_VIEW})
        raise SqlError(
            f"{_one_line(err)} (run {run!r} has the tables {tables}; a missing table means its stage "
            "has not run yet)"
        ) from None
    except duckdb.PermissionException as err:
        raise SqlError(f"{_one_line(err)} (variational sql reads only the files of run {run!r})") from None
    except duckdb.Error as err:
        raise SqlError(_one_line(err)) from None
    finally:
        con.close()


def list_runs(data_root: str | Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(run, [{stage, round, status, rows, fingerprint}]) for every run under data_root.

    status: complete (manifest present), missing (recorded but its folder is gone), or incomplete (a stage
    folder without manifest that run.json does not point at: running now, or crashed before finishing)."""
    out = []
    for run in run_names(data_root):
        rows = [
            {
                "stage": rec.stage,
                "round": rec.round,
                "status": "complete" if rec.complete else "missing",
                "rows": rec.entry.get("rows"),
                "fingerprint": rec.entry["fingerprint"],
            }
            for rec in recorded_stages(data_root, run)
        ]
        rows += [
            {
                "stage": stage,
                "round": None,
                "status": f"incomplete ({n} shards)",
                "rows": None,
                "fingerprint": fp,
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
    return "\n".join(lines)
