"""tasks/ingest.py: the pure core on literal rows, bad rows that reject only themselves, sources and the
source datasets joined on local files in the hub schemas (tests/fixtures/sources), `variational data check`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tasks.ingest import (
    PROBLEMS_SCHEMA,
    _summary,
    check_dataset,
    data_files,
    embedded_path,
    ingest,
    load_and_ingest,
    load_raw,
    subset,
)
from variational.cli import main
from variational.config import DataConfig
from variational.templates import PI_SYSTEM

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sources"
STRATOS, STRATOS_SOURCE = str(FIXTURES / "stratos.jsonl"), str(FIXTURES / "stratos_source.jsonl")
AUX = {
    "numina": {"dataset": str(FIXTURES / "numina_all_subsets_formatted.jsonl")},
    "apps": {"dataset": str(FIXTURES / "apps_test.jsonl")},
    "taco": {"dataset": str(FIXTURES / "taco_subset.jsonl")},
    "ruc": {"dataset": str(FIXTURES / "long_form_thought_data_5k.jsonl")},
}


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


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- the pure core


def test_good_rows_parse() -> None:
    problems, rejects = ingest(pl.DataFrame([GOOD_MATH, GOOD_CODE]))
    assert rejects.is_empty()
    assert problems.schema == PROBLEMS_SCHEMA
    math, code = problems.to_dicts()
    assert math == {
        "prompt_idx": 0,
        "source": "unknown",  # the pure core sees no source column; load_and_ingest assigns sources
        "kind": "math",
        "question": "What is 2+3?",
        "think_ref": "2 plus 3 is 5.\n\n",
        "solution_ref": "\n\nSo $\\boxed{5}$.\n\n",
        "gold": ["5"],
        "tests": None,
    }
    assert code["kind"] == "code" and code["gold"] == [] and code["prompt_idx"] == 1


def test_source_gold_and_tests_columns_are_used() -> None:
    apps_json = json.dumps({"inputs": ["2\n", "3\n"], "outputs": ["4\n", "9\n"]}, separators=(",", ":"))
    rows = [
        {**GOOD_MATH, "source": "numina/7", "answer": "5.0", "tests": None},
        {**GOOD_MATH, "source": "ruc/1", "answer": None, "tests": None},
        {**GOOD_CODE, "source": "taco/3", "answer": None, "tests": apps_json},
    ]
    problems, rejects = ingest(pl.DataFrame(rows))
    assert rejects.is_empty()
    assert problems["source"].to_list() == ["numina/7", "ruc/1", "taco/3"]
    # explicit gold first, then the boxed answer of the solution (deduplicated)
    assert problems["gold"].to_list()[:2] == [["5.0", "5"], ["5"]]
    assert problems["tests"][2] == apps_json  # the input_output string byte for byte
    assert problems["kind"].to_list() == ["math", "math", "code"]


def test_list_tests_become_the_input_output_json() -> None:
    tests = [{"input": "2\n", "output": "4\n"}, {"input": "3\n", "output": "9\n"}]
    problems, _ = ingest(pl.DataFrame([{**GOOD_CODE, "tests": tests}]))
    assert json.loads(problems["tests"][0]) == {"inputs": ["2\n", "3\n"], "outputs": ["4\n", "9\n"]}


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


# ---------------------------------------------------------------- bad rows reject only themselves (issue 11 §8)


def test_a_string_conversations_rejects_only_its_row(tmp_path: Path) -> None:
    bad = {"system": "", "conversations": "user: hi / assistant: hello"}
    path = write_jsonl(tmp_path / "raw.jsonl", [GOOD_MATH, bad, GOOD_CODE])
    result = load_and_ingest(DataConfig(dataset=path, derive_sources=False))
    assert result.problems["prompt_idx"].to_list() == [0, 2]
    assert result.rejects.to_dicts() == [
        {
            "row_index": 1,
            "file": path,
            "file_row": 1,
            "reason": "conversations is a str, expected a list of {from, value} turns",
        }
    ]


def test_a_non_utf8_byte_rejects_only_its_line(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    lines = [json.dumps(r).encode() for r in (GOOD_MATH, GOOD_CODE, GOOD_MATH)]
    lines[1] = lines[1].replace(b"Read n", b"Read \xff n")
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = load_and_ingest(DataConfig(dataset=str(path), derive_sources=False))
    assert result.problems["prompt_idx"].to_list() == [0, 2]
    (reject,) = result.rejects.to_dicts()
    assert (reject["row_index"], reject["file"], reject["file_row"]) == (1, str(path), 1)
    assert reject["reason"].startswith("line 2: not UTF-8 (byte 0xff at offset")


def test_a_row_over_max_row_bytes_is_rejected(tmp_path: Path) -> None:
    huge = row("What is 2+3?", assistant("x" * 5_000_000, "$\\boxed{5}$"))
    path = write_jsonl(tmp_path / "raw.jsonl", [GOOD_MATH, huge])
    result = load_and_ingest(DataConfig(dataset=path, derive_sources=False))  # default: 1 MiB
    assert result.problems["prompt_idx"].to_list() == [0]
    assert result.rejects["reason"][0].startswith("row is 5,00")
    assert "over data.max_row_bytes=1,048,576" in result.rejects["reason"][0]
    roomy = load_and_ingest(DataConfig(dataset=path, derive_sources=False, max_row_bytes=10_000_000))
    assert roomy.rejects.is_empty() and roomy.problems.height == 2


def test_bad_rows_in_parquet_are_named_by_file_and_row(tmp_path: Path) -> None:
    folder = tmp_path / "snapshot" / "data"
    folder.mkdir(parents=True)
    pl.DataFrame([GOOD_MATH, GOOD_MATH]).write_parquet(folder / "train-00000-of-00002.parquet")
    pl.DataFrame([GOOD_MATH, row("q?", None)]).write_parquet(folder / "train-00001-of-00002.parquet")
    result = load_and_ingest(DataConfig(dataset=str(tmp_path / "snapshot"), derive_sources=False))
    assert result.rejects.to_dicts() == [
        {
            "row_index": 3,
            "file": str(folder / "train-00001-of-00002.parquet"),
            "file_row": 1,
            "reason": "no assistant turn",
        }
    ]


# ---------------------------------------------------------------- sources and source datasets (issue 10 §1-§2)


def test_sources_are_derived_from_prefixes_and_block_order() -> None:
    result = load_and_ingest(DataConfig(dataset=STRATOS))
    p = result.problems
    assert p["source"].to_list() == ["numina/?"] * 4 + ["apps/?"] * 3 + ["ruc/?"] * 2 + ["taco/?"] * 2
    assert p["kind"].to_list() == ["math"] * 4 + ["code"] * 3 + ["math"] * 2 + ["code"] * 2
    assert p.filter(pl.col("kind") == "code")["tests"].is_null().all()  # no index, so nothing to join
    # 11 rows are not the official 16,710: the summary says the counts were not checked, never silently
    assert result.report.problems == ["11 rows, not the official 16710: per-source counts not checked"]
    assert "| apps | 3 | 3299 |" in _summary(p, result.rejects, result.report)


def test_source_dataset_and_aux_give_gold_and_tests() -> None:
    conf = DataConfig(dataset=STRATOS, source_dataset=STRATOS_SOURCE, aux=AUX)
    result = load_and_ingest(conf)
    p = result.problems.sort("prompt_idx")
    assert p["source"].to_list()[:5] == ["numina/2", "numina/0", "numina/1", "numina/3", "apps/0"]
    assert result.report.problems == [] and result.report.aux["numina"]["joined"] == 4
    # math: the source's ground truth first, then the reference answer when it differs (the OR rule)
    assert p["gold"][2].to_list() == ["2k+2", "2+2k"]
    assert p["gold"][0].to_list() == ["1"]
    assert p.filter(pl.col("source").str.starts_with("ruc"))["gold"].to_list() == [["128"], ["109"]]
    # code: the source's input_output string unchanged, stdin and fn_name forms alike
    apps = read_jsonl(AUX["apps"]["dataset"])
    assert p["tests"][4] == apps[0]["input_output"]
    assert json.loads(p["tests"][6])["fn_name"] == "is_prime"
    taco = read_jsonl(AUX["taco"]["dataset"])
    assert p["tests"][9] == taco[0]["input_output"] and p["gold"][9].to_list() == []
    assert result.stats["no_tests"] == 0 and result.stats["no_gold"] == 0


def test_aux_loaded_from_a_parquet_snapshot_folder(tmp_path: Path) -> None:
    folder = tmp_path / "apps" / "data"
    folder.mkdir(parents=True)
    apps = pl.read_ndjson(AUX["apps"]["dataset"])
    apps.write_parquet(folder / "test-00000-of-00001.parquet")
    apps.head(1).write_parquet(folder / "train-00000-of-00001.parquet")  # the other split must not be read
    aux = {**AUX, "apps": {"dataset": str(tmp_path / "apps"), "split": "test"}}
    result = load_and_ingest(DataConfig(dataset=STRATOS, source_dataset=STRATOS_SOURCE, aux=aux))
    assert result.problems["tests"][5] == apps["input_output"][3]  # apps/3: the LeetCode-style row
    assert result.report.aux["apps"]["joined"] == 3


def test_misaligned_source_rows_and_bad_indices_are_counted_and_named(tmp_path: Path) -> None:
    rows = read_jsonl(STRATOS_SOURCE)
    rows[0], rows[1] = rows[1], rows[0]  # rows 0 and 1 now carry each other's source
    rows[7]["source"] = "ruc/99"  # past the end of the ruc dataset
    path = write_jsonl(tmp_path / "source.jsonl", rows)
    result = load_and_ingest(DataConfig(dataset=STRATOS, source_dataset=path, aux=AUX))
    assert "2 rows differ in question text from their source row: 0, 1" in result.report.problems
    assert result.report.aux["ruc"]["index out of range"] == 1
    assert result.problems["gold"][7].to_list() == ["128"]  # the reference answer still counts
    short = write_jsonl(tmp_path / "short.jsonl", rows[:5])
    with pytest.raises(ValueError, match="source_dataset has 5 rows but data.dataset has 11"):
        load_and_ingest(DataConfig(dataset=STRATOS, source_dataset=short))


def test_indexed_sources_without_aux_are_reported() -> None:
    result = load_and_ingest(
        DataConfig(dataset=STRATOS, source_dataset=STRATOS_SOURCE, aux={"ruc": AUX["ruc"]})
    )
    assert "3 apps rows have an index but no data.aux.apps: no tests" in result.report.problems
    assert result.stats["no_tests"] == 5


def test_subset_after_sources_keeps_derivation_and_rejects_consistent(tmp_path: Path) -> None:
    rows = read_jsonl(STRATOS)
    rows[3]["conversations"] = "broken"
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    full = load_and_ingest(DataConfig(dataset=path))
    part = load_and_ingest(DataConfig(dataset=path, limit=6, subset_seed=1))
    assert part.rows_in == 6 and part.problems.height + part.rejects.height == 6
    # sources were derived on the whole set, so a subset row keeps the source it has in the full run
    merged = part.problems.join(full.problems, on="prompt_idx", suffix="_full")
    assert (merged["source"] == merged["source_full"]).all()


def test_data_files_lists_every_local_input() -> None:
    conf = DataConfig(dataset=STRATOS, source_dataset=STRATOS_SOURCE, aux=AUX)
    names = {p.name for p in data_files(conf)}
    assert names == {"stratos.jsonl", "stratos_source.jsonl"} | {
        Path(a["dataset"]).name for a in AUX.values()
    }


# ---------------------------------------------------------------- loaders, embedded set, `variational data check`


def test_embedded_mini_set_ingests_cleanly() -> None:
    raw = load_raw("embedded:mini_stratos", "train")
    assert {"system", "conversations", "source"} <= set(raw.columns)
    result = load_and_ingest(DataConfig(dataset="embedded:mini_stratos"))
    assert result.rejects.is_empty(), result.rejects.to_dicts()
    assert result.problems.height >= 64
    assert (result.problems["gold"].list.len() > 0).all()
    sources = set(result.problems["source"].str.split("/").list.first())
    assert {"arith", "gsm8k", "ruc"} <= sources  # the set's own source column wins over derivation


def test_unknown_embedded_name_lists_shipped_sets() -> None:
    with pytest.raises(FileNotFoundError, match="mini_stratos"):
        embedded_path("embedded:nope")


def test_data_check_prints_counts_and_each_reject(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "raw.jsonl"
    lines = [json.dumps(r).encode() for r in (GOOD_MATH, {"system": "", "conversations": "x"}, GOOD_CODE)]
    path.write_bytes(
        b"\n".join([*lines, b'{"system": "\xfe"}', json.dumps(row("q?", None)).encode()]) + b"\n"
    )
    assert main(["data", "check", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["rows"], out["accepted"]) == (5, 2)
    assert [(r["index"], r["reason"].split(" (")[0]) for r in out["rejected"]] == [
        (1, "conversations is a str, expected a list of {from, value} turns"),
        (3, "line 4: not UTF-8"),
        (4, "no assistant turn"),
    ]
    assert main(["data", "check", str(path)]) == 1
    text = capsys.readouterr().out
    assert text.startswith(f"{path}: 5 rows, 2 accepted, 3 rejected") and f"row 4 ({path}, row 4)" in text
    assert main(["data", "check", STRATOS]) == 0
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2


def test_check_dataset_reads_a_hub_style_folder_through_datasets(tmp_path: Path) -> None:
    # the hub loader (`datasets.load_dataset`) on a local folder: the same call a hub id takes, offline
    from variational.data.raw import RawRows, _read_hub

    folder = tmp_path / "hub"
    folder.mkdir()
    pl.DataFrame([GOOD_MATH, GOOD_CODE, row("q?", None)]).write_parquet(folder / "train.parquet")
    rr = _read_hub(str(folder), "train", 1 << 20, {0, 2}, RawRows(str(folder)))
    assert rr.n_rows == 3 and [r["row_index"] for r in rr.rows] == [0, 2]
    assert check_dataset(str(folder)).as_json()["rejected"][0]["index"] == 2


def test_problems_stage_on_the_embedded_set(tmp_path: Path) -> None:
    """The stage through the runner: problems + the rejects side table, reused on a second call."""
    from tasks.ingest import PROBLEMS
    from variational.config import load_config
    from variational.pipeline.runner import run_stage

    cfg = load_config("tiny", [f"data_root={tmp_path}", "data.limit=5"]).model_dump(mode="json")
    ref = run_stage(PROBLEMS, cfg, {})
    assert ref["rows"] == 5 and ref["rows_in"] == 5
    assert [f["file"] for f in ref["files"]] == [
        "part-00000.parquet",
        "rejects.parquet",
        "shard_stats.parquet",
    ]
    assert run_stage(PROBLEMS, cfg, {}) == ref


# ---------------------------------------------------------------- nesting and empty data (issue 17 item 5)
def test_deeply_nested_rows_and_tests_reject_only_themselves(tmp_path: Path) -> None:
    """A RecursionError from one row (or from its `tests` JSON) killed the problems stage and `data check`."""
    deep_row = {**GOOD_MATH, "conversations": [{"from": "user", "value": "q"}], "x": "PLACEHOLDER"}
    deep_tests = {**GOOD_CODE, "tests": "[" * 100_000 + "]" * 100_000}
    lines = [json.dumps(r) for r in (GOOD_MATH, deep_row, deep_tests, GOOD_CODE)]
    lines[1] = lines[1].replace('"PLACEHOLDER"', "[" * 100_000 + "]" * 100_000)
    path = tmp_path / "raw.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = load_and_ingest(DataConfig(dataset=str(path), derive_sources=False))
    assert result.problems["prompt_idx"].to_list() == [0, 3]
    assert [(r["row_index"], r["reason"]) for r in result.rejects.to_dicts()] == [
        (1, "line 2: nested deeper than 100 levels of lists/objects"),
        (2, "tests: nested deeper than 100 levels of lists/objects"),
    ]
    check = check_dataset(str(path))
    assert (check.rows, check.accepted, check.rejects.height) == (4, 2, 2)


def test_data_check_deep_and_empty_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(GOOD_MATH) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "2 rows, 1 accepted, 1 rejected" in out and "line 2: nested deeper than 100 levels" in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "check", str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "no rows in" in captured.err
