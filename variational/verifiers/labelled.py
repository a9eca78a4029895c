"""Developer tools: plain math-verify, our strict grader and the official one against the labelled pairs of
shared/data (CLI `variational verifier-report --grader strict|official|both`), and the code checker on the shipped APPS rows' reference solutions
(`code_verifier_report`). Not part of any stage, so no fingerprint reads them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from variational import templates
from variational.registry import GRADERS
from variational.verifiers import apps_check
from variational.verifiers.answers import check_answers
from variational.verifiers.math_rules import OURS, PLAIN, RULES, MathPool
from variational.verifiers.official_math import OfficialMathPool
from variational.verifiers.procpool import cpu_count

LABELLED_SETS = {  # shared/data SOURCES.md §2-§3
    "math_verify": "verify_pairs_math_verify_tests.jsonl",  # math-verify's own unit-test expectations
    "hendrycks_is_equiv": "verify_pairs_hendrycks_is_equiv_tests.jsonl",  # MATH's string is_equiv tests
    # SkyThought's Qwen2.5-Math eval grader verdicts (the official grader's ancestor, not the same code)
    "longcot_skyt1": "longcot_skyt1_format_model_outputs.jsonl",
}
VERIFIERS = {"plain": PLAIN, "ours": OURS}  # plain: math_verify.verify(parse(gold), parse(pred)), defaults


def load_pairs(path: Path) -> pl.DataFrame:
    """A verify_pairs_*.jsonl file -> id, text (the prediction), gold (list of one), label, verifier_config."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pl.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "text": [r["prediction"] for r in rows],
            "gold": [[r["gold"]] for r in rows],
            "label": [bool(r["label"]) for r in rows],
            "verifier_config": [json.dumps(r.get("verifier_config") or {}, sort_keys=True) for r in rows],
        },
        schema_overrides={"gold": pl.List(pl.String)},
    )


def load_longcot(path: Path) -> pl.DataFrame:
    """longcot_skyt1_format_model_outputs.jsonl -> the load_pairs columns; text is the whole Sky-T1 completion
    (thought and solution, as prior_verdicts reads them) and label the SkyThought grader's verdict."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    begin = templates.BEGIN_THOUGHT + templates.SEP
    return pl.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "text": [begin + templates.pi_response(r["think"], r["solution"]) for r in rows],
            "gold": [[r["answer"]] for r in rows],
            "label": [bool(r["correct"]) for r in rows],
            "verifier_config": ["{}"] * len(rows),
        },
        schema_overrides={"gold": pl.List(pl.String)},
    )


def load_labelled(data_dir: Path, sets: Iterable[str] = tuple(LABELLED_SETS)) -> pl.DataFrame:
    """The labelled sets of shared/data, concatenated with a `set` column."""
    if unknown := [s for s in sets if s not in LABELLED_SETS]:
        raise ValueError(f"verifier_report: unknown sets {unknown}; choose from {list(LABELLED_SETS)}")
    paths = {name: Path(data_dir) / LABELLED_SETS[name] for name in sets}
    if missing := [str(p) for p in paths.values() if not p.exists()]:
        raise FileNotFoundError(f"verifier_report: {missing} not found; pass --data-dir (shared/data)")
    load = {name: load_longcot if name == "longcot_skyt1" else load_pairs for name in paths}
    return pl.concat([load[name](p).with_columns(pl.lit(name).alias("set")) for name, p in paths.items()])


def verifier_report(
    data_dir: Path,
    timeout_s: float = 5.0,
    *,
    sets: Iterable[str] = tuple(LABELLED_SETS),
    ablate: bool = False,
    pool: MathPool | None = None,
    grader: str = "strict",
    official_pool: OfficialMathPool | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The graders `grader` names on the labelled sets -> (agreement per set and verifier, the rows where
    a verifier disagrees with the label). "strict": plain math-verify and ours (and, with `ablate`, ours
    without each rule); "official": the official harness's grader (golds read as bare answers); "both".

    The math_verify pairs carry the per-row `verifier_config` their unit test used (match types, float
    precision, strict, set-relation comparison); the strict verifiers run ONE config for all rows."""
    if grader not in REPORT_GRADERS:
        raise ValueError(f"verifier_report: unknown grader {grader!r}; choose from {list(REPORT_GRADERS)}")
    pairs = load_labelled(data_dir, sets)
    checked, stats = {}, []
    if grader in ("strict", "both"):
        variants = dict(VERIFIERS)
        if ablate:
            variants |= {f"without {rule}": OURS.without(rule) for rule in RULES}
        with _pool(pool, MathPool, pairs.height) as strict_pool:
            for name, rules in variants.items():
                checked[name] = _checked(pairs, stats, name, timeout_s, pool=strict_pool, rules=rules)
    if grader in ("official", "both"):
        with _pool(official_pool, OfficialMathPool, pairs.height) as pool_:
            checked["official"] = _checked(pairs, stats, "official", timeout_s, pool=pool_, grader="official")
    return pl.concat(stats), _disagreements(pairs, checked)


REPORT_GRADERS = (*GRADERS, "both")
MAIN_VERIFIERS = ("plain", "ours", "official")  # the ablated variants only show in the agreement table


@contextlib.contextmanager
def _pool(pool: Any, pool_type: type, n: int) -> Iterator[Any]:
    """The caller's pool, or one of ours closed at the end."""
    if pool is not None:
        yield pool
        return
    with pool_type(min(cpu_count(), max(1, n))) as own:
        yield own


def _checked(pairs: pl.DataFrame, stats: list, name: str, timeout_s: float, **kwargs: Any) -> pl.DataFrame:
    t0 = time.perf_counter()
    out = check_answers(pairs, timeout_s, **kwargs)
    out = out.with_columns((pl.col("correct") == pl.col("label")).alias("agree"))
    stats.append(_agreement(out, name, time.perf_counter() - t0))
    return out


def _disagreements(pairs: pl.DataFrame, checked: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """set, id, label, gold, text, verifier_config + per main verifier v: v (its verdict), v_status,
    v_extracted; the rows where any of them disagrees with the label."""
    shown = [v for v in MAIN_VERIFIERS if v in checked]
    frame = pairs.select("set", "id", "label", "gold", "text", "verifier_config").with_columns(
        col for v in shown for col in (
            checked[v]["correct"].alias(v),
            checked[v]["status"].alias(f"{v}_status"),
            checked[v]["extracted"].alias(f"{v}_extracted"),
        )
    )  # fmt: skip
    return frame.filter(pl.any_horizontal(pl.col(v) != pl.col("label") for v in shown))


def _agreement(checked: pl.DataFrame, verifier: str, wall_s: float) -> pl.DataFrame:
    return (
        checked.group_by("set", maintain_order=True)
        .agg(
            pl.len().alias("pairs"),
            pl.col("agree").sum().alias("agree"),
            pl.col("agree").mean().alias("agreement"),
            (pl.col("correct") & ~pl.col("label")).sum().alias("false_accept"),
            (~pl.col("correct") & pl.col("label")).sum().alias("false_reject"),
            pl.col("status").is_in(["timeout", "error"]).sum().alias("timeout_or_error"),
        )
        .select(pl.lit(verifier).alias("verifier"), pl.all(), pl.lit(round(wall_s, 2)).alias("wall_s"))
    )


def format_verifier_report(agreement: pl.DataFrame, disagreements: pl.DataFrame) -> str:
    """The two frames as plain text for the CLI: per set, each main verifier's agreement with the labels."""
    by = {(r["set"], r["verifier"]): r for r in agreement.iter_rows(named=True)}
    sets = list(dict.fromkeys(agreement["set"]))
    walls = dict(agreement.select("verifier", "wall_s").unique(maintain_order=True).iter_rows())
    shown = [v for v in MAIN_VERIFIERS if v in walls]
    names = {"plain": "plain math-verify", "ours": "strict (ours)", "official": "official"}

    def cell(r: dict) -> str:
        return f"{r['agree']}/{r['pairs']} = {r['agreement']:.3f}"

    lines = [
        "agreement with the labelled pairs (strict verifiers: one math-verify config for all rows):",
        f"  {'set':<20} " + "".join(f"{names[v]:<22}" for v in shown) + "false accept / false reject / timeout+error",
    ]  # fmt: skip
    for s in sets:
        errs = " | ".join(
            f"{v}: {by[s, v]['false_accept']} / {by[s, v]['false_reject']} / {by[s, v]['timeout_or_error']}"
            for v in shown
        )
        lines.append(f"  {s:<20} " + "".join(f"{cell(by[s, v]):<22}" for v in shown) + errs)
    lines.append("  (" + ", ".join(f"{walls[v]} s {v}" for v in shown) + ", worker start included)")
    if ablated := [v for v in walls if v not in MAIN_VERIFIERS]:
        lines.append("\nours with one rule off (agreement, change against ours):")
        for v in ablated:
            diffs = {s: by[s, v]["agree"] - by[s, "ours"]["agree"] for s in sets}
            cells = [f"{s} {by[s, v]['agree']} ({diffs[s]:+d})" for s in sets]
            lines.append(f"  {v:<26} " + "   ".join(cells))
    lines.append(f"\n{disagreements.height} rows where {' or '.join(shown)} disagree with the label:")
    for r in disagreements.iter_rows(named=True):
        text = r["text"] if len(r["text"]) <= 80 else "..." + r["text"][-77:]
        verdicts = " ".join(f"{v}={r[v]} ({r[f'{v}_status']}, {r[f'{v}_extracted']!r})" for v in shown)
        lines.append(
            f"  [{r['set']}] {r['id']}: label={r['label']} {verdicts} gold={r['gold'][0]!r} pred={text!r} "
            f"config={r['verifier_config']}"
        )
    return "\n".join(lines)


# ================================================================ code: the shipped APPS rows' reference solutions
def code_verifier_report(data_dir: Path, timeout_s: float = 4.0) -> str:
    """Judge each shipped APPS row's reference solutions (apps_taco_problems.jsonl) -> a plain-text table:
    how many the checker accepts, with and without the official quirks."""
    path = Path(data_dir) / "apps_taco_problems.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"code_verifier_report: {path} not found; pass the shared/data folder")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["reference solutions accepted (ours | official quirks):"]
    agree = total = 0
    for row in rows:
        verdicts = []
        for sol in row["solutions"]:
            text = f"```python\n{sol}\n```"
            ours = apps_check.judge(text, row["input_output"], timeout_s)
            official = apps_check.judge(text, row["input_output"], timeout_s, official_quirks=True)
            verdicts.append((ours.correct, official.correct, ours.status))
        agree += sum(v[0] for v in verdicts)
        total += len(verdicts)
        marks = " ".join(f"{'P' if o else 'F'}/{'P' if q else 'F'}({s})" for o, q, s in verdicts)
        lines.append(f"  {row['id']:<16} {row['test_type']:<5} {row['n_tests']:>2} tests  {marks}")
    lines.append(f"ours: {agree}/{total} reference solutions pass")
    return "\n".join(lines)
