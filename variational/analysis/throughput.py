"""Where a run's time went: the per-stage summary of its shard stats, as a table and a plot (issue 21).

In:  a DuckDB connection over a run (variational/analysis/sql.py: the `shard_stats` view, one row per shard
     of every stage: tokens_in, tokens_out, seconds, engine_start_s, device, host, worker; written by the
     runner, variational/pipeline/shardstats.py). Out: `summary(con)`, one row per stage and round from the
     saved query sql/throughput.sql (shards, rows, tokens, seconds, engine starts, tokens/s over the time
     the engines worked, step time / peak memory / MFU of the fine-tunes, device), and the report section
     `section_throughput`: that table and `throughput.png` (wall seconds per stage, engine starts apart).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
from matplotlib.figure import Figure

from variational.analysis.figures import md_table
from variational.analysis.sql import SQL_DIR

QUERY = SQL_DIR / "throughput.sql"
COLUMNS = ["stage", "round", "shards", "rows_out", "tokens_in", "tokens_out", "seconds", "engine_starts"]
COLUMNS += ["engine_start_s", "tokens_per_s", "step_time_s", "peak_memory_gib", "mfu", "device"]


def summary(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """The per-stage summary (sql/throughput.sql) of the run behind `con`; empty when it has no stats."""
    return con.sql(QUERY.read_text()).pl()


def _label(row: dict) -> str:
    return row["stage"] + (f" [round {row['round']}]" if row["round"] != 1 else "")


def plot(stats: pl.DataFrame, path: Path) -> None:
    """Horizontal bars, one per stage in run order: engine start, then the work, in wall seconds; the work
    bar is labelled with its rate (tokens/s, or rows/s for stages without tokens)."""
    rows = list(stats.iter_rows(named=True))
    labels = [_label(r) for r in rows][::-1]
    start = [r["engine_start_s"] or 0.0 for r in rows][::-1]
    work = [max(0.0, (r["seconds"] or 0.0) - (r["engine_start_s"] or 0.0)) for r in rows][::-1]
    fig = Figure(figsize=(9.5, 0.45 * len(rows) + 1.5))
    ax = fig.subplots()
    ax.barh(labels, start, color="#C44E52", label="engine start")
    bars = ax.barh(labels, work, left=start, color="#4C72B0", label="work")
    rates = [
        f"{r['tokens_per_s']:,.0f} tok/s" if r["tokens_per_s"] else f"{r['rows_per_s'] or 0:,.1f} rows/s"
        for r in rows
    ][::-1]
    ax.bar_label(bars, labels=rates, padding=3, fontsize=8)
    ax.set(title="Wall time per stage (shard stats)", xlabel="seconds")
    ax.set_xlim(0, max((s + w for s, w in zip(start, work, strict=True)), default=1) * 1.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, over none of them
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def section_throughput(stats: pl.DataFrame, out: Path) -> str:
    """The report's section for `summary(con)`: the plot, the per-stage table and the totals."""
    if stats.is_empty():
        return "_No shard stats in this run (it was computed by a release before issue 21)._\n"
    plot(stats, out / "throughput.png")
    total, starts = stats["seconds"].sum(), stats["engine_start_s"].sum()
    devices = ", ".join(sorted({d for ds in stats["device"].drop_nulls() for d in ds.split(", ")}))
    return (
        f"![throughput](throughput.png)\n\nComputed stages: **{total:,.0f} s** of stage time, of which "
        f"{starts:,.0f} s opening {int(stats['engine_starts'].sum())} engines; device {devices}. Rates "
        "leave engine starts out; reused stages keep the stats of the run that computed them.\n\n"
        f"{md_table(stats.select(COLUMNS))}"
    )
