"""variational/templates.py: render -> parse identities on literal and real long-CoT rows, posterior layout,
the `<|end_of` cut, brace matching of `\\boxed{}`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from variational import templates as T

LONGCOT = "longcot_skyt1_format_model_outputs.jsonl"  # real Sky-T1-format generations (shared/data)


def stratos_assistant(think: str, solution: str) -> str:
    """The assistant text as Bespoke-Stratos stores it (method.md §5)."""
    return (
        f"{T.BEGIN_THOUGHT}\n\n{think}\n\n{T.END_THOUGHT}\n\n"
        f"{T.BEGIN_SOLUTION}\n\n{solution}\n\n{T.END_SOLUTION}"
    )


def real_rows(shared_data: Path, n: int = 50) -> list[dict]:
    """The first n rows; `shared_data` (conftest) skips when ../shared/data is absent."""
    with (shared_data / LONGCOT).open() as f:
        return [json.loads(next(f)) for _ in range(n)]


CASES = [
    ("Two and three make five.", "$\\boxed{5}$"),
    ("Step 1.\n\nStep 2: x^2 = {4}.\n\n", "\n\nSo $x = \\boxed{\\pm 2}$.\n\n"),
    ("", "only a solution"),
]


@pytest.mark.parametrize(("think", "solution"), CASES)
def test_split_stratos_inverts_pi_response(think: str, solution: str) -> None:
    # the prompt ends with the begin tag + SEP, so the full assistant turn is that prefill + the target
    assert T.split_stratos(T.BEGIN_THOUGHT + T.SEP + T.pi_response(think, solution)) == (think, solution)


def test_pi_prompt_ends_with_prefill_and_full_text_concatenates() -> None:
    prompt = T.pi_prompt("What is 2+3?")
    assert prompt.endswith("<|im_start|>assistant\n<|begin_of_thought|>\n\n")
    assert "<|im_start|>user\nWhat is 2+3?<|im_end|>\n" in prompt
    # the GML answer continuation lines up with the pi_theta target on the same characters
    think, solution = CASES[1]
    assert T.rollout_prompt("q", think) + T.reference_answer(solution) == T.pi_prompt("q") + T.pi_response(
        think, solution
    )


def test_real_long_cot_rows_round_trip(shared_data: Path) -> None:
    for r in real_rows(shared_data):
        text = stratos_assistant(r["think"], r["solution"])
        think, solution = T.split_stratos(text)
        # render -> parse -> render is the identity on the stored text
        assert T.BEGIN_THOUGHT + T.SEP + T.pi_response(think, solution) == text, r["id"]
        assert (think.strip(), solution.strip()) == (r["think"].strip(), r["solution"].strip()), r["id"]
        # the think span of a pi_theta completion ends at the first `<|end_of`
        assert T.cut_think(T.pi_response(think, solution)) == (think, True), r["id"]


def test_split_stratos_names_the_missing_or_misordered_tag() -> None:
    with pytest.raises(ValueError, match="missing <\\|end_of_thought\\|>"):
        T.split_stratos(f"{T.BEGIN_THOUGHT}t{T.BEGIN_SOLUTION}s{T.END_SOLUTION}")
    with pytest.raises(ValueError, match="out of order"):
        T.split_stratos(f"{T.BEGIN_SOLUTION}s{T.END_SOLUTION}{T.BEGIN_THOUGHT}t{T.END_THOUGHT}")


@pytest.mark.parametrize(
    ("template", "begin", "end"),
    [("PB", T.BEGIN_THOUGHT, T.END_THOUGHT), ("PA", T.BEGIN_EXPLANATION, T.END_EXPLANATION)],
)
def test_posterior_prompt_puts_the_hint_before_the_begin_tag(template: str, begin: str, end: str) -> None:
    hint = "\n\nThe answer is $\\boxed{42}$.\n\n"
    prompt = T.posterior_prompt("What is 6*7?", hint, template)  # type: ignore[arg-type]
    system = T.PB_SYSTEM if template == "PB" else T.PA_SYSTEM
    assert prompt.startswith(f"<|im_start|>system\n{system}<|im_end|>\n")
    turn = prompt.split("<|im_start|>assistant\n", 1)[1]  # the system prompt mentions the tags too
    assert turn == f"{T.BEGIN_SOLUTION}{hint}{T.END_SOLUTION}{T.SEP}{begin}{T.SEP}"
    assert turn.index(hint) < turn.index(begin)
    assert T.posterior_stop(template) == end  # type: ignore[arg-type]
    assert T.posterior_response("because 6*7=42", template) == "because 6*7=42" + end  # type: ignore[arg-type]


def test_unknown_posterior_template_is_named() -> None:
    with pytest.raises(ValueError, match="'PC'"):
        T.posterior_prompt("q", "s", "PC")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("output", "think", "closed"),
    [
        (
            "because 6*7=42<|end_of_thought|>\n\n<|begin_of_solution|>42<|end_of_solution|>",
            "because 6*7=42",
            True,
        ),
        ("because 6*7=42<|end_of_explanation|>", "because 6*7=42", True),  # PA output
        ("a<|end_of_thought|>b<|end_of_explanation|>", "a", True),  # the first tag wins
        ("ran out of tokens", "ran out of tokens", False),
    ],
)
def test_cut_think_accepts_pa_and_pb_outputs(output: str, think: str, closed: bool) -> None:
    assert T.cut_think(output) == (think, closed)


def test_cut_think_on_real_posterior_style_outputs(shared_data: Path) -> None:
    for r in real_rows(shared_data, 10):
        for end in (T.END_THOUGHT, T.END_EXPLANATION):
            assert T.cut_think(r["think"] + end + "trailing") == (r["think"], True), r["id"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),  # the last one
        ("\\boxed {7}", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed{unclosed {", None),
        ("no answer here", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed_matches_nested_braces(text: str, expected: str | None) -> None:
    assert T.last_boxed(text) == expected


def test_extract_solution_and_parse_pi_response() -> None:
    out = "think<|end_of_thought|>\n\n<|begin_of_solution|>x = 2<|end_of_solution|>"
    assert T.parse_pi_response(out) == ("think", "x = 2")
    assert T.extract_solution("think<|end_of_thought|>") is None
    assert T.extract_solution("<|begin_of_solution|>unfinished") == "unfinished"


# ---------------------------------------------------------------- the official eval frame (parity official)
def test_official_eval_system_prompt_is_the_harness_yaml_spelling() -> None:
    """The fork's model_configs.yaml escapes leave two backslashes in '\\\\n\\\\n'; the rest is the π_θ prompt."""
    assert "'\\\\n\\\\n'" in T.OFFICIAL_EVAL_SYSTEM and "'\\\\n\\\\n'" not in T.PI_SYSTEM
    assert T.OFFICIAL_EVAL_SYSTEM.replace("\\\\", "\\") == T.PI_SYSTEM
    assert T.OFFICIAL_EVAL_PREFILL == "<begin_of_thought>\n\n"  # no pipes (method.md §8.11)


def test_prefill_goes_through_the_models_chat_template(embedded_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    framed = T.chat_template_prompt(tok, T.OFFICIAL_EVAL_SYSTEM, "What is 1+1?", T.OFFICIAL_EVAL_PREFILL)
    assert framed == (
        f"<|im_start|>system\n{T.OFFICIAL_EVAL_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n<begin_of_thought>\n\n"  # continued, not closed by <|im_end|>
    )
    base = T.chat_template_prompt(tok, T.QWEN_COT_SYSTEM, "What is 1+1?", None)
    assert base.endswith("What is 1+1?<|im_end|>\n<|im_start|>assistant\n") and T.QWEN_COT_SYSTEM in base
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        T.chat_template_prompt(tok, T.QWEN_COT_SYSTEM, "q", None)
