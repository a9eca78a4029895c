"""What the report's sections are drawn with: its colours, markdown tables and PNG plots (matplotlib's
object API: a Figure on the Agg canvas, no pyplot state, no display)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


def md_table(df: pl.DataFrame, floats: str = "{:.3f}") -> str:
    def cell(v: object) -> str:
        if v is None:
            return "—"
        return floats.format(v) if isinstance(v, float) else str(v)

    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * df.width + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.iter_rows())


def save_plot(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"![{path.stem}]({path.name})\n"
