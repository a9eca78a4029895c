"""ingest: raw Bespoke-Stratos rows -> `problems` (design.md stage 1), plus the rows it had to reject.

In: a frame in the Bespoke-Stratos-17k schema: `system` (str), `conversations` (list of {from, value}: "user"
then "assistant"), optional `source`, `gold`/`answer` (str or list of str), `tests` (list of {input, output},
or a JSON string in the APPS/TACO `{"inputs": [...], "outputs": [...]}` form), `row_index` (set by `subset`).
Out: `problems` (prompt_idx, source, kind, question, think_ref, solution_ref, gold, tests) and `rejects`
(row_index, reason). Every raw row lands in exactly one of them.

Decisions:
- A math row whose solution has no `\\boxed{}` and no gold column is KEPT with an empty `gold`: the verifier
  marks it gold_unparsable, so the Acc estimator finds no eligible trace and `select` keeps the original
  trace, and `ruc` rows fall back to GML (method.md §1). Rejecting them would silently drop most ruc items.
- The public dataset has no `source` column, so the source is "unknown" there; method.md §5's sources
  (numina/apps/taco/ruc, format `numina/<i>`) come only from a raw `source` column. Without it the ruc
  fallback never fires.
- kind is "code" when the row has tests or its solution holds a ```python block and no `\\boxed{}`. Code
  rows without tests (the public dataset has none) are kept: they verify as nothing and keep their original
  trace in `select`, as in the official pipeline when a problem cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

from variational import store as store_mod
from variational import templates
from variational.config import DataConfig, RunConfig
from variational.stage import finish_stage, logger, open_store, reuse_stage, stage_task
from variational.store import code_version, write_parquet_atomic

# store folder = task name (stage_task's cache check looks there); the DuckDB view is `problems`
# (variational.sqlview.TABLE_OF)
STAGE = "ingest"
SHARD_ROWS = 4096
EMBEDDED = "embedded:"
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT spellings of the same roles
TEST_DTYPE = pl.Struct({"input": pl.String, "output": pl.String})
PROBLEMS_SCHEMA = pl.Schema(
    {
        "prompt_idx": pl.Int64,
        "source": pl.String,
        "kind": pl.String,
        "question": pl.String,
        "think_ref": pl.String,
        "solution_ref": pl.String,
        "gold": pl.List(pl.String),
        "tests": pl.List(TEST_DTYPE),
    }
)
REJECTS_SCHEMA = pl.Schema({"row_index": pl.Int64, "reason": pl.String})


class Reject(ValueError):
    """A raw row that cannot become a problem; the message is the reason recorded in `rejects`."""


# ---------------------------------------------------------------- pure core


def subset(raw: pl.DataFrame, limit: int | None, seed: int | None) -> pl.DataFrame:
    """Add `row_index` (position in the raw data), shuffle with `seed` when given, keep the first `limit`."""
    out = raw if "row_index" in raw.columns else raw.with_row_index("row_index").cast({"row_index": pl.Int64})
    if seed is not None:
        out = out.sample(fraction=1.0, shuffle=True, seed=seed)
    return out.head(limit) if limit is not None else out


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


def _tests(value: Any) -> list[dict[str, str]]:
    """Tests as [{input, output}] from a list of dicts or a JSON string (list, or APPS {inputs, outputs})."""
    if value is None:
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise Reject(f"tests is not valid JSON ({err.msg})") from None
    if isinstance(value, dict) and "inputs" in value:
        ins, outs = value.get("inputs") or [], value.get("outputs") or []
        if len(ins) != len(outs):
            raise Reject(f"tests have {len(ins)} inputs but {len(outs)} outputs")
        value = [{"input": i, "output": o} for i, o in zip(ins, outs, strict=True)]
    if not isinstance(value, list) or not all(isinstance(t, dict) and "input" in t for t in value):
        raise Reject("tests must be a list of {input, output}")
    return [{"input": _as_text(t["input"]), "output": _as_text(t.get("output"))} for t in value]


def _as_text(v: Any) -> str:
    if isinstance(v, list):  # APPS stores some stdin inputs as lists of lines
        return "\n".join(map(str, v))
    return "" if v is None else str(v)


def _gold_values(value: Any) -> list[str]:
    if value is None:
        return []
    items = list(value) if isinstance(value, list | tuple) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def _is_code(solution: str, tests: list) -> bool:
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
    tests = _tests(row.get("tests"))
    kind = "code" if _is_code(solution, tests) else "math"
    gold: list[str] = []
    if kind == "math":
        boxed = templates.last_boxed(solution)
        # explicit gold first: the verifier checks against gold[0] first (design.md, verifier contract)
        for g in [*_gold_values(row.get("gold")), *_gold_values(row.get("answer")), *_gold_values(boxed)]:
            if g not in gold:
                gold.append(g)
    source = row.get("source")
    return {
        "prompt_idx": row["row_index"],
        "source": source if isinstance(source, str) and source.strip() else "unknown",
        "kind": kind,
        "question": question,
        "think_ref": think,
        "solution_ref": solution,
        "gold": gold,
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


# ---------------------------------------------------------------- loading (I/O)

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def embedded_path(dataset: str) -> Path:
    """`embedded:<name>` -> the jsonl shipped in variational/data/<name>.jsonl."""
    name = dataset.removeprefix(EMBEDDED)
    path = Path(str(resources.files("variational") / "data" / f"{name}.jsonl"))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise FileNotFoundError(f"no embedded dataset {name!r}; shipped: {shipped}")
    return path


def local_files(dataset: str, split: str) -> list[Path] | None:
    """The data files of a local dataset (file or folder), or None when `dataset` is not a local path."""
    if dataset.startswith(EMBEDDED):
        return [embedded_path(dataset)]
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{path}: unsupported data file; use one of {sorted(DATA_SUFFIXES)}")
        return [path]
    if not path.is_dir():
        return None
    for suffix in (".parquet", ".jsonl", ".json"):  # a hub snapshot folder: data/<split>-0000x-of-....parquet
        files = sorted(p for p in path.rglob(f"*{suffix}") if not p.name.startswith("."))
        in_split = [p for p in files if p.name.startswith(f"{split}-") or p.name.startswith(f"{split}.")]
        if files:
            return in_split or files
    raise FileNotFoundError(f"{path}: folder holds no .parquet/.jsonl/.json data files")


def load_raw(dataset: str, split: str = "train") -> pl.DataFrame:
    """Raw rows of `embedded:<name>`, a local .jsonl/.json/.parquet file or folder, or a hub dataset id."""
    import datasets  # heavy import, only where data is actually loaded

    files = local_files(dataset, split)
    if files is None:
        ds = datasets.load_dataset(dataset, split=split)
    else:
        fmt = DATA_SUFFIXES[files[0].suffix]
        # local files always land in datasets' default "train" split
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    return ds.to_polars()  # type: ignore[return-value]


def content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- Prefect task


def fingerprint_of(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    """Data config + the content of local/embedded files. No round: problems are the same every round."""
    data = RunConfig.model_validate(cfg).data
    files = local_files(data.dataset, data.split)
    return store_mod.fingerprint(
        STAGE,
        code=code_version(sys.modules[__name__], templates),
        config=data,
        content=content_hash(files) if files else None,
    )


def _summary(problems: pl.DataFrame, rejects: pl.DataFrame) -> str:
    counts = problems.group_by("source", "kind").agg(
        pl.len().alias("rows"), (pl.col("gold").list.len() == 0).sum().alias("no_gold")
    )
    lines = ["| source | kind | rows | no gold |", "|---|---|---|---|"]
    for r in counts.sort("source", "kind").iter_rows(named=True):
        lines.append(f"| {r['source']} | {r['kind']} | {r['rows']} | {r['no_gold']} |")
    reasons = Counter(rejects["reason"].to_list())
    lines += ["", f"rejected rows: {rejects.height}"] + [
        f"- {n} x {why}" for why, n in reasons.most_common(10)
    ]
    return "\n".join(lines)


def load_subset(data: DataConfig) -> pl.DataFrame:
    return subset(load_raw(data.dataset, data.split), data.limit, data.subset_seed)


@stage_task(STAGE, fingerprint_of)
def ingest_task(cfg: dict, upstream: dict[str, dict] | None = None, round_: int = 1) -> dict:
    """Load the dataset, write `problems` shards and `rejects.parquet`; the manifest lists the first rejects."""
    conf = RunConfig.model_validate(cfg)
    store = open_store(cfg, STAGE, fingerprint_of(cfg, upstream or {}, round_))
    if store.is_complete():
        return reuse_stage(store, round_)
    raw = load_subset(conf.data)
    problems, rejects = ingest(raw)
    if problems.is_empty():
        raise ValueError(
            f"dataset {conf.data.dataset!r} gave no usable rows out of {raw.height}; "
            f"first rejects: {rejects.head(5).to_dicts()}"
        )
    if rejects.height:
        logger().warning(
            "ingest: rejected %d of %d rows of %s, e.g. %s (all in %s)",
            rejects.height,
            raw.height,
            conf.data.dataset,
            "; ".join(f"row {r['row_index']}: {r['reason']}" for r in rejects.head(5).iter_rows(named=True)),
            store.dir / "rejects.parquet",
        )
    write_parquet_atomic(rejects, store.dir / "rejects.parquet")  # not part-*: never read as problems
    for i, chunk in enumerate(problems.iter_slices(SHARD_ROWS)):
        store.write_shard(i, chunk)
    return finish_stage(
        store,
        round_,
        rows_in=raw.height,
        summary=_summary(problems, rejects),
        dataset=conf.data.dataset,
        rejects=rejects.height,
        first_rejects=rejects.head(20).to_dicts(),
        no_gold=int((problems["gold"].list.len() == 0).sum()),
        kinds=dict(Counter(problems["kind"].to_list())),
    )
