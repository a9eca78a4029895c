"""variational/analysis/formats.py: the train table in the messages / bespoke / prompt_completion formats.

The train rows come from the real select core on literal frames (tests/exportrun.py); the chat-template rule
is checked with the embedded model's tokenizer (SmolLM2, ChatML), the Bespoke round trip with the real
`data check` and ingest."""

from __future__ import annotations

from pathlib import Path

import exportrun
import polars as pl
import pytest

from tasks.finetune import final_examples
from tasks.ingest import check_dataset, ingest, load_raw
from variational import templates
from variational.analysis.export import write_parquet
from variational.analysis.formats import PREFILL, format_train, split_pi_prompt


@pytest.fixture(scope="module")
def train() -> pl.DataFrame:
    return exportrun.train()


@pytest.fixture(scope="module")
def sources() -> pl.DataFrame:
    return exportrun.problems().select("prompt_idx", "source")


def test_split_pi_prompt_inverts_the_template() -> None:
    for question in ["What is 2 + 3?", "a <|im_end|>\n<|im_start|>user\nb", "", "  \n x \n"]:
        assert split_pi_prompt(templates.pi_prompt(question)) == (templates.PI_SYSTEM, question)
    posterior = templates.posterior_prompt("q", "s", "PB")
    with pytest.raises(ValueError, match="not a π_θ prompt"):
        split_pi_prompt(posterior)
    with pytest.raises(ValueError, match="no user turn"):
        split_pi_prompt("<|im_start|>system\nonly a system turn<|im_end|>\n<|im_start|>assistant\n" + PREFILL)


def test_messages_rows_and_provenance(train: pl.DataFrame, sources: pl.DataFrame) -> None:
    rows, left_out = format_train(train, sources, "messages")
    assert rows.columns == ["messages", "weight", "origin", "source", "prompt_idx", "sample_idx"]
    assert rows.height == train.height == 8 and left_out.is_empty()
    assert rows["origin"].to_list() == [-2, -2, -2, -2, -1, 1, 0, 0]
    assert rows["sample_idx"].to_list() == [None] * 5 + [1, 0, 0]
    assert rows["source"].to_list() == [
        "numina/10",
        "ruc/4",
        "apps/7",
        "numina/12",
        "apps/7",
        "numina/10",
        "ruc/4",
        "numina/12",
    ]
    first = rows["messages"][0].to_list()
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[1]["content"] == exportrun.problems()["question"][0]
    assert first[2]["content"] == PREFILL + train["response"][0]


def test_chat_template_renders_exactly_what_the_final_sft_trained_on(
    train: pl.DataFrame, sources: pl.DataFrame, embedded_model_dir: Path
) -> None:
    """prompt + response of every `final_examples` row == the messages rendered with SmolLM2's template and
    continue_final_message (the assistant turn left open, as the SFT saw it); the prompt part is the
    generation prompt + the prefill; a full rendering only adds `<|im_end|>\\n`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    examples = final_examples(train)
    rows, _ = format_train(train, sources, "messages")
    pairs, _ = format_train(train, sources, "prompt_completion")
    for messages, prompt, completion, (text_prompt, response) in zip(
        rows["messages"].to_list(),
        pairs["prompt"].to_list(),
        pairs["completion"].to_list(),
        examples.select("prompt", "response").iter_rows(),
        strict=True,
    ):
        trained = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert trained == text_prompt + response
        head = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        assert head + PREFILL == text_prompt
        assert (
            tokenizer.apply_chat_template(messages, tokenize=False) == text_prompt + response + "<|im_end|>\n"
        )
        assert prompt + completion == messages  # TRL's conversational pair is the same conversation


def test_bespoke_round_trip_through_data_check_and_ingest(
    train: pl.DataFrame, sources: pl.DataFrame, tmp_path: Path
) -> None:
    rows, left_out = format_train(train, sources, "bespoke")
    # question 3's chosen answer has text between the thought and the solution: ingest would drop it
    assert left_out.select("prompt_idx", "origin").rows() == [(3, 0)]
    assert "would be lost" in left_out["reason"][0]
    assert rows.height == train.height - 1
    (tmp_path / "data").mkdir()
    write_parquet(rows, tmp_path / "data" / "train-00000-of-00001.parquet")
    check = check_dataset(str(tmp_path))
    assert (check.rows, check.accepted, check.rejects.height) == (7, 7, 0)
    back, rejects = ingest(load_raw(str(tmp_path)))
    assert rejects.is_empty()
    kept = train.filter(~((pl.col("prompt_idx") == 3) & (pl.col("origin") == 0)))
    questions = dict(exportrun.problems().select("prompt_idx", "question").rows())
    assert back["question"].to_list() == [questions[p] for p in kept["prompt_idx"].to_list()]
    rebuilt = [templates.pi_response(t, s) for t, s in back.select("think_ref", "solution_ref").iter_rows()]
    assert rebuilt == kept["response"].to_list()  # think + solution give back the trained text
    assert back["source"].to_list() == rows["source"].to_list()


def test_a_prompt_not_made_by_the_template_is_named(train: pl.DataFrame) -> None:
    bad = train.with_columns(
        prompt=pl.when(pl.col("row") == 5).then(pl.lit("plain text")).otherwise("prompt")
    )
    with pytest.raises(ValueError, match=r"train row 5 \(prompt_idx 0\): not a π_θ prompt"):
        format_train(bad, None, "messages")
    with pytest.raises(ValueError, match="unknown export format 'sharegpt'"):
        format_train(train, None, "sharegpt")


def test_without_problems_the_source_is_null(train: pl.DataFrame) -> None:
    rows, _ = format_train(train, None, "prompt_completion")
    assert rows["source"].null_count() == rows.height
    assert rows.columns == ["prompt", "completion", "weight", "origin", "source", "prompt_idx", "sample_idx"]
