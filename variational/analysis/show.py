"""`variational show RUN PROMPT_IDX`: one question end to end, from its problem row to its rows in `train`.

In:  one prompt_idx and one round of a run's tables (problems, posterior_samples, logps, rollouts, verdicts,
     weights, train; contamination when the run has it), read through the run's DuckDB views
     (variational/analysis/sql.py, which reads the shards the manifests list), only that prompt's rows.
Out: `question_view` (pure: the frames -> the dict `show --json` prints) and `format_view` (text, no line
     over 100 characters): the question, its gold answers or tests, each of the K traces (the start of its
     think, per-token mean log π_θ0 and log q_φ of the think, Δ, eligible or why not, log ρ, ρ̃, accuracy),
     each trace's M rollouts with verdict and status, and which rows of `train` the question became.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from variational.analysis.sql import connect
from variational.pipeline.runs import run_json

WIDTH = 100
THINK_CHARS = 240  # how much of a think the view keeps
# table -> the columns the view needs (those a run's table has are read; a missing table is skipped)
COLUMNS: dict[str, list[str]] = {
    "problems": ["prompt_idx", "source", "kind", "question", "gold", "tests"],
    "posterior_samples": ["prompt_idx", "sample_idx", "round", "think", "think_len", "format_ok", "finish_reason"],
    "logps": ["prompt_idx", "sample_idx", "round", "model", "span", "logp_mean", "n_tokens"],
    "rollouts": ["prompt_idx", "sample_idx", "rollout_idx", "round", "n_tokens", "finish_reason"],
    "verdicts": ["prompt_idx", "sample_idx", "rollout_idx", "round", "extracted", "correct", "status"],
    "weights": [
        "prompt_idx", "sample_idx", "round", "estimator", "source", "think_len", "log_ratio_mean",
        "accuracy", "answer_logp_mean", "eligible", "log_rho", "rho_tilde", "selected",
    ],
    "train": ["row", "prompt_idx", "origin", "weight", "round"],
    "contamination": ["prompt_idx", "benchmark", "problem_id", "n", "overlap"],
}  # fmt: skip
ORIGINS = {-2: "original trace", -1: "original again (fallback: no trace selected)"}


class ShowError(ValueError):
    """A run or prompt_idx that `show` cannot display; the message is one line saying what to do."""


# ---------------------------------------------------------------- the pure join


def _number(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def why_not(trace: dict[str, Any], estimator: str | None, max_think_tokens: int | None) -> str | None:
    """Why a trace is not eligible (tasks/weights.py rules), or None when it is; a ruc trace that is eligible
    through Acc's GML fallback says so."""
    acc = trace.get("accuracy")
    if trace.get("eligible"):
        if estimator == "acc" and not (acc or 0) > 0:
            return "eligible through the ruc fallback to GML (no correct rollout)"
        return None
    if trace.get("format_ok") is False:
        return "the thought never closed: no rollouts"
    think_len = trace.get("think_len")
    if max_think_tokens is not None and think_len is not None and think_len >= max_think_tokens:
        return f"think_len {think_len} >= weights.max_think_tokens {max_think_tokens}"
    if estimator == "acc" and acc is None:
        return "no verified rollout"
    if estimator == "acc" and acc <= 0:
        return "no correct rollout (accuracy 0)"
    if trace.get("delta") is None:
        return "no log ratio: a model did not score the think"
    if estimator in ("gml", "likelihood") and trace.get("answer_logp_mean") is None:
        return "no answer log-prob under pi_theta0"
    return "log rho is not finite"


def _think_logps(logps: pl.DataFrame | None) -> dict[int, dict[str, float | None]]:
    """sample_idx -> {model: per-token mean log-prob of the think}."""
    out: dict[int, dict[str, float | None]] = {}
    if logps is None:
        return out
    for r in logps.filter(pl.col("span") == "think").iter_rows(named=True):
        out.setdefault(r["sample_idx"], {})[r["model"]] = _number(r["logp_mean"])
    return out


def _rollouts(rollouts: pl.DataFrame | None, verdicts: pl.DataFrame | None) -> dict[int, list[dict]]:
    """sample_idx -> its rollouts (rollout_idx order) with verdict and status."""
    keys = ["sample_idx", "rollout_idx"]
    frames = [f.drop("prompt_idx", "round", strict=False) for f in (rollouts, verdicts) if f is not None]
    if not frames:
        return {}
    joined = frames[0] if len(frames) == 1 else frames[0].join(frames[1], on=keys, how="full", coalesce=True)
    out: dict[int, list[dict]] = {}
    for r in joined.sort(keys).iter_rows(named=True):
        out.setdefault(r["sample_idx"], []).append(
            {
                k: r.get(k)
                for k in ("rollout_idx", "correct", "status", "extracted", "finish_reason", "n_tokens")
            }
        )
    return out


def _tests_summary(tests: str | None) -> dict[str, Any] | None:
    if not tests:
        return None
    try:
        io = json.loads(tests)
    except json.JSONDecodeError:
        return {"cases": None, "fn_name": None}
    return {"cases": len(io.get("inputs") or []), "fn_name": io.get("fn_name")}


def _trace(sample: dict, weight: dict, logp: dict, rollouts: list, train: list) -> dict:
    """One trace's row of the view; Δ from `weights` (over the common think length), else the two means."""
    pi, q = logp.get("pi_theta0"), logp.get("q_phi")
    delta = _number(weight.get("log_ratio_mean"))
    if delta is None and "log_ratio_mean" not in weight and pi is not None and q is not None:
        delta = pi - q
    think = sample.get("think") or ""
    return {
        "sample_idx": sample["sample_idx"],
        "think_start": think[:THINK_CHARS],
        "think_len": sample.get("think_len", weight.get("think_len")),
        "format_ok": sample.get("format_ok"),
        "finish_reason": sample.get("finish_reason"),
        "logp_pi_theta0": pi,
        "logp_q_phi": q,
        "delta": delta,
        "answer_logp_mean": _number(weight.get("answer_logp_mean")),
        "eligible": bool(weight.get("eligible")) if weight else None,
        "log_rho": _number(weight.get("log_rho")),
        "rho_tilde": _number(weight.get("rho_tilde")),
        "accuracy": _number(weight.get("accuracy")),
        "selected": bool(weight.get("selected")) if weight else False,
        "train": [t for t in train if t["origin"] == sample["sample_idx"]],
        "rollouts": rollouts,
    }


def _rows(frame: pl.DataFrame | None) -> list[dict]:
    return [] if frame is None else frame.to_dicts()


def question_view(
    frames: dict[str, pl.DataFrame], prompt_idx: int, round_: int, max_think_tokens: int | None = None
) -> dict[str, Any]:
    """One question's rows of each table (already filtered to prompt_idx and round; absent tables are
    skipped) -> the view: problem fields, traces by sample_idx, the train rows and any contamination."""
    problem = _rows(frames.get("problems"))
    if not problem:
        raise ShowError(f"prompt_idx {prompt_idx} is not in the problems table")
    p = problem[0]
    weights = {w["sample_idx"]: w for w in _rows(frames.get("weights"))}
    samples = {s["sample_idx"]: s for s in _rows(frames.get("posterior_samples"))}
    samples |= {k: {"sample_idx": k} for k in weights.keys() - samples.keys()}
    train = [
        {"row": t["row"], "origin": t["origin"], "weight": _number(t["weight"])}
        for t in sorted(_rows(frames.get("train")), key=lambda t: t["row"])
    ]
    logps, rollouts = (
        _think_logps(frames.get("logps")),
        _rollouts(frames.get("rollouts"), frames.get("verdicts")),
    )
    estimator = next(iter(weights.values()), {}).get("estimator")
    traces = []
    for k in sorted(samples):
        trace = _trace(samples[k], weights.get(k, {}), logps.get(k, {}), rollouts.get(k, []), train)
        trace["why_not"] = why_not(trace, estimator, max_think_tokens) if weights.get(k) else None
        traces.append(trace)
    selected = [t["sample_idx"] for t in traces if t["selected"]]
    return {
        "prompt_idx": prompt_idx,
        "round": round_,
        "source": p.get("source"),
        "kind": p.get("kind"),
        "question": p.get("question"),
        "gold": list(p.get("gold") or []),
        "tests": _tests_summary(p.get("tests")),
        "estimator": estimator,
        "selected": selected[0] if selected else None,
        "traces": traces,
        "train": train,
        "contamination": _rows(frames.get("contamination")),
    }


# ---------------------------------------------------------------- text


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _wrap(text: str, first: str = "  ", max_lines: int | None = None) -> list[str]:
    """`text` in lines of at most WIDTH characters, the first starting with `first`, the rest indented as far."""
    rest = " " * len(first)
    lines = textwrap.wrap(" ".join(text.split()), WIDTH, initial_indent=first, subsequent_indent=rest) or [
        first
    ]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: WIDTH - 1] + "…"
    return lines


def _train_line(view: dict[str, Any]) -> str:
    parts = []
    for t in view["train"]:
        what = ORIGINS.get(t["origin"], f"trace {t['origin']}")
        parts.append(f"row {t['row']} ({what}, weight {_f(t['weight'], '.3g')})")
    return "in train: " + (
        ", ".join(parts) if parts else "no rows (the train stage has not run, or dropped it)"
    )


def _trace_table(traces: list[dict]) -> list[str]:
    head = f"{'trace':>5} {'think':>6} {'log_pi0':>8} {'log_q':>8} {'delta':>7} {'acc':>5} {'elig':>4}"
    lines = [head + f" {'log_rho':>8} {'rho_tilde':>9}  train"]
    for t in traces:
        rows = ",".join(str(r["row"]) for r in t["train"])
        mark = ("selected" if t["selected"] else "") + (f" row {rows}" if rows else "")
        lines.append(
            f"{t['sample_idx']:>5} {t['think_len'] if t['think_len'] is not None else '-':>6} "
            f"{_f(t['logp_pi_theta0']):>8} {_f(t['logp_q_phi']):>8} {_f(t['delta']):>7} "
            f"{_f(t['accuracy'], '.2f'):>5} {'yes' if t['eligible'] else 'no':>4} "
            f"{_f(t['log_rho']):>8} {_f(t['rho_tilde']):>9}  {mark.strip()}".rstrip()
        )
    return lines


def _rollout_lines(rollouts: list[dict]) -> list[str]:
    cells = []
    for r in rollouts:
        verdict = {True: "right", False: "wrong"}.get(r.get("correct"), "unverified")
        answer = (r.get("extracted") or "").replace("\n", " ")
        answer = f' "{answer[:24]}"' if answer else ""
        cells.append(f"{r['rollout_idx']}: {verdict}, {r.get('status') or '-'}{answer}")
    return _wrap(" | ".join(cells), "  rollouts ") if cells else ["  no rollouts"]


def format_view(view: dict[str, Any], run: str = "") -> str:
    """The view as text for a 100-column terminal."""
    where = f"run {run} · " if run else ""
    lines = [
        f"{where}prompt_idx {view['prompt_idx']} · round {view['round']} · {view['source']} · {view['kind']}",
        "question:",
        *_wrap(view["question"] or "", "  ", max_lines=12),
    ]
    if view["tests"]:
        fn = view["tests"]["fn_name"]
        lines.append(f"tests: {view['tests']['cases']} cases, " + (f"call {fn}()" if fn else "stdin/stdout"))
    else:
        lines += _wrap("gold: " + (", ".join(view["gold"]) or "none"), "")
    for c in view["contamination"]:
        lines.append(
            f"contamination: {c['benchmark']} {c['problem_id']}, {c['n']}-gram overlap {c['overlap']:.2f}"
        )
    lines.append(_train_line(view))
    traces = view["traces"]
    if not traces:
        lines.append("no posterior traces for this question in this round")
        return "\n".join(line[:WIDTH] for line in lines)
    n_roll = sum(len(t["rollouts"]) for t in traces)
    lines += [
        f"estimator {view['estimator'] or '-'} · {len(traces)} traces · {n_roll} rollouts · "
        f"selected trace {view['selected'] if view['selected'] is not None else 'none'}",
        "",
        *_trace_table(traces),
    ]
    for t in traces:
        status = "eligible" if t["eligible"] else "not eligible"
        why = f": {t['why_not']}" if t["why_not"] else ""
        lines += ["", f"trace {t['sample_idx']} ({t['finish_reason'] or '-'}) · {status}{why}"]
        lines += _wrap(t["think_start"] or "(empty think)", "  think    ", max_lines=2)
        lines += _rollout_lines(t["rollouts"])
    return "\n".join(line[:WIDTH] for line in lines)


# ---------------------------------------------------------------- reading a run


def _select(con: duckdb.DuckDBPyConnection, table: str, prompt_idx: int, round_: int) -> pl.DataFrame | None:
    try:
        have = [r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall()]
    except duckdb.CatalogException:  # the stage did not run (yet)
        return None
    cols = ", ".join(f'"{c}"' for c in COLUMNS[table] if c in have)
    where = f"prompt_idx = {int(prompt_idx)}" + (f' AND "round" = {int(round_)}' if "round" in have else "")
    return con.sql(f'SELECT {cols} FROM "{table}" WHERE {where}').pl()


def _rounds(con: duckdb.DuckDBPyConnection) -> list[int]:
    for table in ("weights", "posterior_samples"):
        try:
            return [
                r[0] for r in con.execute(f'SELECT DISTINCT "round" FROM "{table}" ORDER BY 1').fetchall()
            ]
        except duckdb.Error:
            continue
    return [1]


def _max_think_tokens(data_root: str | Path, run: str) -> int | None:
    try:
        config = json.loads(run_json(data_root, run).read_text()).get("config") or {}
    except (OSError, ValueError):
        return None
    return (config.get("weights") or {}).get("max_think_tokens")


def show_question(
    data_root: str | Path, run: str, prompt_idx: int, round_: int | None = None
) -> dict[str, Any]:
    """The view of one question of a finished (or partly finished) run; ShowError names what is missing."""
    con = connect(data_root, run)  # an unknown run: FileNotFoundError naming the run and the data root
    try:
        problems = _select(con, "problems", prompt_idx, 1)
        if problems is None:
            raise ShowError(f"run {run!r} has no problems table yet; run its flow first")
        if problems.is_empty():
            lo, hi, n = con.execute(
                "SELECT min(prompt_idx), max(prompt_idx), count(*) FROM problems"
            ).fetchone()
            raise ShowError(
                f"run {run!r} has no prompt_idx {prompt_idx} (its {n} problems have prompt_idx {lo}..{hi}); "
                f'list them with: variational sql {run} "select prompt_idx, source from problems"'
            )
        rounds = _rounds(con)
        round_ = rounds[-1] if round_ is None else round_
        if round_ not in rounds:
            raise ShowError(f"run {run!r} has no round {round_}; its rounds are {rounds}")
        frames = {t: f for t in COLUMNS if (f := _select(con, t, prompt_idx, round_)) is not None}
    finally:
        con.close()
    return question_view(frames, prompt_idx, round_, _max_think_tokens(data_root, run))
