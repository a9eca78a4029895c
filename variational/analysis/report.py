"""The run report: a run's tables -> <data_root>/<run>/report/report.md + PNG plots (+ a Prefect artifact);
`--out DIR` elsewhere; $VARIATIONAL_HOME/reports/<run> on a read-only root; uploaded to <run>/report/ on
object storage (`report_folder`).

In:  the stage tables of one run (problems, posterior_samples, verdicts, weights, train, eval), opened
     through variational.analysis.sql (one DuckDB view per table); a table with a `round` column is read at its
     latest round.
Out: report.md with, per section, a plot and its key numbers as a markdown table:
     importance weights (rho_tilde per question, effective sample size 1/sum rho_tilde^2), rollout accuracy by
     source, think lengths (q_phi samples vs reference traces, in characters), hint leakage, selection
     origins (-2 / -1 / k), the eval summary (strict and official avg@k side by side, the paper's numbers
     next to the official columns) and the benchmark overlaps of the training rows (contamination).
     A table that is missing gives a line saying so.
Plots use matplotlib's object API (Figure + Agg canvas), so no pyplot global state and no display needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from variational.analysis import throughput
from variational.analysis.figures import COLORS, md_table, save_plot
from variational.analysis.metrics import MODELS, VERDICT_COLUMNS, summarize, summary_markdown
from variational.analysis.sql import connect, unreadable_stages
from variational.pipeline.orchestration import publish_markdown
from variational.pipeline.records import check_name
from variational.pipeline.runs import run_folder
from variational.pipeline.storage import absolute_root, home, open_root
from variational.verifiers.answers import unsandboxed_warning

# Columns each section needs; reading only these keeps logps / rollout texts out of memory.
COLUMNS: dict[str, list[str]] = {
    "problems": ["prompt_idx", "source", "think_ref", "gold"],
    "posterior_samples": ["prompt_idx", "sample_idx", "think", "think_len", "format_ok"],
    "verdicts": ["prompt_idx", "sample_idx", "rollout_idx", "correct", "status", "verifier"],
    "weights": ["prompt_idx", "sample_idx", "estimator", "eligible", "rho_tilde", "selected"],
    "train": ["origin", "weight", "prompt_idx"],
    "eval": [
        "model",
        "benchmark",
        "problem_id",
        "sample",
        "correct",
        "status",
        "correct_official",
        "status_official",
    ],
    "contamination": ["prompt_idx", "benchmark", "problem_id", "field", "n", "overlap", "ngram"],
    "clean_problems": ["prompt_idx"],
}


# ---------------------------------------------------------------- reading


class Tables(dict[str, pl.DataFrame]):
    """table -> frame, plus `unreadable`: table -> why its stage could not be read (damaged or unsafe), so a
    section's missing-table note names the cause instead of "did not run"."""

    def __init__(self, unreadable: dict[str, str] | None = None):
        super().__init__()
        self.unreadable = unreadable or {}


def load_tables(con: duckdb.DuckDBPyConnection) -> Tables:
    """table -> frame with the COLUMNS it has, latest round only (the views union all rounds);
    tables the run lacks are absent from the dict (`unreadable` says which of them are damaged)."""
    out = Tables(unreadable_stages(con))
    for table, cols in COLUMNS.items():
        try:
            have = [r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall()]
        except duckdb.CatalogException:  # no such view: the stage did not run
            continue
        sel = ", ".join(f'"{c}"' for c in [*cols, "round"] if c in have)
        if not any(c in have for c in cols):  # not the table the report knows (another recipe's stage)
            continue
        latest = f' WHERE "round" = (SELECT max("round") FROM "{table}")' if "round" in have else ""
        out[table] = con.sql(f'SELECT {sel} FROM "{table}"{latest}').pl()
    return out


# ---------------------------------------------------------------- small helpers


def source_group(col: str = "source") -> pl.Expr:
    """`numina/123` -> `numina` (method.md §5 source format); missing -> unknown."""
    return pl.col(col).fill_null("unknown").str.split("/").list.first().alias("source")


def _missing(
    t: dict[str, pl.DataFrame], table: str, why: str = "the stage did not run or is disabled"
) -> str:
    if table in getattr(t, "unreadable", {}):
        why = f"its stage is {t.unreadable[table]}"  # type: ignore[attr-defined]
    return f"_No `{table}` table in this run ({why})._\n"


# ---------------------------------------------------------------- sections


def weight_stats(weights: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(per estimator: questions, with_eligible, mean/median ESS, mean max ρ̃, selected; per question: ess,
    max_rho, n; the eligible traces) of one round of `weights` (the report and the export cards show it)."""
    w = weights.filter(pl.col("eligible") & pl.col("rho_tilde").is_not_null()).cast({"rho_tilde": pl.Float64})
    per_q = w.group_by("estimator", "prompt_idx").agg(
        ess=1.0 / (pl.col("rho_tilde") ** 2).sum(), max_rho=pl.col("rho_tilde").max(), n=pl.len()
    )
    all_q = weights.group_by("estimator").agg(questions=pl.col("prompt_idx").n_unique())
    stats = (
        all_q.join(
            per_q.group_by("estimator").agg(
                with_eligible=pl.len(),
                mean_ess=pl.col("ess").mean(),
                median_ess=pl.col("ess").median(),
                mean_max_rho_tilde=pl.col("max_rho").mean(),
            ),
            on="estimator",
            how="left",
        )
        .join(
            weights.group_by("estimator").agg(selected=pl.col("selected").sum()),
            on="estimator",
            how="left",
        )
        .sort("estimator")
    )
    return stats, per_q, w


def section_weights(t: dict[str, pl.DataFrame], out: Path) -> str:
    if "weights" not in t:
        return _missing(t, "weights")
    stats, per_q, w = weight_stats(t["weights"])
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    k_max = int(t["weights"]["sample_idx"].max() or 0) + 1
    ests = stats["estimator"].to_list()
    rho = [w.filter(pl.col("estimator") == e)["rho_tilde"].to_numpy() for e in ests]
    ess = [per_q.filter(pl.col("estimator") == e)["ess"].to_numpy() for e in ests]
    colors = [COLORS[i % len(COLORS)] for i in range(len(ests))]
    # filled side-by-side bars (one series per estimator); ESS in half-trace bins from 1 to K
    ax1.hist(rho, bins=20, range=(0, 1), color=colors, label=ests)
    ax2.hist(ess, bins=max(2 * (k_max - 1), 1), range=(1, max(k_max, 2)), color=colors, label=ests)
    ax1.set(
        title="Normalised importance weight ρ̃ (eligible traces)", xlabel="ρ̃ (fraction of the question's mass)"
    )
    ax1.set_ylabel("traces (count)")
    ax2.set(title="Effective sample size per question", xlabel="ESS = 1 / Σ ρ̃²  (traces, 1..K)")
    ax2.set_ylabel("questions (count)")
    for ax in (ax1, ax2):
        ax.legend(title="estimator")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    img = save_plot(fig, out / "rho_tilde.png")
    return (
        f"{img}\nESS = 1/Σρ̃² over a question's eligible traces: 1 means one trace carries all the weight, "
        f"K={k_max} means uniform weights.\n\n{md_table(stats)}"
    )


def section_accuracy(t: dict[str, pl.DataFrame], out: Path) -> str:
    if "verdicts" not in t:
        return _missing(t, "verdicts")
    v = t["verdicts"]
    if "problems" in t:
        v = v.join(
            t["problems"].select("prompt_idx", source_group()), on="prompt_idx", how="left"
        ).with_columns(
            pl.col("source").fill_null("unknown")  # a verdict of a prompt not in `problems`
        )
    else:
        v = v.with_columns(source=pl.lit("unknown"))
    per_trace = v.group_by("source", "prompt_idx", "sample_idx").agg(
        acc=pl.col("correct").cast(pl.Float64).mean()
    )
    stats = (
        v.group_by("source")
        .agg(rollouts=pl.len(), accuracy=pl.col("correct").cast(pl.Float64).mean())
        .join(
            per_trace.group_by("source").agg(
                traces=pl.len(), traces_with_a_correct_rollout=(pl.col("acc") > 0).mean()
            ),
            on="source",
        )
        .sort("source")
    )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    bars = ax.bar(stats["source"].to_list(), (100 * stats["accuracy"]).to_list(), color=COLORS[0])
    ax.bar_label(bars, labels=[f"n={n}" for n in stats["rollouts"]], padding=2)
    ax.set(
        title="π_θ0 answer-rollout accuracy by source (n = rollouts)",
        xlabel="problem source",
        ylabel="accuracy (%)",
    )
    ax.set_ylim(0, 105)
    return f"{unsandboxed_warning(t['verdicts'])}{save_plot(fig, out / 'rollout_accuracy.png')}\n{md_table(stats)}"


def _think_chars(t: dict[str, pl.DataFrame]) -> pl.DataFrame:
    parts = []
    if "posterior_samples" in t:
        parts.append(
            t["posterior_samples"].select(who=pl.lit("q_φ samples"), chars=pl.col("think").str.len_chars())
        )
    if "problems" in t:
        parts.append(
            t["problems"].select(who=pl.lit("reference traces"), chars=pl.col("think_ref").str.len_chars())
        )
    return pl.concat(parts).drop_nulls() if parts else pl.DataFrame()


def section_think_length(t: dict[str, pl.DataFrame], out: Path) -> str:
    lengths = _think_chars(t)
    if lengths.is_empty():
        return _missing(t, "posterior_samples")
    stats = (
        lengths.group_by("who")
        .agg(
            n=pl.len(),
            median_chars=pl.col("chars").median(),
            mean_chars=pl.col("chars").mean(),
            p90_chars=pl.col("chars").quantile(0.9),
        )
        .sort("who")
    )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    lo = math.log10(max(1, int(lengths["chars"].min())))
    hi = max(lo + 1, math.log10(max(1, int(lengths["chars"].max()))))
    bins = [10 ** (lo + i * (hi - lo) / 30) for i in range(31)]
    for i, (who,) in enumerate(stats.select("who").iter_rows()):
        x = lengths.filter(pl.col("who") == who)["chars"].to_numpy().clip(1)
        # share of each series, so K samples per question and one reference per question compare
        ax.hist(
            x, bins=bins, weights=[100 / len(x)] * len(x), histtype="step", lw=2, color=COLORS[i], label=who
        )
    ax.set_xscale("log")
    ax.set(title="Think length", xlabel="think length (characters, log scale)", ylabel="share of traces (%)")
    ax.legend()
    tokens = ""
    if "posterior_samples" in t and "think_len" in t["posterior_samples"].columns:
        tl = t["posterior_samples"]["think_len"]
        tokens = f"\nq_φ think length in tokens: median {tl.median():.0f}, max {tl.max()}.\n"
    note = "Both series in characters (reference traces have no token counts in `problems`).\n\n"
    return f"{save_plot(fig, out / 'think_length.png')}\n{note}{md_table(stats, '{:.0f}')}{tokens}"


def leak_flags(thinks: pl.DataFrame, think_col: str) -> pl.DataFrame:
    """Per row (prompt_idx, ..., gold): leaked = a gold answer string occurs in the first quarter of the think.

    Literal substring test; a one-character gold such as "2" matches often, which is why the reference
    traces (no hint) are reported beside the q_φ samples as the baseline of chance matches."""
    base = thinks.with_row_index("_row").with_columns(
        head=pl.col(think_col).str.slice(0, pl.col(think_col).str.len_chars() // 4)
    )
    hits = (
        base.select("_row", "head", "gold")
        .explode("gold")  # drops rows whose gold list is empty: the left join below brings them back
        .with_columns(g=pl.col("gold").str.strip_chars())
        .with_columns(
            hit=(pl.col("g").str.len_chars() > 0) & pl.col("head").str.contains(pl.col("g"), literal=True)
        )
        .group_by("_row")
        .agg(leaked=pl.col("hit").fill_null(False).any())
    )
    return (
        base.select("_row", "source")
        .join(hits, on="_row", how="left")
        .with_columns(pl.col("leaked").fill_null(False))
        .sort("_row")
    )


def section_leakage(t: dict[str, pl.DataFrame], out: Path) -> str:
    if "posterior_samples" not in t or "problems" not in t:
        return _missing(t, "posterior_samples" if "problems" in t else "problems")
    probs = t["problems"].select("prompt_idx", source_group(), "gold", "think_ref")
    samples = (
        t["posterior_samples"]
        .select("prompt_idx", "think")
        .join(probs, on="prompt_idx", how="left")
        .with_columns(pl.col("source").fill_null("unknown"))
    )
    q = leak_flags(
        samples.with_columns(pl.col("gold").fill_null(pl.lit([], dtype=pl.List(pl.String)))), "think"
    ).with_columns(who=pl.lit("q_φ samples"))
    ref = leak_flags(probs, "think_ref").with_columns(who=pl.lit("reference traces"))
    stats = (
        pl.concat([q, ref])
        .group_by("who", "source")
        .agg(traces=pl.len(), leak_rate=pl.col("leaked").cast(pl.Float64).mean())
        .sort("source", "who")
    )
    overall = (
        pl.concat([q, ref]).group_by("who").agg(rate=pl.col("leaked").cast(pl.Float64).mean()).sort("who")
    )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    sources = stats["source"].unique(maintain_order=True).to_list()
    width = 0.38
    for i, who in enumerate(("q_φ samples", "reference traces")):
        rates = {
            r["source"]: r["leak_rate"] for r in stats.filter(pl.col("who") == who).iter_rows(named=True)
        }
        xs = [j + (i - 0.5) * width for j in range(len(sources))]
        ax.bar(xs, [100 * rates.get(s, 0.0) for s in sources], width, color=COLORS[i], label=who)
    ax.set_xticks(range(len(sources)), sources)
    ax.set(title="Hint leakage: gold answer in the first quarter of the think", xlabel="problem source")
    ax.set_ylabel("traces with a leaked answer (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    lines = "".join(f"- {r['who']}: **{100 * r['rate']:.1f}%**\n" for r in overall.iter_rows(named=True))
    return f"{save_plot(fig, out / 'hint_leakage.png')}\n{lines}\n{md_table(stats)}"


def origin_label(origin: int) -> str:
    return {-2: "-2 original", -1: "-1 fallback"}.get(origin, f"k={origin}")


def section_selection(t: dict[str, pl.DataFrame], out: Path) -> str:
    if "train" not in t:
        return _missing(t, "train")
    counts = (
        t["train"]
        .group_by("origin")
        .agg(rows=pl.len(), weight_sum=pl.col("weight").sum())
        .sort("origin")
        .with_columns(share=pl.col("rows") / pl.col("rows").sum())
    )
    labels = [origin_label(o) for o in counts["origin"]]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colors = [COLORS[3] if o == -2 else COLORS[1] if o == -1 else COLORS[0] for o in counts["origin"]]
    ticks = [lbl.replace(" ", "\n") for lbl in labels]  # two-line ticks so K+2 bars stay legible
    bars = ax.bar(ticks, counts["rows"].to_list(), color=colors)
    ax.bar_label(bars, padding=2)
    ax.set(
        title="Training rows by origin", xlabel="origin (-2 original trace, -1 fallback, k = chosen sample)"
    )
    ax.set_ylabel("rows (count)")
    table = counts.with_columns(origin=pl.Series(labels))
    return f"{save_plot(fig, out / 'selection_origins.png')}\n{md_table(table)}"


def section_eval(t: dict[str, pl.DataFrame], out: Path) -> str:
    if "eval" not in t:
        return _missing(t, "eval", "evaluation disabled or not run")
    summary = summarize(t["eval"])
    if summary.is_empty():
        return "_The `eval` table is empty._\n"
    models = [m for m in MODELS if m in summary["model"].to_list()] + sorted(
        set(summary["model"].to_list()) - set(MODELS)
    )
    benches = summary["benchmark"].unique(maintain_order=True).to_list()
    graders = [g for g in VERDICT_COLUMNS if g in summary["grader"].to_list()]
    bars = [(m, g) for m in models for g in graders]
    fig = Figure(figsize=(max(6, 1.6 * len(benches) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(bars))
    for i, (m, g) in enumerate(bars):
        picked = summary.filter(pl.col("model") == m, pl.col("grader") == g)
        vals = {r["benchmark"]: r["avg_at_k"] for r in picked.iter_rows(named=True)}
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(benches))]
        ax.bar(
            xs,
            [100 * (vals.get(b) or 0.0) for b in benches],
            width,
            color=COLORS[models.index(m) % len(COLORS)],
            hatch="//" if g == "official" else None,  # official: hatched, next to the strict bar
            label=f"{m} {g}",
        )
    ax.set_xticks(range(len(benches)), benches)
    ax.set(title="Benchmark accuracy (avg@k): strict, official hatched", xlabel="benchmark")
    ax.set_ylabel("avg@k accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(title="model, grader", fontsize="small")
    return f"{save_plot(fig, out / 'eval_avg.png')}\n{summary_markdown(summary, models)}"


def section_contamination(t: dict[str, pl.DataFrame], out: Path) -> str:
    if "contamination" not in t:
        return _missing(t, "contamination", "data.decontaminate: off")
    found = t["contamination"]
    dropped = ""
    if "clean_problems" in t and "problems" in t:
        n = t["problems"].height - t["clean_problems"].height
        dropped = f"`data.decontaminate: drop` removed **{n}** of {t['problems'].height} problems.\n\n"
    if found.is_empty():
        return f"{dropped}No training question or reference solution overlaps a benchmark problem.\n"
    per = (
        found.group_by("benchmark")
        .agg(
            training_rows=pl.col("prompt_idx").n_unique(), pairs=pl.len(), max_overlap=pl.col("overlap").max()
        )
        .sort("training_rows", "benchmark", descending=[True, False])
    )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    bars = ax.bar(per["benchmark"].to_list(), per["training_rows"].to_list(), color=COLORS[3])
    ax.bar_label(bars, padding=2)
    ax.set(title="Training rows overlapping a benchmark problem", xlabel="benchmark")
    ax.set_ylabel("training rows (count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    top = found.sort("overlap", "prompt_idx", descending=[True, False]).head(10)
    top = top.with_columns(pl.col("ngram").str.slice(0, 60)).select(
        "prompt_idx", "benchmark", "problem_id", "field", "n", "overlap", "ngram"
    )
    rows = found["prompt_idx"].n_unique()
    return (
        f"{save_plot(fig, out / 'contamination.png')}\n{dropped}**{rows}** training rows hold enough of a benchmark "
        f"problem's word n-grams (data.decontamination.min_overlap; table `contamination`).\n\n{md_table(per)}\n"
        f"Largest overlaps:\n\n{md_table(top, '{:.2f}')}"
    )


SECTIONS: list[tuple[str, Callable[[dict[str, pl.DataFrame], Path], str]]] = [
    ("Importance weights ρ̃ and effective sample size", section_weights),
    ("Answer-rollout accuracy by source", section_accuracy),
    ("Think length: q_φ samples vs reference traces", section_think_length),
    ("Hint leakage", section_leakage),
    ("Selection origins", section_selection),
    ("Evaluation", section_eval),
    ("Decontamination", section_contamination),
]


def report_folder(data_root: str | Path, run: str, out_dir: str | Path | None = None) -> Path:
    """Where the report is rendered: `out_dir` if given, else <data_root>/<run>/report on a writable local
    root, else (a read-only mount; object storage, where it is uploaded after) $VARIATIONAL_HOME/reports/<run>."""
    if out_dir is not None:
        return Path(out_dir)
    root = open_root(data_root)
    if root.local and root.writable():
        return Path(run_folder(data_root, run)) / "report"
    return home() / "reports" / check_name(run, "run")


def write_report(data_root: str | Path, run: str, out_dir: str | Path | None = None) -> Path | str:
    """Write report.md and its PNGs into `report_folder` (on object storage, then upload them to
    <run>/report/); returns where report.md is: a path, or its URL."""
    con = connect(data_root, run)
    out = report_folder(data_root, run, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = load_tables(con)
    stages = con.sql("SELECT stage, table_name, round, status, rows, fingerprint FROM run_stages").pl()
    parts = [
        f"# Run report: {run}\n",
        f"Data root `{absolute_root(data_root)}`; plots are PNGs in `{out}`.\n",
    ]
    parts.append("## Stages\n\n" + md_table(stages))
    parts.append(f"## Throughput\n\n{throughput.section_throughput(throughput.summary(con), out)}")
    for title, fn in SECTIONS:
        parts.append(f"## {title}\n\n{fn(tables, out)}")
    path = out / "report.md"
    path.write_text("\n".join(parts))
    root = open_root(data_root)
    if out_dir is None and not root.local and root.writable():
        for f in sorted(out.iterdir()):
            root.put_file(f, f"{run}/report/{f.name}")
        return root.full(f"{run}/report/report.md")
    return path


def artifact_markdown(path: str | Path) -> tuple[str, str]:
    """report.md -> (artifact key, markdown for Prefect): tables inline, each image replaced by its file path
    (Prefect cannot render local files) and a note naming the image folder."""
    path = Path(path).resolve()
    md = path.read_text()
    text = re.sub(
        r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f"_plot `{m.group(1)}`: `{path.parent / m.group(2)}`_", md
    )
    text = f"> Plots are PNG files in `{path.parent}` (not rendered here).\n\n{text}"
    header = re.match(r"# Run report: (.+)", md)
    run = header.group(1).strip() if header else path.parent.parent.name
    return re.sub(r"[^a-z0-9-]+", "-", f"report-{run}".lower()).strip("-"), text


def write_and_publish(cfg: dict) -> str:
    """The flow's report step: write the run's report and publish it as a Prefect markdown artifact."""
    where = write_report(cfg["data_root"], cfg["name"])
    key, text = artifact_markdown(report_folder(cfg["data_root"], cfg["name"]) / "report.md")
    publish_markdown(key, text, "run report")
    return str(where)
