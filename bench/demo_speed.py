"""Two finished runs side by side from their shard stats (issue 21 §6): per stage, wall seconds, engine
starts and throughput, then the totals. How the tiny demo's before/after numbers in bench/RESULTS.md were
made:

    python bench/demo_speed.py BEFORE_ROOT AFTER_ROOT [--run tiny]

Each root is a data root holding a finished run with shard stats (variational/pipeline/shardstats.py); the
stage order is the first run's. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from variational.analysis import throughput  # noqa: E402
from variational.analysis.sql import connect  # noqa: E402


def stats(root: str, run: str) -> pl.DataFrame:
    return throughput.summary(connect(root, run))


def table(before: pl.DataFrame, after: pl.DataFrame) -> str:
    keys = ["stage", "round"]
    cols = ["seconds", "engine_starts", "engine_start_s", "tokens_out", "tokens_per_s"]
    both = before.select(keys + cols).join(
        after.select(keys + cols), on=keys, how="full", suffix="_after", maintain_order="left_right"
    )
    lines = [
        "| stage | seconds before | after | engine starts before | after | start s before | after "
        "| tokens/s before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(v: object) -> str:
        return "—" if v is None else f"{v:,.1f}" if isinstance(v, float) else str(v)

    for r in both.iter_rows(named=True):
        name = r["stage"] or r["stage_after"]
        values = [cell(r[c]) + " | " + cell(r[f"{c}_after"]) for c in cols if c != "tokens_out"]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    total = [before["seconds"].sum(), after["seconds"].sum()]
    starts = [before["engine_starts"].sum(), after["engine_starts"].sum()]
    lines.append(
        f"| **total** | **{total[0]:,.0f}** | **{total[1]:,.0f}** | {starts[0]} | {starts[1]} | | | | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--run", default="tiny")
    args = parser.parse_args(argv)
    print(table(stats(args.before, args.run), stats(args.after, args.run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
