"""variational/data/benchmarks.py: loading per grader (math, MMLU-Pro, GPQA, LiveCodeBench), prompts of the
harness, letter extraction, LCB tests -> APPS input_output, the paper's averages, the shipped eval sets."""

from __future__ import annotations

import base64
import json
import pickle
import random
import zlib
from pathlib import Path

import polars as pl
import pytest

from variational import parity, templates
from variational.config import BenchmarkConfig
from variational.data import benchmarks as bm

SHARED = Path("/work/shared/data")
MINI = bm.EMBEDDED_EVAL_DIR.parent / "mini_stratos.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- fixtures in the hub schemas (made up)


def gpqa_rows() -> list[dict]:
    """Idavidrein/gpqa (gpqa_diamond) schema; questions written for this test, nothing of GPQA itself."""
    return [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which toy particle has charge number {i}?",
            "Correct Answer": f"right-{i}",
            "Incorrect Answer 1": f"wrong-{i}-a",
            "Incorrect Answer 2": f"wrong-{i}-b",
            "Incorrect Answer 3": f"wrong-{i}-c",
            "Subdomain": "Toy physics",
        }
        for i in range(12)
    ]


def lcb_blob(tests: list[dict]) -> str:
    """private_test_cases as livecodebench/code_generation_lite stores it: base64(zlib(pickle(json str)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def lcb_rows() -> list[dict]:
    """livecodebench/code_generation_lite schema; problems written for this test."""
    stdin_public = [{"input": "3\n", "output": "6\n", "testtype": "stdin"}]
    stdin_private = [
        {"input": "1\n", "output": "2\n", "testtype": "stdin"},
        {"input": "10\n", "output": "20\n", "testtype": "stdin"},
    ]
    call_tests = [
        {"input": "[1, 2, 3]\n2", "output": "[2, 4, 6]", "testtype": "functional"},
        {"input": '"ab"\n3', "output": '"ababab"', "testtype": "functional"},
    ]
    base = {"platform": "atcoder", "contest_id": "x", "contest_date": "2024-01-01T00:00:00"}
    return [
        base
        | {
            "question_title": "Double",
            "question_content": "Read n and print 2n.",
            "question_id": "abc001_a",
            "starter_code": "",
            "difficulty": "easy",
            "public_test_cases": json.dumps(stdin_public),
            "private_test_cases": lcb_blob(stdin_private),
            "metadata": "{}",
        },
        base
        | {
            "question_title": "Repeat",
            "question_content": "Return xs repeated k times elementwise.",
            "question_id": "3001",
            "starter_code": "class Solution:\n    def repeat(self, xs, k):\n        ",
            "difficulty": "medium",
            "public_test_cases": json.dumps(call_tests[:1]),
            "private_test_cases": lcb_blob(call_tests),
            "metadata": json.dumps({"func_name": "repeat"}),
        },
    ]


# ---------------------------------------------------------------- math


def test_math_rows_get_the_boxed_instruction_and_golds(tmp_path: Path) -> None:
    rows = [
        {"id": "t-1", "problem": "1+1?", "answer": "2"},
        {"id": "t-2", "problem": "2+2?", "answer": 4.0},  # numbers become "4"
        {"id": "t-3", "problem": "x?", "answer": ["a", "b", "a"]},
    ]
    df = bm.load_benchmark("toy", BenchmarkConfig(path=str(write_jsonl(tmp_path / "t.jsonl", rows))))
    assert df.columns == ["problem_id", "problem", "user", "gold", "tests"]
    assert df["gold"].to_list() == [["2"], ["4"], ["a", "b"]]
    assert df["user"][0] == "Return your final response within \\boxed{}. 1+1?"
    assert df["user"][0] == templates.math_question("1+1?") and df["tests"].null_count() == 3


def test_load_benchmark_column_variants_parquet(tmp_path: Path) -> None:
    pl.DataFrame(
        {
            "question": ["q1", "q2", "q3"],
            "solution": ["so \\boxed{\\frac{1}{2}}", "steps #### 1,000", "none"],
            "final_answer": [None, None, ["7"]],
        }
    ).write_parquet(tmp_path / "b.parquet")
    df = bm.load_benchmark("b", BenchmarkConfig(path=str(tmp_path / "b.parquet")))
    assert df["problem_id"].to_list() == ["0", "1", "2"]  # no id column: the row index
    assert df["gold"].to_list() == [["\\frac{1}{2}"], ["1000"], ["7"]]  # final_answer wins over solution


def test_load_benchmark_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": "r1", "problem": "p", "answer": ""}])
    with pytest.raises(ValueError, match=r"rows without a gold answer.*r1"):
        bm.load_benchmark("a", BenchmarkConfig(path=str(tmp_path / "a.jsonl")))
    write_jsonl(tmp_path / "b.jsonl", [{"id": "r1", "text": "p", "answer": "1"}])
    with pytest.raises(ValueError, match="need a problem column"):
        bm.load_benchmark("b", BenchmarkConfig(path=str(tmp_path / "b.jsonl")))
    with pytest.raises(ValueError, match="lack \\['question', 'options', 'answer_index'\\]"):
        bm.load_benchmark("b", BenchmarkConfig(path=str(tmp_path / "a.jsonl"), grader="mmlu_pro"))
    monkeypatch.setattr(bm, "EMBEDDED_EVAL_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="have \\['a', 'b'\\]"):
        bm.load_benchmark("nope", BenchmarkConfig(path="embedded:nope"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        bm.load_benchmark("x", BenchmarkConfig(path=str(tmp_path / "missing.jsonl")))


def test_hub_loader_on_a_local_dataset_folder(tmp_path: Path) -> None:
    # the `datasets.load_dataset` path, offline: a folder with a test split in the hub's layout
    folder = tmp_path / "hubish"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"question": "Q", "answer": "Ducks... #### 18"}])
    df = bm.load_benchmark("g", BenchmarkConfig(path=str(folder)))
    assert df.row(0)[:4] == ("0", "Q", templates.math_question("Q"), ["18"])


def test_benchmark_hash_follows_content(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "problem": "p", "answer": "1"}])
    spec = BenchmarkConfig(path=str(f))
    h1 = bm.benchmark_hash(spec)
    write_jsonl(f, [{"id": "1", "problem": "p", "answer": "2"}])
    assert bm.benchmark_hash(spec) != h1
    assert bm.benchmark_hash(BenchmarkConfig(path="HuggingFaceH4/MATH-500")) == "hub:HuggingFaceH4/MATH-500"


# ---------------------------------------------------------------- multiple choice


@pytest.mark.skipif(not (SHARED / "mmlu_pro_test_stratified2000.jsonl").exists(), reason="no shared data")
def test_mmlu_pro_prompt_and_gold_on_real_rows() -> None:
    df = bm.load_benchmark("mmlu_pro", BenchmarkConfig(path="embedded:mmlu_pro-2000", grader="mmlu_pro"))
    raw = [json.loads(x) for x in (SHARED / "mmlu_pro_test_stratified2000.jsonl").read_text().splitlines()]
    assert df.height == 2000 == len(raw)
    assert df["gold"].to_list() == [[r["answer"]] for r in raw]  # answer_index -> the dataset's own letter
    first = raw[0]
    expect = f"{templates.MATH_INSTRUCTION} {first['question']}\nAnswer Choices: " + " ".join(
        f"({'ABCDEFGHIJ'[i]}) {o.strip()}" for i, o in enumerate(first["options"])
    )
    assert df["user"][0] == expect and df["problem_id"][0] == str(first["question_id"])


def test_gpqa_shuffle_is_seeded_per_question_and_tracks_the_right_answer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gpqa.jsonl", gpqa_rows())
    spec = BenchmarkConfig(path=str(path), grader="gpqa", shuffle_seed=0)
    df = bm.load_benchmark("gpqa", spec)
    for row in df.iter_rows(named=True):
        i = row["problem_id"].removeprefix("rec")
        assert row["user"].startswith(
            templates.GPQA_INSTRUCTION + f" Which toy particle has charge number {i}?\n"
        )
        letter = row["gold"][0]
        assert f"{letter}) right-{i}" in row["user"]  # the gold letter labels the correct answer
    assert len({g[0] for g in df["gold"].to_list()}) > 1  # the correct answer is not always in one place
    # the same seed gives the same order whatever the row order; another seed changes some orders
    reversed_path = write_jsonl(tmp_path / "rev.jsonl", gpqa_rows()[::-1])
    again = bm.load_benchmark("gpqa", BenchmarkConfig(path=str(reversed_path), grader="gpqa"))
    assert dict(zip(again["problem_id"], again["user"], strict=True)) == dict(
        zip(df["problem_id"], df["user"], strict=True)
    )
    other = bm.load_benchmark("gpqa", BenchmarkConfig(path=str(path), grader="gpqa", shuffle_seed=1))
    assert other["user"].to_list() != df["user"].to_list()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<|begin_of_solution|>So the answer is \\boxed{C}.<|end_of_solution|>", "C"),
        ("...<|begin_of_solution|>\\boxed{(B)}<|end_of_solution|>", "B"),
        ("<|begin_of_solution|>\\boxed{\\text{D}}<|end_of_solution|>", "D"),
        ("<|begin_of_solution|>\\boxed{A) 42}<|end_of_solution|>", "A"),
        ("I think A is wrong.<|begin_of_solution|>The answer is (B).<|end_of_solution|>", "B"),  # region
        ("<|begin_of_solution|>Answer: J<|end_of_solution|>", "J"),
        ("<|begin_of_solution|>Option E fits best.<|end_of_solution|>", "E"),  # last standalone letter
        ("<|begin_of_solution|>\\boxed{42}<|end_of_solution|>", None),  # boxed but no letter
        ("<|begin_of_solution|>It's unclear.<|end_of_solution|>", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_choice(text: str | None, expected: str | None) -> None:
    assert bm.extract_choice(text, bm.LETTERS["mmlu_pro"]) == expected


def test_extract_choice_respects_the_letters_of_the_benchmark() -> None:
    text = "<|begin_of_solution|>\\boxed{F}<|end_of_solution|>"
    assert bm.extract_choice(text, bm.LETTERS["mmlu_pro"]) == "F"
    assert bm.extract_choice(text, bm.LETTERS["gpqa"]) is None  # GPQA has A-D only


# ---------------------------------------------------------------- LiveCodeBench


def test_lcb_rows_become_apps_input_output(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lcb.jsonl", lcb_rows())
    df = bm.load_benchmark("lcb", BenchmarkConfig(path=str(path), grader="code"))
    stdin, call = df.row(0, named=True), df.row(1, named=True)
    # the private tests (as the harness grades), decoded from the hub's base64/zlib/pickle blob
    assert json.loads(stdin["tests"]) == {"inputs": ["1\n", "10\n"], "outputs": ["2\n", "20\n"]}
    assert json.loads(call["tests"]) == {
        "inputs": [[[1, 2, 3], 2], ["ab", 3]],
        "outputs": [[[2, 4, 6]], ["ababab"]],
        "fn_name": "repeat",
        # the raw texts, for the harness's own parser (the official column)
        "raw_inputs": ["[1, 2, 3]\n2", '"ab"\n3'],
        "raw_outputs": ["[2, 4, 6]", '"ababab"'],
    }
    assert stdin["user"] == f"{templates.CODE_STDIN_PREFIX} Read n and print 2n."
    assert call["user"].startswith(templates.CODE_CALL_PREFIX + " Return xs repeated")
    assert call["user"].endswith("\nclass Solution:\n    def repeat(self, xs, k):\n        ")
    assert stdin["gold"] == [] and stdin["problem_id"] == "abc001_a"
    medium = bm.load_benchmark("m", BenchmarkConfig(path=str(path), grader="code", difficulty="medium"))
    assert medium["problem_id"].to_list() == ["3001"]


def test_lcb_private_tests_refuse_code_in_the_pickle() -> None:
    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("/etc")))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        bm.decode_private_tests(evil)
    assert bm.decode_private_tests("") == []
    assert bm.decode_private_tests('[{"input": "1", "output": "2"}]') == [{"input": "1", "output": "2"}]


def test_lcb_release_version_picks_the_release_files(tmp_path: Path) -> None:
    folder = tmp_path / "code_generation_lite"
    folder.mkdir()
    first, second = lcb_rows()
    write_jsonl(folder / "test.jsonl", [first])
    write_jsonl(folder / "test2.jsonl", [second])
    v1 = BenchmarkConfig(path=str(folder), grader="code", release_version="release_v1")
    v2 = BenchmarkConfig(path=str(folder), grader="code", release_version="release_v2")
    assert bm.load_benchmark("lcb", v1)["problem_id"].to_list() == ["abc001_a"]
    assert bm.load_benchmark("lcb", v2)["problem_id"].to_list() == ["abc001_a", "3001"]
    with pytest.raises(ValueError, match="release_v9"):
        bm.load_benchmark(
            "lcb", BenchmarkConfig(path=str(folder), grader="code", release_version="release_v9")
        )


def test_release_and_difficulty_are_for_code_only() -> None:
    with pytest.raises(ValueError, match="grader 'code'"):
        BenchmarkConfig(path="x", difficulty="easy")


# ---------------------------------------------------------------- the paper's table and shipped sets


def test_group_average_reproduces_the_papers_averages() -> None:
    for column in ("paper BS-4B†", "paper Ours-Acc PB"):
        values = bm.PAPER_4B[column]
        assert bm.group_average(values, bm.MATH_AVG) == pytest.approx(values["Math avg"], abs=0.006)
        assert bm.group_average(values, bm.OTHER_AVG) == pytest.approx(values["Other avg"], abs=0.006)
    assert bm.group_average({"math500": 50.0}, bm.MATH_AVG) is None


def test_heldout_tiny_set_is_disjoint_from_the_training_set() -> None:
    heldout = bm.load_benchmark("heldout", BenchmarkConfig(path="embedded:heldout-tiny"))
    assert heldout.height == 50 and heldout["problem_id"].n_unique() == 50
    train = {
        " ".join(json.loads(x)["conversations"][0]["value"].removeprefix(templates.MATH_INSTRUCTION).split())
        for x in MINI.read_text().splitlines()
    }
    assert not {" ".join(p.split()) for p in heldout["problem"]} & train
    assert all(len(g) == 1 and g[0].lstrip("-").isdigit() for g in heldout["gold"].to_list())
    tiny = bm.load_benchmark("m", BenchmarkConfig(path="embedded:mmlu_pro-tiny", grader="mmlu_pro"))
    assert tiny.height == 8


# ---------------------------------------------------------------- parity official: the harness's prompts


def test_aime25_is_asked_question_first_in_official_parity() -> None:
    spec = BenchmarkConfig(path="embedded:aime25")
    official = bm.load_benchmark("aime25", spec, parity.OFFICIAL_PROMPTS)
    problem = official["problem"][0]
    assert official["user"][0] == problem + "\nReturn your final response within \\boxed{}"  # the fork's form
    assert (
        bm.load_benchmark("aime25", spec)["user"][0]
        == "Return your final response within \\boxed{}. " + problem
    )
    # only AIME25: the other math sets keep the instruction first in official parity too
    aime24 = bm.load_benchmark("aime24", BenchmarkConfig(path="embedded:aime24"), parity.OFFICIAL_PROMPTS)
    assert aime24["user"][0].startswith(templates.MATH_INSTRUCTION + " ")


def test_gpqa_harness_order_is_one_seed_41_stream_in_file_order(tmp_path: Path) -> None:
    rows = gpqa_rows()
    spec = BenchmarkConfig(path=str(write_jsonl(tmp_path / "gpqa.jsonl", rows)), grader="gpqa")
    df = bm.load_benchmark("gpqa", spec, parity.OFFICIAL_PROMPTS)
    harness = random.Random(41)  # skythought evaluate: set_seed(41), then random.shuffle per problem
    for row, r in zip(df.iter_rows(named=True), rows, strict=True):
        shown = [
            r["Correct Answer"],
            r["Incorrect Answer 1"],
            r["Incorrect Answer 2"],
            r["Incorrect Answer 3"],
        ]
        harness.shuffle(shown)
        assert row["user"].endswith("\n" + ", ".join(f"{c}) {o}" for c, o in zip("ABCD", shown, strict=True)))
        assert row["gold"] == ["ABCD"[shown.index(r["Correct Answer"])]]
    # one stream: a question's order depends on the rows before it (the per-question order does not)
    rev = write_jsonl(tmp_path / "rev.jsonl", rows[::-1])
    again = bm.load_benchmark("gpqa", BenchmarkConfig(path=str(rev), grader="gpqa"), parity.OFFICIAL_PROMPTS)
    assert dict(zip(again["problem_id"], again["user"], strict=True)) != dict(
        zip(df["problem_id"], df["user"], strict=True)
    )


def test_lcb_official_prompt_has_no_starter_code(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lcb.jsonl", lcb_rows())
    df = bm.load_benchmark("lcb", BenchmarkConfig(path=str(path), grader="code"), parity.OFFICIAL_PROMPTS)
    assert df["user"][1] == f"{templates.CODE_CALL_PREFIX} Return xs repeated k times elementwise."
    assert df["user"][0] == f"{templates.CODE_STDIN_PREFIX} Read n and print 2n."


@pytest.mark.parametrize(
    ("text", "gpqa", "ours"),
    [
        ("<|begin_of_solution|>\\boxed{B}<|end_of_solution|>", "B", "B"),
        # the whole response upper-cased: the English "a" after the boxed answer is the letter A
        ("<|begin_of_solution|>\\boxed{B}, a safe bet.<|end_of_solution|>", "A", "B"),
        ("I first thought C.<|begin_of_solution|>It is D<|end_of_solution|>", "D", "D"),
        ("Between (a) and (c), (c) wins.", "C", None),  # lower-case letters count only officially
        ("no letter here", None, None),
    ],
)
def test_official_gpqa_reader(text: str, gpqa: str | None, ours: str | None) -> None:
    assert bm.official_choice(text, "gpqa") == gpqa
    assert bm.extract_choice(text, bm.LETTERS["gpqa"]) == ours


@pytest.mark.parametrize(
    ("text", "mmlu", "ours"),
    [
        # "answer is (X)" anywhere wins over an earlier "Answer: X" line and over \boxed
        ("Answer: C\nOn reflection the answer is (D).\n\\boxed{E}", "D", "E"),
        ("the answer is (B)... no, the answer is (C)", "B", "C"),  # the FIRST "answer is"
        ("the answer is Bxyz", "B", None),  # no word boundary after the letter
        ("Answer: C\nAnswer: D", "C", "D"),  # the first "Answer: X" line
        ("The Answer:F seems right", "F", "F"),
        ("I pick G over H.", "H", "H"),  # else the last standalone A-J ("I" counts too)
        ("\\boxed{G}. I am sure.", "I", "G"),  # never \boxed: the pronoun I is the last A-J
        ("nothing", None, None),
    ],
)
def test_official_mmlu_pro_reader(text: str, mmlu: str | None, ours: str | None) -> None:
    assert bm.official_choice(text, "mmlu_pro") == mmlu
    assert bm.extract_choice(text, bm.LETTERS["mmlu_pro"]) == ours
