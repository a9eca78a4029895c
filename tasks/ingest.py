"""Stage `problems`: raw Bespoke-Stratos rows -> `problems` (design.md stage 1), plus the rows it had to reject.

In: a dataset (`data.dataset`) in the Bespoke-Stratos-17k schema: `system` (str), `conversations` (list of
{from, value}: "user" then "assistant"), optional `source`, `gold`/`answer` (str or list of str), `tests`
(list of {input, output}, or the APPS/TACO `input_output` JSON string); optionally `data.source_dataset` and
`data.aux` (variational/data/sources.py).
Out: `problems` (prompt_idx, source, kind, question, think_ref, solution_ref, gold, tests) and `rejects`
(row_index, file, file_row, reason). Every raw row of the subset lands in exactly one of them.

Three layers, each rejecting a row on its own: variational/data/raw.py reads bytes (not UTF-8, not JSON,
over `data.max_row_bytes`), `raw_frame` checks the shape (`conversations` a list of turns), `ingest` the
content (turn order, thought/solution tags). `variational data check` runs exactly these three.

Decisions:
- A math row whose solution has no `\\boxed{}` and no gold is KEPT with an empty `gold`: the verifier marks it
  gold_unparsable, so the Acc estimator finds no eligible trace and `select` keeps the original trace, and
  `ruc` rows fall back to GML (method.md §1). Rejecting them would silently drop most ruc items.
- `tests` is the APPS/TACO `input_output` JSON string as the source stores it (`{"inputs", "outputs"}` plus
  `fn_name` for call-based problems); a raw list of {input, output} is written in that form. Null: no tests.
- kind: math for numina/ruc, code for apps/taco; for other sources "code" when the row has tests or its
  solution holds a ```python block and no `\\boxed{}`. Code rows without tests are kept: they verify as
  nothing and keep their original trace in `select`, as the official pipeline does with an uncheckable problem.
- `gold`: the source's ground truth first (data.aux), then explicit `gold`/`answer` columns, then the answer
  boxed in the reference solution; the verifier accepts any (the official OR rule, method.md §5).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from variational import templates
from variational.config import AuxDataset, DataConfig
from variational.data import sources as src
from variational.data.raw import (
    EMBEDDED,
    RawRows,
    content_hash,
    embedded_path,
    local_files,
    parse_json,
    read_rows,
)
from variational.pipeline.stage import Inputs, Output, Stage, logger

__all__ = ["EMBEDDED", "content_hash", "embedded_path", "local_files"]  # re-exported for the task and tests

SHARD_ROWS = 4096
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT spellings of the same roles
TURN_DTYPE = pl.Struct({"from": pl.String, "value": pl.String})
RAW_SCHEMA = pl.Schema(
    {
        "row_index": pl.Int64,
        "system": pl.String,
        "conversations": pl.List(TURN_DTYPE),
        "source": pl.String,
        "gold": pl.List(pl.String),
        "tests": pl.String,
    }
)
PROBLEMS_SCHEMA = pl.Schema(
    {
        "prompt_idx": pl.Int64,
        "source": pl.String,
        "kind": pl.String,
        "question": pl.String,
        "think_ref": pl.String,
        "solution_ref": pl.String,
        "gold": pl.List(pl.String),
        "tests": pl.String,
    }
)
REJECTS_SCHEMA = pl.Schema(
    {"row_index": pl.Int64, "file": pl.String, "file_row": pl.Int64, "reason": pl.String}
)


class Reject(ValueError):
    """A raw row that cannot become a problem; the message is the reason recorded in `rejects`."""


# ---------------------------------------------------------------- pure core


def subset(raw: pl.DataFrame, limit: int | None, seed: int | None) -> pl.DataFrame:
    """Add `row_index` (position in the raw data), shuffle with `seed` when given, keep the first `limit`."""
    out = raw if "row_index" in raw.columns else raw.with_row_index("row_index").cast({"row_index": pl.Int64})
    if seed is not None:
        out = out.sample(fraction=1.0, shuffle=True, seed=seed)
    return out.head(limit) if limit is not None else out


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    """One raw row dict -> RAW_SCHEMA types; Reject names the field of the wrong type."""
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise Reject(f"conversations is a {_type_name(conv)}, expected a list of {{from, value}} turns")
    turns = []
    for turn in conv:
        if not isinstance(turn, dict):
            raise Reject(f"conversation turn is {_type_name(turn)}, expected {{from, value}}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(role, str | None) or not isinstance(text, str | None):
            raise Reject(f"conversation turn has a {_type_name(text)} value, expected text")
        turns.append({"from": role, "value": text})
    system, source = row.get("system"), row.get("source")
    for name, value in (("system", system), ("source", source)):
        if not isinstance(value, str | None):
            raise Reject(f"{name} is a {_type_name(value)}, expected text")
    tests = row.get("tests")
    if tests is not None and not isinstance(tests, str):
        tests = json.dumps(_tests_as_input_output(tests))
    return {
        "row_index": row["row_index"],
        "system": system,
        "conversations": turns,
        "source": source,
        "gold": [*_gold_values(row.get("gold")), *_gold_values(row.get("answer"))],
        "tests": tests,
    }


def raw_frame(rows: list[dict[str, Any]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Raw row dicts (each with `row_index`) -> (frame in RAW_SCHEMA, rejects): one row of a wrong type (a
    string `conversations`) rejects only itself instead of retyping the whole column."""
    good, rejects = [], []
    for row in rows:
        try:
            good.append(_shape(row))
        except Reject as err:
            rejects.append({"row_index": row["row_index"], "reason": str(err)})
    return pl.DataFrame(good, schema=RAW_SCHEMA), pl.DataFrame(rejects, schema=REJECTS_SCHEMA)


def _turns(conversations: Any) -> tuple[str, str]:
    """(user question, assistant text) of a two-turn conversation; Reject names what is wrong."""
    if not conversations:
        raise Reject("no conversations")
    roles, texts = [], []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise Reject(f"conversation turn is {type(turn).__name__}, expected {{from, value}}")
        role = turn.get("from") or turn.get("role")
        role = ROLE_ALIASES.get(role, role)
        if role == "system":  # some exports repeat the system prompt as a turn
            continue
        roles.append(role)
        text = turn.get("value")
        texts.append(turn.get("content") if text is None else text)
    if "assistant" not in roles:
        raise Reject("no assistant turn")
    if "user" not in roles:
        raise Reject("no user question")
    if roles != ["user", "assistant"]:
        raise Reject(f"turns are {roles}, expected ['user', 'assistant']")
    question, answer = texts
    if not isinstance(question, str) or not question.strip():
        raise Reject("no user question (empty user turn)")
    if not isinstance(answer, str) or not answer.strip():
        raise Reject("empty assistant turn")
    return question, answer


def _tests_as_input_output(value: Any) -> dict[str, Any]:
    """A list of {input, output} (or an APPS dict) -> the APPS `{"inputs": [...], "outputs": [...]}` dict."""
    if isinstance(value, dict) and "inputs" in value:
        return value
    if not isinstance(value, list) or not all(isinstance(t, dict) and "input" in t for t in value):
        raise Reject("tests must be the APPS input_output JSON or a list of {input, output}")
    return {"inputs": [t["input"] for t in value], "outputs": [t.get("output") for t in value]}


def _tests(value: str | None) -> str | None:
    """The `input_output` JSON string, checked and kept byte for byte (the code verifier parses it)."""
    if value is None or not value.strip():
        return None
    try:
        parsed = parse_json(value)
    except json.JSONDecodeError as err:
        raise Reject(f"tests is not valid JSON ({err.msg})") from None
    except ValueError as err:  # nested too deeply: the reader's rule, for the JSON inside the row too
        raise Reject(f"tests: {err}") from None
    io = _tests_as_input_output(parsed)
    ins, outs = io.get("inputs") or [], io.get("outputs") or []
    if not isinstance(ins, list) or not isinstance(outs, list):
        raise Reject("tests: `inputs` and `outputs` must be lists")
    if len(ins) != len(outs):
        raise Reject(f"tests have {len(ins)} inputs but {len(outs)} outputs")
    return value if io is parsed else json.dumps(io)


def _gold_values(value: Any) -> list[str]:
    if value is None:
        return []
    items = list(value) if isinstance(value, list | tuple) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def _is_code(solution: str, tests: str | None) -> bool:
    return bool(tests) or ("```python" in solution and templates.last_boxed(solution) is None)


def _problem(row: dict[str, Any]) -> dict[str, Any]:
    question, assistant = _turns(row.get("conversations"))
    try:
        think, solution = templates.split_stratos(assistant)
    except ValueError as err:
        raise Reject(f"assistant text: {err}") from None
    if not think.strip():
        raise Reject("empty think span")
    if not solution.strip():
        raise Reject("empty solution span")
    raw_tests = row.get("tests")
    if raw_tests is not None and not isinstance(raw_tests, str):
        raw_tests = json.dumps(_tests_as_input_output(raw_tests))
    tests = _tests(raw_tests)
    source = row.get("source")
    source = source if isinstance(source, str) and source.strip() else "unknown"
    kind = src.kind_of(source, "code" if _is_code(solution, tests) else "math")
    gold: list[str] = []
    if kind == "math":  # explicit gold first: the verifier tries gold[0] first (design.md, verifier contract)
        gold = [g for col in ("gold", "answer") for g in _gold_values(row.get(col))]
        gold += _gold_values(templates.last_boxed(solution))
    return {
        "prompt_idx": row["row_index"],
        "source": source,
        "kind": kind,
        "question": question,
        "think_ref": think,
        "solution_ref": solution,
        "gold": list(dict.fromkeys(gold)),
        "tests": tests,
    }


def ingest(raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Raw Bespoke-Stratos rows -> (problems, rejects). prompt_idx = `row_index` when present, else position."""
    if "conversations" not in raw.columns:
        raise ValueError(
            f"raw data has no `conversations` column (columns: {raw.columns}); "
            "expected the Bespoke-Stratos-17k schema {system, conversations}"
        )
    if "row_index" not in raw.columns:
        raw = raw.with_row_index("row_index").cast({"row_index": pl.Int64})
    keep = [
        c for c in ("row_index", "conversations", "source", "gold", "answer", "tests") if c in raw.columns
    ]
    problems, rejects = [], []
    for row in raw.select(keep).iter_rows(named=True):
        try:
            problems.append(_problem(row))
        except Reject as err:
            rejects.append({"row_index": row["row_index"], "reason": str(err)})
    return (
        pl.DataFrame(problems, schema=PROBLEMS_SCHEMA).sort("prompt_idx"),
        pl.DataFrame(rejects, schema=REJECTS_SCHEMA).sort("row_index"),
    )


def assign_sources(
    problems: pl.DataFrame,
    raw: pl.DataFrame,
    n_rows: int,
    source_rows: tuple[pl.DataFrame, int] | None,
    derive: bool,
) -> tuple[pl.DataFrame, src.SourceReport]:
    """problems.source from (first that applies) the source dataset, the raw `source` column, or the public
    rows themselves (variational/data/sources.py); kind follows the source. Runs on every row, before `subset`:
    the derivation reads block positions and the official counts hold for the whole set only.
    `source_rows`: (row_index, source, question) of the source dataset and its row count."""
    if source_rows is not None:
        sources, report = src.align_source_dataset(problems, source_rows[0], n_rows, source_rows[1])
    elif raw["source"].is_not_null().any() or not derive:
        report = src.SourceReport(
            "the dataset's `source` column" if raw["source"].is_not_null().any() else "none"
        )
        report.counts = dict(Counter(src.source_name(s) for s in problems["source"].to_list()))
        return problems, report
    else:
        sources, report = src.derive_sources(problems)
    kinds = [src.kind_of(s, k) for s, k in zip(sources.to_list(), problems["kind"].to_list(), strict=True)]
    out = problems.with_columns(sources, pl.Series("kind", kinds, dtype=pl.String))
    # the content heuristic can disagree with the source: a code row carries no gold, a math row the
    # answer boxed in its reference solution
    boxed = [
        _gold_values(templates.last_boxed(s)) if k == "math" and not g else (g if k == "math" else [])
        for s, k, g in out.select("solution_ref", "kind", "gold").iter_rows()
    ]
    return out.with_columns(pl.Series("gold", boxed, dtype=pl.List(pl.String))), report


# ---------------------------------------------------------------- loading (I/O)


def load_raw(dataset: str, split: str = "train", max_row_bytes: int | None = None) -> pl.DataFrame:
    """The readable rows of a dataset as a RAW_SCHEMA frame (bad rows dropped; `check_dataset` names them)."""
    return raw_frame(read_rows(dataset, split, max_row_bytes).rows)[0]


def _locate(rejects: pl.DataFrame, rr: RawRows) -> pl.DataFrame:
    where = [rr.locate(i) for i in rejects["row_index"].to_list()]
    return rejects.with_columns(
        pl.Series("file", [f for f, _ in where], dtype=pl.String),
        pl.Series("file_row", [r for _, r in where], dtype=pl.Int64),
    )


def _validate(rr: RawRows) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(raw frame, problems, rejects of all three layers, each naming file, row and reason)."""
    raw, shape_rejects = raw_frame(rr.rows)
    problems, content_rejects = ingest(raw)
    read_rejects = pl.DataFrame(rr.rejects, schema=REJECTS_SCHEMA)
    later = _locate(pl.concat([shape_rejects, content_rejects]), rr)
    return raw, problems, pl.concat([read_rejects, later]).sort("row_index")


@dataclass
class DataCheck:
    """What `variational data check` prints."""

    rows: int
    accepted: int
    rejects: pl.DataFrame  # REJECTS_SCHEMA

    def as_json(self) -> dict[str, Any]:
        rejected = [
            {"index": r["row_index"], "reason": r["reason"], "file": r["file"]}
            for r in self.rejects.iter_rows(named=True)
        ]
        return {"rows": self.rows, "accepted": self.accepted, "rejected": rejected}


def check_dataset(dataset: str, split: str = "train", max_row_bytes: int | None = 1 << 20) -> DataCheck:
    """Ingest's validation alone, on every row of a dataset (no sources, no aux, nothing written)."""
    rr = read_rows(dataset, split, max_row_bytes)
    _, problems, rejects = _validate(rr)
    return DataCheck(rows=rr.n_rows, accepted=problems.height, rejects=rejects)


@dataclass
class IngestResult:
    """Everything the ingest task writes: the table, its side table and the manifest's extra fields."""

    problems: pl.DataFrame
    rejects: pl.DataFrame
    rows_in: int
    report: src.SourceReport
    stats: dict[str, Any] = field(default_factory=dict)


def _source_rows(dataset: str) -> tuple[pl.DataFrame, int]:
    """(row_index, source, question) of the row-aligned source dataset, and its row count."""
    rr = read_rows(dataset, "train")
    if rr.rows and "source" not in rr.rows[0]:
        raise ValueError(
            f"data.source_dataset {dataset!r} has no `source` column (columns: {sorted(rr.rows[0])})"
        )
    rows = [
        {"row_index": r["row_index"], "source": r.get("source"), "question": src.source_question(r)}
        for r in rr.rows
    ]
    schema = {"row_index": pl.Int64, "source": pl.String, "question": pl.String}
    return pl.DataFrame(rows, schema=schema), rr.n_rows


def _aux_rows(name: str, aux: AuxDataset, indices: set[int], report: src.SourceReport) -> pl.DataFrame:
    """The rows of one source dataset that the problems point at, as AUX_SCHEMA."""
    rr = read_rows(aux.dataset, aux.split, None, indices)
    if rr.rejects:
        report.aux.setdefault(name, Counter())["unreadable source rows"] += len(rr.rejects)
    rows = [{"source_index": r["row_index"], **src.aux_fields(name, r)} for r in rr.rows]
    return pl.DataFrame(rows, schema=src.AUX_SCHEMA)


def load_and_ingest(data: DataConfig) -> IngestResult:
    """Read, validate, assign sources, take the subset, join the source datasets: the whole problems stage."""
    rr = read_rows(data.dataset, data.split, data.max_row_bytes)
    raw, problems, rejects = _validate(rr)
    source_rows = _source_rows(data.source_dataset) if data.source_dataset else None
    problems, report = assign_sources(problems, raw, rr.n_rows, source_rows, data.derive_sources)
    keep = subset(pl.DataFrame({"row_index": range(rr.n_rows)}), data.limit, data.subset_seed)["row_index"]
    problems = problems.filter(pl.col("prompt_idx").is_in(keep.implode()))
    rejects = rejects.filter(pl.col("row_index").is_in(keep.implode()))
    wanted = src.wanted_indices(problems["source"].to_list())
    aux = {
        name: _aux_rows(name, data.aux[name], idx, report) for name, idx in wanted.items() if name in data.aux
    }
    for name in sorted(set(wanted) - set(data.aux)):
        what = "tests" if name in src.CODE_SOURCES else "source ground truth"
        report.problems.append(
            f"{len(wanted[name])} {name} rows have an index but no data.aux.{name}: no {what}"
        )
    problems = src.join_aux(problems, aux, report)
    stats = {
        "rows_in": keep.len(),
        "rejects": rejects.height,
        "no_gold": int(((problems["kind"] == "math") & (problems["gold"].list.len() == 0)).sum()),
        "no_tests": int(((problems["kind"] == "code") & problems["tests"].is_null()).sum()),
        "kinds": dict(Counter(problems["kind"].to_list())),
        "sources": report.counts,
        "source_problems": len(report.problems),
    }
    return IngestResult(problems, rejects, keep.len(), report, stats)


def data_files(data: DataConfig) -> list[Path]:
    """Every local file ingest reads (main, source and aux datasets): their content enters the fingerprint."""
    named = [(data.dataset, data.split)]
    if data.source_dataset:
        named.append((data.source_dataset, "train"))
    named += [(a.dataset, a.split) for _, a in sorted(data.aux.items())]
    return [f for dataset, split in named for f in (local_files(dataset, split) or [])]


# ---------------------------------------------------------------- Prefect task


def _summary(problems: pl.DataFrame, rejects: pl.DataFrame, report: src.SourceReport | None = None) -> str:
    """The ingest artifact (markdown): rows per source and kind, the source report, every kind of reject."""
    counts = problems.group_by(pl.col("source").str.split("/").list.first(), "kind").agg(
        pl.len().alias("rows"),
        (pl.col("gold").list.len() == 0).sum().alias("no_gold"),
        pl.col("tests").is_null().sum().alias("no_tests"),
    )
    lines = ["| source | kind | rows | no gold | no tests |", "|---|---|---|---|---|"]
    for r in counts.sort("source", "kind").iter_rows(named=True):
        no_gold, no_tests = (r["no_gold"], "") if r["kind"] == "math" else ("", r["no_tests"])
        lines.append(f"| {r['source']} | {r['kind']} | {r['rows']} | {no_gold} | {no_tests} |")
    if report is not None:
        lines += ["", report.markdown()]
    reasons = Counter(rejects["reason"].str.replace(r"^line \d+: ", "").to_list())
    lines += ["", f"rejected rows: {rejects.height}"] + [
        f"- {n} x {why}" for why, n in reasons.most_common(10)
    ]
    lines += [
        f"- row {r['row_index']} ({r['file'] or 'frame'}, row {r['file_row']}): {r['reason']}"
        for r in rejects.head(src.NAMED_MAX).iter_rows(named=True)
    ]
    return "\n".join(lines)


def load_subset(data: DataConfig) -> pl.DataFrame:
    """The subset's readable rows (RAW_SCHEMA). The stage itself runs `load_and_ingest`."""
    return subset(load_raw(data.dataset, data.split, data.max_row_bytes), data.limit, data.subset_seed)


def _problems(i: Inputs) -> Output:
    """Load the dataset (and its sources), keep the usable rows as `problems`; the rest go to `rejects`."""
    r = load_and_ingest(i.conf.data)
    if r.problems.is_empty():
        raise ValueError(
            f"dataset {i.conf.data.dataset!r} gave no usable rows out of {r.rows_in}; "
            f"first rejects: {r.rejects.head(5).to_dicts()}"
        )
    if r.rejects.height:
        logger().warning(
            "problems: rejected %d of %d rows of %s, e.g. %s (all in the side table rejects.parquet)",
            r.rejects.height,
            r.rows_in,
            i.conf.data.dataset,
            "; ".join(
                f"row {x['row_index']}: {x['reason']}" for x in r.rejects.head(5).iter_rows(named=True)
            ),
        )
    meta = {
        "dataset": i.conf.data.dataset,
        "rows_in": r.rows_in,
        **r.stats,
        "first_rejects": r.rejects.head(20).to_dicts(),
        "summary": _summary(r.problems, r.rejects, r.report),
    }
    return Output(r.problems, side={"rejects": r.rejects}, meta=meta)


def _data_content(i: Inputs) -> dict:
    """Local and embedded data files (the dataset, its source and aux datasets) enter the fingerprint by
    content; a hub id enters by name (through `data`)."""
    files = data_files(i.conf.data)
    return {"content": content_hash(files) if files else None}


PROBLEMS = Stage(
    name="problems",
    fields=("data",),
    code=("variational.templates", "variational.data.raw", "variational.data.sources"),
    core=_problems,
    identity=_data_content,
    per_round=False,
)
