"""tasks/ingest.py: the pure core on literal rows, every reject reason, the loaders, the embedded mini set."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tasks.ingest import PROBLEMS_SCHEMA, embedded_path, fingerprint_of, ingest, ingest_task, load_raw, subset
from variational.config import DataConfig, RunConfig
from variational.store import read_stage
from variational.templates import PI_SYSTEM


def assistant(think: str, solution: str) -> str:
    return (
        f"<|begin_of_thought|>\n\n{think}\n\n<|end_of_thought|>\n\n"
        f"<|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>"
    )


def row(question: str | None, answer: str | None, **extra: object) -> dict:
    turns = []
    if question is not None:
        turns.append({"from": "user", "value": question})
    if answer is not None:
        turns.append({"from": "assistant", "value": answer})
    return {"system": PI_SYSTEM, "conversations": turns, **extra}


GOOD_MATH = row("What is 2+3?", assistant("2 plus 3 is 5.", "So $\\boxed{5}$."))
GOOD_CODE = row(
    "Read n and print n squared.",
    assistant("Read, square, print.", "```python\nn = int(input())\nprint(n * n)\n```"),
)


def test_good_rows_parse() -> None:
    problems, rejects = ingest(pl.DataFrame([GOOD_MATH, GOOD_CODE]))
    assert rejects.is_empty()
    assert problems.schema == PROBLEMS_SCHEMA
    math, code = problems.to_dicts()
    assert math == {
        "prompt_idx": 0,
        "source": "unknown",  # the public dataset has no source column
        "kind": "math",
        "question": "What is 2+3?",
        "think_ref": "2 plus 3 is 5.\n\n",
        "solution_ref": "\n\nSo $\\boxed{5}$.\n\n",
        "gold": ["5"],
        "tests": [],
    }
    assert code["kind"] == "code" and code["gold"] == [] and code["prompt_idx"] == 1


def test_source_gold_and_tests_columns_are_used() -> None:
    rows = [
        {**GOOD_MATH, "source": "numina/7", "answer": "5.0", "tests": None},
        {**GOOD_MATH, "source": "ruc/1", "answer": None, "tests": None},
        {
            **GOOD_CODE,
            "source": "taco/3",
            "answer": None,
            "tests": json.dumps({"inputs": ["2\n", "3\n"], "outputs": ["4\n", "9\n"]}),
        },
    ]
    problems, rejects = ingest(pl.DataFrame(rows))
    assert rejects.is_empty()
    assert problems["source"].to_list() == ["numina/7", "ruc/1", "taco/3"]
    # explicit gold first, then the boxed answer of the solution (deduplicated)
    assert problems["gold"].to_list()[:2] == [["5.0", "5"], ["5"]]
    assert problems["tests"][2].to_list() == [
        {"input": "2\n", "output": "4\n"},
        {"input": "3\n", "output": "9\n"},
    ]
    assert problems["kind"].to_list() == ["math", "math", "code"]


def test_math_without_gold_is_kept_with_empty_gold() -> None:
    problems, rejects = ingest(
        pl.DataFrame([row("Why is the sky blue?", assistant("Rayleigh.", "Scattering."))])
    )
    assert rejects.is_empty()
    assert problems["gold"].to_list() == [[]] and problems["kind"][0] == "math"


BAD = [
    (row("q?", None), "no assistant turn"),
    (row(None, assistant("t", "s")), "no user question"),
    (row("  ", assistant("t", "s")), "no user question (empty user turn)"),
    (
        {
            "system": "",
            "conversations": [{"from": "assistant", "value": "a"}, {"from": "user", "value": "q"}],
        },
        "turns are ['assistant', 'user'], expected ['user', 'assistant']",
    ),
    (
        row("q?", "<|begin_of_thought|>\n\nt<|begin_of_solution|>s<|end_of_solution|>"),
        "missing <|end_of_thought|>",
    ),
    (
        row("q?", "<|begin_of_solution|>s<|end_of_solution|><|begin_of_thought|>t<|end_of_thought|>"),
        "out of order",
    ),
    (row("q?", assistant("t", "s").replace("<|end_of_solution|>", "")), "missing <|end_of_solution|>"),
    (row("q?", assistant("", "s").replace("\n\n\n\n", "\n\n")), "empty think span"),
    (row("q?", "   "), "empty assistant turn"),
    ({"system": "", "conversations": []}, "no conversations"),
]


def test_each_malformed_row_is_rejected_with_index_and_reason() -> None:
    rows = [GOOD_MATH] + [bad for bad, _ in BAD] + [GOOD_MATH]
    problems, rejects = ingest(pl.DataFrame(rows))
    assert problems["prompt_idx"].to_list() == [0, len(rows) - 1]
    assert rejects["row_index"].to_list() == list(range(1, len(BAD) + 1))
    for reason, (_, expected) in zip(rejects["reason"].to_list(), BAD, strict=True):
        assert expected in reason


def test_bad_tests_are_rejected() -> None:
    rows = [
        {**GOOD_CODE, "tests": "{not json"},
        {**GOOD_CODE, "tests": json.dumps({"inputs": ["1"], "outputs": []})},
    ]
    problems, rejects = ingest(pl.DataFrame(rows))
    assert problems.is_empty()
    assert "not valid JSON" in rejects["reason"][0] and "1 inputs but 0 outputs" in rejects["reason"][1]


def test_missing_conversations_column_names_the_schema() -> None:
    with pytest.raises(ValueError, match="no `conversations` column"):
        ingest(pl.DataFrame({"question": ["q"]}))


def test_subset_keeps_raw_row_index_and_is_deterministic() -> None:
    raw = pl.DataFrame([GOOD_MATH] * 20)
    a, b = subset(raw, 5, seed=3), subset(raw, 5, seed=3)
    assert a["row_index"].to_list() == b["row_index"].to_list()
    assert a["row_index"].to_list() != list(range(5))  # shuffled (20!/15! orders: fixed seed)
    problems, _ = ingest(a)
    assert problems["prompt_idx"].to_list() == sorted(a["row_index"].to_list())
    assert subset(raw, 4, seed=None)["row_index"].to_list() == [0, 1, 2, 3]


def test_embedded_mini_set_ingests_cleanly() -> None:
    raw = load_raw("embedded:mini_stratos", "train")
    assert {"system", "conversations", "source"} <= set(raw.columns)
    problems, rejects = ingest(subset(raw, None, None))
    assert rejects.is_empty(), rejects.to_dicts()
    assert problems.height >= 64
    assert (problems["gold"].list.len() > 0).all()
    sources = set(problems["source"].str.split("/").list.first())
    assert {"arith", "gsm8k", "ruc"} <= sources


def test_unknown_embedded_name_lists_shipped_sets() -> None:
    with pytest.raises(FileNotFoundError, match="mini_stratos"):
        embedded_path("embedded:nope")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "folder"])
def test_local_files_load_through_datasets(tmp_path: Path, fmt: str) -> None:
    frame = pl.DataFrame([GOOD_MATH, GOOD_CODE, row("q?", None)])
    if fmt == "jsonl":
        path = tmp_path / "raw.jsonl"
        frame.write_ndjson(path)
    else:
        folder = tmp_path / "snapshot" / "data"
        folder.mkdir(parents=True)
        path = tmp_path / "raw.parquet" if fmt == "parquet" else tmp_path / "snapshot"
        frame.write_parquet(path if fmt == "parquet" else folder / "train-00000-of-00001.parquet")
        if fmt == "folder":  # another split in the same snapshot must not leak in
            frame.head(1).write_parquet(folder / "test-00000-of-00001.parquet")
    raw = load_raw(str(path), "train")
    assert raw.height == 3
    problems, rejects = ingest(raw)
    assert problems.height == 2 and rejects.to_dicts() == [{"row_index": 2, "reason": "no assistant turn"}]


def task_cfg(root: Path, dataset: str, **data: object) -> dict:
    conf = RunConfig(
        name="t", data_root=str(root), base_model="none", data=DataConfig(dataset=dataset, **data)
    )
    return conf.model_dump()


def test_task_writes_problems_rejects_and_manifest(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    pl.DataFrame([GOOD_MATH, row("q?", None), GOOD_CODE]).write_ndjson(raw)
    cfg = task_cfg(tmp_path, str(raw))
    m = ingest_task.fn(cfg, {})
    assert (m["stage"], m["rows"], m["rows_in"], m["rejects"]) == ("ingest", 2, 3, 1)
    assert m["first_rejects"] == [{"row_index": 1, "reason": "no assistant turn"}]
    assert m["kinds"] == {"math": 1, "code": 1} and m["no_gold"] == 1  # the code row has tests, not gold
    folder = Path(m["path"])
    assert read_stage(m)["prompt_idx"].to_list() == [0, 2]  # rejects.parquet is not read as problems
    assert pl.read_parquet(folder / "rejects.parquet").to_dicts() == m["first_rejects"]
    assert ingest_task.fn(cfg, {}) == m  # complete: reused, not recomputed

    # the fingerprint follows the data config and the content of a local file
    assert fingerprint_of(task_cfg(tmp_path, str(raw), limit=1), {}) != m["fingerprint"]
    pl.DataFrame([GOOD_MATH]).write_ndjson(raw)
    assert fingerprint_of(cfg, {}) != m["fingerprint"]
    assert fingerprint_of(cfg, {}) == fingerprint_of(cfg, {}, round_=2)  # problems do not change per round


def test_task_fails_when_every_row_is_rejected(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    pl.DataFrame([row("q?", None)]).write_ndjson(raw)
    with pytest.raises(ValueError, match="no usable rows.*no assistant turn"):
        ingest_task.fn(task_cfg(tmp_path, str(raw)), {})
