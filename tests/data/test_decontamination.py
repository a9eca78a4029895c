"""variational/data/decontamination.py: normalisation, the n-gram matcher (a planted AIME24 problem under a new
lead-in is found; boilerplate is not), the shipped benchmark sets, and the shipped mini set's real overlaps."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tasks.ingest import ingest, load_raw
from variational import registry
from variational.config import BenchmarkConfig
from variational.data import decontamination as dc
from variational.data.benchmarks import EMBEDDED_EVAL_DIR


def texts(*rows: tuple[int, str, str]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=dc.TEXT_SCHEMA, orient="row")


def refs(*rows: tuple[str, str, str]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=dc.REFERENCE_SCHEMA, orient="row")


@pytest.fixture(scope="module")
def shipped() -> pl.DataFrame:
    """Every problem of every shipped reference set."""
    return dc.reference_problems(dc.reference_specs(list(registry.REFERENCE_SETS), {}))


def aime24(problem_id: str) -> str:
    rows = [json.loads(line) for line in (EMBEDDED_EVAL_DIR / "aime24-full.jsonl").read_text().splitlines()]
    return next(r["problem"] for r in rows if r["id"] == problem_id)


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Find $m+n$.", "find m n"),
        (r"Let $F(z)=\dfrac{z+i}{z-i}$ for $z\neq i$", "let f z frac z i z i for z ne i"),
        (r"\left( \frac{1}{2} \right) \cdot 3", "frac 1 2 cdot 3"),
        (r"$x \leftarrow y$ \quad and \Big| z \Big|", "x leftarrow y and z"),  # \leftarrow is not \left
        (r"$12\text{ cm}$ and $\mathrm{kg}$, \ldots", "12 cm and kg dots"),
        ("ＦＵＬＬ\u00a0width — dash’s", "full width dash s"),  # NFKC, lower case, punctuation
        ("  a\n\tb  ", "a b"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert dc.normalise(text) == expected


def test_two_spellings_of_one_problem_normalise_alike() -> None:
    a = r"Let $f(x)=|x-p|+|x-15|+|x-p-15|$, where $0 < p < 15$."
    b = r"Let $f(x)=|x-p|+|x-15|+|x-p-15|,$ where  $0 < p < 15.$"
    assert dc.normalise(a) == dc.normalise(b)


# ---------------------------------------------------------------- n-grams


def test_ngrams_never_span_two_texts() -> None:
    words = dc.Words(pl.Series(["a b c", "d e", "f g h i"]))
    grams = dc.ngram_hashes(words, 3)
    assert grams.select("t", "pos").rows() == [(0, 0), (2, 0), (2, 1)]
    again = dc.ngram_hashes(dc.Words(pl.Series(["x", "f g h"])), 3)
    assert again["gram"][0] == grams["gram"][1]  # the same words hash the same in any text


def test_too_short_counts_problems_without_an_ngram() -> None:
    r = refs(("b", "1", "one two three"), ("b", "2", "one two three four five six seven eight"))
    assert dc.too_short(r, 8).rows() == [("b", 1)]


# ---------------------------------------------------------------- the matcher


def test_a_planted_aime24_problem_under_a_new_lead_in_is_found(shipped: pl.DataFrame) -> None:
    planted = "Here is a puzzle a friend gave me on the train this morning. " + aime24("aime24-65")
    train = texts(
        (0, "question", "What is 2 + 3? Return your final response within \\boxed{}."),
        (7, "question", planted),
        (7, "solution", "The distance is $\\boxed{104}$."),
        (9, "solution", "We add the two numbers and get $\\boxed{5}$."),
    )
    found = dc.find_contamination(train, shipped)
    assert found.select("prompt_idx", "benchmark", "problem_id", "field", "n").rows() == [
        (7, "aime24", "aime24-65", "question", 13)
    ]
    assert found["overlap"][0] == 1.0 and found["ngram"][0].startswith("let abcd be a tetrahedron")


def test_an_edited_copy_is_found_at_the_smaller_n() -> None:
    """20 words, the 15th changed: 2 of 8 13-grams survive (0.25), 7 of 13 8-grams do (0.54)."""
    original = "Tom buys 3 red pens and 4 blue pens at the shop near the school before lunch on Monday today"
    edited = original.replace("school", "park")
    reference = refs(("toy", "p1", original))
    found = dc.find_contamination(texts((1, "question", edited)), reference, (13, 8), 0.5)
    assert found.select("n", "shared").row(0) == (8, 7) and found["overlap"][0] == pytest.approx(7 / 13)
    assert dc.find_contamination(texts((1, "question", edited)), reference, (13,), 0.5).is_empty()
    short = "Tom buys 3 red pens and 4 blue pens at the shop"  # 12 words: no 13-gram at all
    found = dc.find_contamination(texts((2, "question", f"Q: {short}?")), refs(("toy", "p2", short)))
    assert found.select("n", "overlap").row(0) == (8, 1.0)


def test_shared_boilerplate_alone_is_not_contamination(shipped: pl.DataFrame) -> None:
    """AIME's closing sentence (about a third of a 60-word problem's n-grams) under another problem."""
    own = (
        "A jar holds red and green marbles in the ratio of seven to four. Two marbles are drawn without "
        "replacement. The probability that both are green can be written as $\\frac{m}{n}$, where $m$ and "
        "$n$ are relatively prime positive integers. Find $m+n$."
    )
    assert dc.find_contamination(texts((3, "question", own)), shipped).is_empty()


def test_the_match_is_reported_once_per_row_and_problem_at_its_best() -> None:
    problem = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron"
    train = texts(
        (5, "solution", f"so {problem} ends"), (5, "question", problem[:60]), (6, "question", "pi rho")
    )
    found = dc.find_contamination(train, refs(("greek", "g1", problem)), (13, 8), 0.3)
    assert found.select("prompt_idx", "field", "n", "overlap").rows() == [(5, "solution", 13, 1.0)]
    assert found["ngram"][0] == "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"
    assert dc.find_contamination(train, refs(("greek", "g1", problem)), (13, 8), 0.3).equals(found)  # pure


def test_empty_inputs_and_bad_settings() -> None:
    empty = dc.find_contamination(texts(), refs(("b", "1", "a b c d e f g h i j k l m n")))
    assert empty.is_empty() and empty.schema == pl.Schema(dc.CONTAMINATION_SCHEMA)
    with pytest.raises(ValueError, match="min_overlap"):
        dc.find_contamination(texts(), refs(), (8,), 0)
    with pytest.raises(ValueError, match="ngrams"):
        dc.find_contamination(texts(), refs(), (), 0.5)


# ---------------------------------------------------------------- the shipped sets


def test_every_reference_set_of_the_registry_is_shipped_in_full(shipped: pl.DataFrame) -> None:
    assert tuple(dc.REFERENCE_FILES) == registry.REFERENCE_SETS
    sizes = dict(shipped.group_by("benchmark").len().iter_rows())
    assert sizes == {
        "aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "olympiadbench": 675, "minerva": 272,
        "gsm8k": 1319, "mmlu_pro": 2000, "heldout-tiny": 50,
    }  # fmt: skip


def test_reference_specs_merge_the_evaluated_benchmarks() -> None:
    evaluated = {
        "aime24": BenchmarkConfig(path="embedded:aime24-full", k=32, limit=3),  # = the shipped set
        "mmlu_pro": BenchmarkConfig(path="embedded:mmlu_pro-tiny", grader="mmlu_pro"),  # other content
    }
    specs = dc.reference_specs(["aime24", "mmlu_pro", "gsm8k"], evaluated)
    assert list(specs) == ["aime24", "mmlu_pro", "mmlu_pro-2000", "gsm8k"]
    assert specs["aime24"].limit is None  # every row is checked, not only those evaluated
    ident = dc.reference_identity(specs)
    assert dc.reference_identity(dc.reference_specs(["aime24"], {})) == {"aime24": ident["aime24"]}
    evaluated["aime24"].k = 1  # how often a problem is sampled does not change what is checked
    assert dc.reference_identity(dc.reference_specs(["aime24", "mmlu_pro", "gsm8k"], evaluated)) == ident


def test_an_unloadable_benchmark_stops_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"benchmark 'mine' \(.*missing.jsonl\) could not be loaded") as err:
        dc.reference_problems({"mine": BenchmarkConfig(path=str(tmp_path / "missing.jsonl"))})
    assert "\n" not in str(err.value)


def test_the_mini_set_is_clean_but_for_its_gsm8k_test_items(shipped: pl.DataFrame) -> None:
    """Against every shipped set but GSM8K the mini set is clean; its 24 gsm8k/ rows ARE GSM8K test items
    (LICENSES.md), and exactly those are found, each matched to its own GSM8K id, nothing else."""
    problems, _ = ingest(load_raw("embedded:mini_stratos"))
    train = pl.concat(
        [
            problems.select("prompt_idx", field=pl.lit("question"), text="question"),
            problems.select("prompt_idx", field=pl.lit("solution"), text="solution_ref"),
        ]
    )
    found = dc.find_contamination(train, shipped)
    assert not found.filter(pl.col("benchmark") != "gsm8k").height
    gsm8k = problems.filter(pl.col("source").str.starts_with("gsm8k/"))
    expected = {(p, s.removeprefix("gsm8k/")) for p, s in gsm8k.select("prompt_idx", "source").iter_rows()}
    assert len(expected) == 24 and set(found.select("prompt_idx", "problem_id").iter_rows()) == expected
    assert (found["overlap"] == 1.0).all()
