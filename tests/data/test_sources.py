"""variational/data/sources.py: sources derived from the public rows, the source dataset's alignment, the aux join."""

from __future__ import annotations

import json

import polars as pl

from variational.data.sources import (
    AUX_SCHEMA,
    CODE_PREFIX,
    NUMINA_PREFIX,
    OFFICIAL_COUNTS,
    SourceReport,
    align_source_dataset,
    aux_fields,
    derive_sources,
    join_aux,
    parse_source,
    same_question,
)

STDIN = (
    CODE_PREFIX
    + " The function should take stdin as input and print the output. Simply call the function after the definition."
)


def frame(questions: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"prompt_idx": range(len(questions)), "question": questions})


def official_order() -> list[str]:
    """16,710 questions in the curator's concatenation order: numina, apps, ruc (STILL-2), taco."""
    c = OFFICIAL_COUNTS
    return (
        [NUMINA_PREFIX + "x"] * c["numina"]
        + [STDIN + "p\n"] * c["apps"]
        + ["Why is the sky blue?"] * c["ruc"]
        + [STDIN + "q\n"] * c["taco"]
    )


def test_parse_source_forms() -> None:
    assert parse_source("apps/45") == ("apps", 45)
    assert parse_source("taco/?") == ("taco", None)
    assert parse_source("arith/3") == (None, None) and parse_source(None) == (None, None)


def test_derivation_matches_the_official_counts_in_official_order() -> None:
    sources, report = derive_sources(frame(official_order()))
    assert report.counts == OFFICIAL_COUNTS and report.problems == []
    assert sources[0] == "numina/?" and sources[10_500] == "apps/?" and sources[-1] == "taco/?"


def test_a_code_row_inside_the_ruc_block_is_unassigned_counted_and_named() -> None:
    questions = official_order()
    start = OFFICIAL_COUNTS["numina"] + OFFICIAL_COUNTS["apps"]
    questions[start + 5] = STDIN + "stray\n"  # a code row in the middle of the ruc block
    sources, report = derive_sources(frame(questions))
    assert sources[start + 5] == "code/?"
    assert (
        report.problems[0]
        == f"1 code rows inside the ruc block, apps vs taco unknown (source 'code/?'): rows {start + 5}"
    )
    assert "ruc: 814 rows derived, official count 815" in report.problems


def test_no_ruc_block_leaves_every_code_row_unassigned() -> None:
    sources, report = derive_sources(frame([NUMINA_PREFIX + "a", STDIN + "b\n", STDIN + "c\n"]))
    assert sources.to_list() == ["numina/?", "code/?", "code/?"]
    assert report.problems[0].startswith("2 code rows and no ruc block, apps vs taco unknown")


def test_same_question_ignores_prefix_starter_code_and_whitespace() -> None:
    assert same_question(STDIN + "Sum  two\nnumbers.\ndef f():\n", "Sum two numbers.")
    assert same_question(NUMINA_PREFIX + "Find x.", "Find x.")
    assert not same_question(NUMINA_PREFIX + "Find x.", "Find y.")
    assert not same_question("", "")


def test_source_dataset_rows_align_by_index_and_mismatches_are_named() -> None:
    problems = frame([NUMINA_PREFIX + "Find x.", "Why?", STDIN + "Sum.\n"])
    source_rows = pl.DataFrame(
        {
            "row_index": [0, 1, 2],
            "source": ["numina/9", "ruc/2", "apps/bad"],
            "question": ["Find x.", "How?", "Sum."],
        }
    )
    sources, report = align_source_dataset(problems, source_rows, 3, 3)
    assert sources.to_list() == ["numina/9", "ruc/2", "apps/bad"]
    assert "1 rows differ in question text from their source row: 1" in report.problems
    assert "1 sources are not '<numina|apps|taco|ruc>/<index>': 2" in report.problems


def test_aux_fields_follow_the_official_schemas() -> None:
    numina = {"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$", "answer": "0.5", "messages": []}
    assert aux_fields("numina", numina)["gold"] == "\\frac{1}{2}"  # the boxed answer, as extract_answer
    assert aux_fields("numina", {**numina, "solution": "no box"})["gold"] == "0.5"
    ruc = {"question": "q", "combined_text": "<|begin_of_thought|>t $\\boxed{3}$", "domain": "puzzle"}
    assert aux_fields("ruc", ruc) == {"question": "q", "gold": "3", "tests": None}
    io = json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [[2]]})
    assert aux_fields("apps", {"question": "q", "input_output": io})["tests"] == io
    assert aux_fields("taco", {"question": "q", "input_output": None})["tests"] is None


def test_join_aux_counts_every_failure_per_source() -> None:
    problems = pl.DataFrame(
        {
            "source": ["numina/0", "numina/5", "numina/1", "apps/0", "numina/?", "arith/1"],
            "question": [
                NUMINA_PREFIX + "A",
                NUMINA_PREFIX + "B",
                NUMINA_PREFIX + "C",
                STDIN + "D\n",
                "E",
                "F",
            ],
            "gold": [["1"], ["2"], ["3"], [], ["5"], ["6"]],
            "tests": [None] * 6,
        },
        schema_overrides={"gold": pl.List(pl.String), "tests": pl.String},
    )
    aux = {
        "numina": pl.DataFrame(
            {
                "source_index": [0, 1],
                "question": ["A", "Z"],
                "gold": ["1.0", None],
                "tests": [None, None],
            },
            schema=AUX_SCHEMA,
        ),
        "apps": pl.DataFrame(
            {
                "source_index": [0],
                "question": ["D"],
                "gold": [None],
                "tests": ['{"inputs": [], "outputs": []}'],
            },
            schema=AUX_SCHEMA,
        ),
    }
    report = SourceReport("test")
    out = join_aux(problems, aux, report)
    assert out["gold"].to_list() == [["1.0", "1"], ["2"], ["3"], [], ["5"], ["6"]]
    assert out["tests"][3] == '{"inputs": [], "outputs": []}'
    assert dict(report.aux["numina"]) == {
        "joined": 2,
        "index out of range": 1,
        "question differs": 1,
        "no ground truth": 1,
    }
    assert report.problems == ["aux numina: 1 indices out of range, 1 questions differ from the source row"]
