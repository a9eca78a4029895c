"""variational/analysis/cards.py: front matter the Hub reads, licences, lineage and config sections."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
import yaml

from variational.analysis import cards
from variational.config import load_config

REPO = Path(__file__).resolve().parents[2]


def config(name: str = "tiny", *sets: str) -> dict:
    return load_config(name, [*sets, "data_root=/home/someone/secret-place"]).model_dump(mode="json")


def facts(cfg: dict, **kw) -> cards.CardFacts:
    base = {
        "run": "r",
        "stage": "train",
        "round": 1,
        "config": cfg,
        "rows": 12,
        "columns": {"messages": "List"},
    }
    return cards.CardFacts(**(base | kw))


def meta(card: str) -> dict:
    head = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert head, card[:200]
    return yaml.safe_load(head.group(1))


def test_size_categories_follow_the_hub_buckets() -> None:
    assert [cards.size_category(n) for n in (0, 999, 1000, 33_420, 100_000, 5_000_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "100K<n<1M",
        "n>1M",
    ]


def test_dataset_front_matter_names_files_license_and_categories() -> None:
    card = cards.dataset_card(facts(config(), fmt="messages"))
    m = meta(card)
    assert m["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
    ]
    assert m["license"] == ["apache-2.0", "mit"]  # mini_stratos: project rows + GSM8K
    assert m["task_categories"] == ["text-generation"] and m["size_categories"] == ["n<1K"]
    assert "source_datasets" not in m  # an embedded set has no Hub id
    full = meta(cards.dataset_card(facts(config("full-17k"), rows=33_420)))
    assert full["license"] == "apache-2.0" and full["size_categories"] == ["10K<n<100K"]
    assert full["source_datasets"][0] == "bespokelabs/Bespoke-Stratos-17k"
    assert "zhouxiangxin/Bespoke-Stratos-17k-Source" in full["source_datasets"]


def test_licences_agree_with_the_shipped_licence_file() -> None:
    text = (REPO / "variational" / "data" / "LICENSES.md").read_text()
    section = text.split("## mini_stratos.jsonl", 1)[1].split("\n## ", 1)[0]
    for licence in cards.DATA_LICENSES["embedded:mini_stratos"]:
        assert licence.lower() in section.lower(), licence


def test_an_unknown_dataset_gets_other_and_a_line_asking_for_it() -> None:
    card = cards.dataset_card(facts(config("tiny", "data.dataset=/data/mine.jsonl")))
    assert meta(card)["license"] == "other"
    assert "is not known to variational: set `license:`" in card


def test_the_body_cites_the_paper_and_the_source_set_and_hides_the_data_root() -> None:
    card = cards.dataset_card(facts(config(), fmt="messages"))
    assert "arXiv:2509.22637" in card and "Variational Reasoning for Language Models" in card
    assert "Bespoke-Stratos" in card and "bespoke_stratos" in card
    assert "secret-place" not in card and "data_root: <data_root>" in card
    assert "K=4 traces per question" in card and "selection `17k-mix`" in card
    assert "continue_final_message=True" in card  # the exact chat-template rule


def test_lineage_rows_say_whether_this_checkout_agrees() -> None:
    lineage = [
        cards.Lineage("train", 1, "aaa", 8, True, "aaa"),
        cards.Lineage("weights", 1, "bbb", 16, False, "ccc"),
        cards.Lineage("base_model", 1, None, None, None, "ddd"),
    ]
    text = cards.lineage_section(facts(config(), lineage=lineage))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| train | 1 | `aaa` | 8 | computed | same |",
        "| weights | 1 | `bbb` | 16 | reused | differs (`ccc`) |",
        "| base_model | 1 | — (not in run.json) | — | — | `ddd` |",
    ]


def test_tables_escape_pipes_and_show_missing_values() -> None:
    df = pl.DataFrame({"a": ["x|y", None], "b": [0.5, None]})
    assert cards.markdown_table(df).splitlines()[2:] == ["| x\\|y | 0.500 |", "| — | — |"]


def test_model_card_front_matter() -> None:
    card = cards.model_card(
        facts(config(), stage="pi_theta", training={"steps": 3, "final_loss": 0.5}), "final"
    )
    m = meta(card)
    assert m["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and m["license"] == "apache-2.0"
    assert m["library_name"] == "transformers" and m["pipeline_tag"] == "text-generation"
    assert "config section `final`" in card and "| `learning_rate` |" in card
    assert "<|begin_of_thought|>" in card and "stop_strings=['<|end_of_solution|>']" in card
    local = meta(cards.model_card(facts(config("tiny", "base_model=/models/mine"), stage="q_phi"), None))
    assert "base_model" not in local and local["license"] == "other"
    q_card = cards.model_card(facts(config(), stage="q_phi"), "q_phi")
    assert "<|end_of_thought|>" in q_card and "{reference solution}" in q_card  # the hinted PB prompt


@pytest.mark.parametrize("value", [{"a": {"b": 1, "c": [2]}}, {}])
def test_flatten_gives_one_row_per_leaf(value: dict) -> None:
    assert cards.flatten(value, "x") == ({"x.a.b": 1, "x.a.c": [2]} if value else {"x": {}})
