"""DuckDB over a run: one view per stage table, saved analyses from sql/, a listing of runs.

In: `<data_root>/<run>/run.json` (written by store.record_stage: stage -> round -> {fingerprint, path, rows})
and the Parquet shards it points at. Out: a DuckDB connection with a VIEW per stage table over all part files
of all rounds (union_by_name), plus `run_stages` (one row per stage and round: manifest rows, Parquet rows,
status); `run_sql` returns a polars frame. Views are lazy, so a table missing from a run only breaks the
queries that use it, and those fail with a message naming the stages the run has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from variational.store import run_stages

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# stage names that differ from the table they write (design.md: one view per table)
TABLE_OF = {
    "ingest": "problems",
    "sample_posterior": "posterior_samples",
    "score": "logps",
    "answer_rollouts": "rollouts",
    "verify": "verdicts",
    "select": "train",
    "evaluate": "eval",
    "sample_prior": "prior_samples",  # forward_kl rounds (Eq.9)
    "verify_prior": "prior_verdicts",
}
META_VIEW = "run_stages"


def _stage_dir(data_root: Path, run: str, stage: str, entry: dict) -> Path:
    """The folder of a recorded stage; falls back to data_root/run/stage/fp when the data root moved."""
    path = Path(entry["path"])
    return path if path.exists() else data_root / run / stage / entry["fingerprint"]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _files_sql(files: list[Path]) -> str:
    return "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"


def connect(data_root: str | Path, run: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per stage table of `run` and the `run_stages` overview."""
    data_root = Path(data_root)
    stages = run_stages(data_root, run)
    con = duckdb.connect()
    meta: list[dict[str, Any]] = []
    for stage, rounds in sorted(stages.items()):
        parts = []
        for round_, entry in sorted(rounds.items(), key=lambda kv: int(kv[0])):
            folder = _stage_dir(data_root, run, stage, entry)
            files = sorted(folder.glob("part-*.parquet"))
            status = "complete" if (folder / "manifest.json").exists() else "missing"
            parquet_rows = None
            if files:
                scan = f"read_parquet({_files_sql(files)}, union_by_name=true)"
                parquet_rows = con.execute(f"SELECT count(*) FROM {scan}").fetchall()[0][0]
                parts.append((int(round_), scan))
            meta.append(
                {
                    "stage": stage,
                    "table_name": TABLE_OF.get(stage, stage) if files else None,
                    "round": int(round_),
                    "status": status,
                    "rows": entry.get("rows"),
                    "parquet_rows": parquet_rows,
                    "shards": len(files),
                    "fingerprint": entry["fingerprint"],
                    "wall_time_s": entry.get("wall_time_s"),
                    "path": str(folder),
                }
            )
        if parts:
            con.execute(f"CREATE VIEW {_quote(TABLE_OF.get(stage, stage))} AS {_union_rounds(con, parts)}")
    con.register(META_VIEW, pl.DataFrame(meta, schema=_META_SCHEMA))
    return con


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


def run_sql(data_root: str | Path, run: str, query: str) -> pl.DataFrame:
    """Run SQL (text, .sql file or saved query name) over a run's views; the last statement's result."""
    con = connect(data_root, run)
    try:
        rel = con.sql(resolve_query(query))  # runs every statement; the result is the last one's
        return pl.DataFrame() if rel is None else rel.pl()
    except duckdb.CatalogException as err:
        views = con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        tables = sorted({r[0] for r in views} | {META_VIEW})
        raise ValueError(
            f"{err}\nrun {run!r} has the tables {tables}; a missing table means its stage has not run yet"
        ) from None
    finally:
        con.close()


def list_runs(data_root: str | Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(run, [{stage, round, status, rows, fingerprint}]) for every run under data_root.

    status: complete (manifest present), missing (recorded but its folder is gone), or incomplete (a stage
    folder without manifest that run.json does not point at: running now, or crashed before finishing)."""
    data_root = Path(data_root)
    out = []
    for run_dir in sorted(p for p in data_root.glob("*") if (p / "run.json").is_file()):
        run = run_dir.name
        stages = json.loads((run_dir / "run.json").read_text()).get("stages", {})
        rows, recorded = [], set()
        for stage, rounds in sorted(stages.items()):
            for round_, entry in sorted(rounds.items(), key=lambda kv: int(kv[0])):
                folder = _stage_dir(data_root, run, stage, entry)
                recorded.add(folder.resolve())
                status = "complete" if (folder / "manifest.json").exists() else "missing"
                rows.append(
                    {
                        "stage": stage,
                        "round": int(round_),
                        "status": status,
                        "rows": entry.get("rows"),
                        "fingerprint": entry["fingerprint"],
                    }
                )
        for folder in sorted(run_dir.glob("*/*")):
            if not folder.is_dir() or folder.resolve() in recorded or (folder / "manifest.json").exists():
                continue
            shards = len(list(folder.glob("part-*.parquet")))
            rows.append(
                {
                    "stage": folder.parent.name,
                    "round": None,
                    "status": f"incomplete ({shards} shards)",
                    "rows": None,
                    "fingerprint": folder.name,
                }
            )
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
