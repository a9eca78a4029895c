"""Where each Bespoke-Stratos problem comes from, and what its source dataset knows (issue 10 §1-§2).

In:  the `problems` frame of ingest (prompt_idx = row in the main dataset, question, source, kind, gold, tests),
     optionally the rows of `data.source_dataset` (row_index, source, question) and of the `data.aux` datasets.
Out: the same problems with `source` and `kind` set, math `gold` extended with the source's ground truth, code
     `tests` = the source's `input_output` JSON string; and a `SourceReport` whose markdown the ingest summary shows.

`problems.source` forms (SOURCES.md §10):
- "<name>/<index>": name in numina/apps/taco/ruc and the 0-based row of that source dataset, as in the official
  `zhouxiangxin/Bespoke-Stratos-17k-Source` (only these are joined with `data.aux`);
- "<name>/?": derived from the public row itself (prompt prefix, block position): no index, so no join;
- "code/?": a code row that lies inside the ruc block, so apps vs taco cannot be told; counted and named;
- anything else passes through from a raw `source` column (the mini set's "arith/3"); "unknown" when absent.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from variational.templates import last_boxed

NUMINA_PREFIX = "Return your final response within \\boxed{}. "
CODE_PREFIX = "Generate an executable Python function generated from the given prompt."
# the comment in the official verify_parallel.py; 16,710 rows in all (SOURCES.md §10)
OFFICIAL_COUNTS = {"numina": 10_500, "apps": 3_299, "taco": 2_096, "ruc": 815}
OFFICIAL_ROWS = sum(OFFICIAL_COUNTS.values())
MATH_SOURCES, CODE_SOURCES = ("numina", "ruc"), ("apps", "taco", "code")
SOURCE_RE = re.compile(r"^(numina|apps|taco|ruc)/(\d+)$")
NAMED_MAX = 20  # rows named per problem in the summary; the counts are always complete


def parse_source(source: str | None) -> tuple[str | None, int | None]:
    """ "apps/45" -> ("apps", 45); "apps/?" -> ("apps", None); anything else -> (None, None)."""
    if not source:
        return None, None
    if m := SOURCE_RE.match(source):
        return m.group(1), int(m.group(2))
    name = source.removesuffix("/?")
    return (name, None) if source.endswith("/?") and name in OFFICIAL_COUNTS else (None, None)


def source_name(source: str | None) -> str:
    return (source or "unknown").split("/")[0]


def kind_of(source: str | None, heuristic: str) -> str:
    """math for numina/ruc, code for apps/taco (and undecided code rows), else the content heuristic."""
    name = source_name(source)
    return "math" if name in MATH_SOURCES else "code" if name in CODE_SOURCES else heuristic


def _norm(text: str | None) -> str:
    return " ".join((text or "").split())


def strip_prefix(question: str) -> str:
    """The problem text of a Bespoke user message: without the numina / code instruction prefix."""
    if question.startswith(NUMINA_PREFIX):
        return question[len(NUMINA_PREFIX) :]
    if question.startswith(CODE_PREFIX):
        rest = question[len(CODE_PREFIX) :]
        # the stdin and call-based prefixes continue with one more sentence (SOURCES.md §10)
        for tail in (
            " The function should take stdin as input and print the output. Simply call the function after the definition.",
            " Return the function body without invoking it at the final solution.",
        ):
            if rest.startswith(tail):
                return rest[len(tail) :]
        return rest
    return question


def same_question(main: str | None, other: str | None) -> bool:
    """Whitespace-insensitive: one text holds the other once the instruction prefix is gone (the main
    question adds a prefix and the starter code; a source dataset may store either form)."""
    a, b = _norm(strip_prefix(main or "")), _norm(strip_prefix(other or ""))
    return bool(a and b) and (a in b or b in a)


@dataclass
class SourceReport:
    """What ingest learnt about sources; `markdown()` goes into the ingest summary."""

    method: str  # source_dataset | column | derived | none
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # one line per mismatch / unassigned / failed join
    aux: dict[str, Counter] = field(default_factory=dict)  # name -> joined / out_of_range / ...

    def markdown(self) -> str:
        lines = [f"sources: {self.method}", "", "| source | rows | official |", "|---|---|---|"]
        for name in sorted(self.counts):
            lines.append(f"| {name} | {self.counts[name]} | {OFFICIAL_COUNTS.get(name, '')} |")
        for name, c in sorted(self.aux.items()):
            lines.append(f"\naux {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        lines += ["", f"source problems: {len(self.problems)}"] + [f"- {p}" for p in self.problems]
        return "\n".join(lines)


def _named(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:NAMED_MAX]))
    return shown + (f" … (+{len(rows) - NAMED_MAX} more)" if len(rows) > NAMED_MAX else "")


def derive_sources(problems: pl.DataFrame) -> tuple[pl.Series, SourceReport]:
    """Sources from the public rows (SOURCES.md §10 recipe): numina prefix, code prefix, else ruc; code rows
    before the ruc block are apps, after it taco (the curator's concatenation order); inside it: "code/?"."""
    idx, questions = problems["prompt_idx"].to_list(), problems["question"].to_list()
    names = [
        "numina" if q.startswith(NUMINA_PREFIX) else "code" if q.startswith(CODE_PREFIX) else "ruc"
        for q in questions
    ]
    ruc_rows = [i for i, n in zip(idx, names, strict=True) if n == "ruc"]
    first_ruc, last_ruc = (min(ruc_rows), max(ruc_rows)) if ruc_rows else (None, None)
    out, unassigned = [], []
    for i, name in zip(idx, names, strict=True):
        if name == "code":
            if first_ruc is not None and i < first_ruc:
                name = "apps"
            elif last_ruc is not None and i > last_ruc:
                name = "taco"
            else:
                unassigned.append(i)
        out.append(f"{name}/?")
    report = SourceReport("derived (prompt prefix + block order; no index into the source datasets)")
    report.counts = dict(Counter(s.split("/")[0] for s in out))
    if unassigned:
        where = "inside the ruc block" if ruc_rows else "and no ruc block"
        report.problems.append(
            f"{len(unassigned)} code rows {where}, apps vs taco unknown (source 'code/?'): rows {_named(unassigned)}"
        )
    inside = [
        i for i, n in zip(idx, names, strict=True) if n != "ruc" and ruc_rows and first_ruc < i < last_ruc
    ]
    if inside and len(inside) != len(unassigned):
        report.problems.append(f"ruc block is not contiguous: non-ruc rows inside it: {_named(inside)}")
    if problems.height == OFFICIAL_ROWS:
        for name, expected in OFFICIAL_COUNTS.items():
            if (got := report.counts.get(name, 0)) != expected:
                report.problems.append(f"{name}: {got} rows derived, official count {expected}")
    else:
        report.problems.append(
            f"{problems.height} rows, not the official {OFFICIAL_ROWS}: per-source counts not checked"
        )
    return pl.Series("source", out, dtype=pl.String), report


def align_source_dataset(
    problems: pl.DataFrame, source_rows: pl.DataFrame, n_rows: int, n_source_rows: int
) -> tuple[pl.Series, SourceReport]:
    """`source` of the row-aligned source dataset (row_index, source, question); every problem whose question
    differs from its source row's is counted and named (the official code trusts the alignment blindly)."""
    if n_source_rows != n_rows:
        raise ValueError(
            f"data.source_dataset has {n_source_rows} rows but data.dataset has {n_rows}; they must be "
            "row-aligned (the same dataset with a `source` column added)"
        )
    joined = problems.select("prompt_idx", "question").join(
        source_rows.rename({"row_index": "prompt_idx", "question": "source_question"}),
        on="prompt_idx",
        how="left",
        maintain_order="left",
    )
    report = SourceReport("data.source_dataset (row-aligned)")
    missing = joined.filter(pl.col("source").is_null())["prompt_idx"].to_list()
    if missing:
        report.problems.append(f"{len(missing)} rows have no readable source row: rows {_named(missing)}")
    bad_form = joined.filter(
        pl.col("source").is_not_null() & ~pl.col("source").str.contains(SOURCE_RE.pattern)
    )["prompt_idx"].to_list()
    if bad_form:
        report.problems.append(
            f"{len(bad_form)} sources are not '<numina|apps|taco|ruc>/<index>': {_named(bad_form)}"
        )
    differ = [
        i
        for i, q, sq, s in joined.select("prompt_idx", "question", "source_question", "source").iter_rows()
        if s is not None and sq is not None and not same_question(q, sq)
    ]
    if differ:
        report.problems.append(
            f"{len(differ)} rows differ in question text from their source row: {_named(differ)}"
        )
    sources = joined["source"].fill_null("unknown")
    report.counts = dict(Counter(source_name(s) for s in sources.to_list()))
    if n_rows == OFFICIAL_ROWS:
        for name, expected in OFFICIAL_COUNTS.items():
            if (got := report.counts.get(name, 0)) != expected:
                report.problems.append(f"{name}: {got} rows, official count {expected}")
    return sources.alias("source"), report


def source_question(row: dict[str, Any]) -> str | None:
    """The question of a source-dataset row: its user turn, or the first question-like field."""
    for turn in row.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("user", "human"):
            return turn.get("value", turn.get("content"))
    for key in ("question_content", "question", "problem", "prompt"):
        if isinstance(row.get(key), str):
            return row[key]
    return None


# ---------------------------------------------------------------- aux: ground truth and tests


def aux_fields(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """One source-dataset row -> {question, gold, tests}, per the schemas the official verify_parallel.py reads:
    numina_all_subsets_formatted {problem, solution, answer, ...}: the answer boxed in `solution` (what the
    official extract_answer takes), else `answer`; long_form_thought_data_5k {question, combined_text, domain}:
    the answer boxed in `combined_text`; apps / TACO_subset {question, input_output, solutions, starter_code,
    ...}: `input_output` unchanged."""
    if name == "numina":
        gold = last_boxed(row.get("solution") or "") or (str(row.get("answer") or "").strip() or None)
        return {"question": row.get("problem"), "gold": gold, "tests": None}
    if name == "ruc":
        return {
            "question": row.get("question"),
            "gold": last_boxed(row.get("combined_text") or ""),
            "tests": None,
        }
    tests = row.get("input_output")
    return {"question": row.get("question"), "gold": None, "tests": tests if isinstance(tests, str) else None}


AUX_SCHEMA = pl.Schema(
    {"source_index": pl.Int64, "question": pl.String, "gold": pl.String, "tests": pl.String}
)


def join_aux(problems: pl.DataFrame, aux: dict[str, pl.DataFrame], report: SourceReport) -> pl.DataFrame:
    """Add each source's ground truth (math: first in `gold`, the reference answer kept after it: the official
    OR rule) and tests (code: the `input_output` string) to problems whose source is "<name>/<index>".
    `aux[name]` holds the rows of the indices asked for (AUX_SCHEMA); whatever fails is counted per source."""
    by_name = {
        name: {r["source_index"]: r for r in frame.iter_rows(named=True)} for name, frame in aux.items()
    }
    golds, tests = [], []
    for source, gold, test, question in problems.select("source", "gold", "tests", "question").iter_rows():
        name, index = parse_source(source)
        rows = by_name.get(name) if name else None
        if rows is None or index is None:
            golds.append(gold)
            tests.append(test)
            continue
        stats = report.aux.setdefault(name, Counter())
        hit = rows.get(index)
        if hit is None:
            stats["index out of range"] += 1
            golds.append(gold)
            tests.append(test)
            continue
        stats["joined"] += 1
        if not same_question(question, hit["question"]):
            stats["question differs"] += 1
        if name in MATH_SOURCES:
            if hit["gold"] is None:
                stats["no ground truth"] += 1
            golds.append(list(dict.fromkeys([g for g in (hit["gold"], *gold) if g])))
            tests.append(test)
        else:
            if not hit["tests"]:
                stats["no input_output"] += 1
            golds.append(gold)
            tests.append(hit["tests"] or test)
    for name, stats in sorted(report.aux.items()):
        if stats["index out of range"] or stats["question differs"]:
            report.problems.append(
                f"aux {name}: {stats['index out of range']} indices out of range, "
                f"{stats['question differs']} questions differ from the source row"
            )
    return problems.with_columns(
        pl.Series("gold", golds, dtype=pl.List(pl.String)), pl.Series("tests", tests, dtype=pl.String)
    )


def wanted_indices(sources: list[str | None]) -> dict[str, set[int]]:
    """name -> the source-dataset rows the problems point at."""
    out: dict[str, set[int]] = {}
    for s in sources:
        name, index = parse_source(s)
        if name is not None and index is not None:
            out.setdefault(name, set()).add(index)
    return out
