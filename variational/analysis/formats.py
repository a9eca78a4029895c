"""The `train` table in the formats trainers and hubs read: chat messages, the Bespoke-Stratos schema, TRL's
prompt/completion.

In:  the `train` table (prompt_idx, prompt, response, weight, origin; tasks/select.py) and the `problems`
     table's (prompt_idx, source).
Out: one frame per format, each with the provenance columns weight, origin, source, prompt_idx, sample_idx
     (sample_idx = origin for a chosen posterior trace, null for an original -2 or fallback -1 row):
- `messages`: `messages` = [system, user, assistant], the assistant turn in the thought/solution format.
- `bespoke`: `system` + `conversations` [{from: user}, {from: assistant}] (+ source): the schema of
  bespokelabs/Bespoke-Stratos-17k, which `variational data check` and the `problems` stage read.
- `prompt_completion`: TRL's conversational prompt-completion: `prompt` = [system, user], `completion` =
  [assistant].

The exact rule (templates.pi_prompt; tests/analysis/test_formats.py checks it with SmolLM2's chat template):
the π_θ prompt is ChatML(system, question) followed by the assistant prefill `<|begin_of_thought|>\\n\\n`,
and the assistant message is that prefill + the response. For a ChatML template that copies message content
verbatim (SmolLM2's, Qwen2.5's):
    apply_chat_template(messages, continue_final_message=True)            == prompt + response
    apply_chat_template(messages[:2], add_generation_prompt=True) + PREFILL == prompt
The final SFT's loss covers the response only (not the prefill), and the `<|im_end|>\\n` a full rendering
puts after the assistant turn was never trained: π_θ ends its answer with `<|end_of_solution|>`. TRL's
prompt-completion loss covers the whole completion, so it also trains the prefill and `<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from variational import templates

PREFILL = templates.BEGIN_THOUGHT + templates.SEP  # the assistant prefill that ends every π_θ prompt
FORMATS = ("messages", "bespoke", "prompt_completion")
PROVENANCE = ("weight", "origin", "source", "prompt_idx", "sample_idx")
MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})
TURN = pl.Struct({"from": pl.String, "value": pl.String})
_SYSTEM_HEAD = "<|im_start|>system\n"
_USER_HEAD = "<|im_end|>\n<|im_start|>user\n"
_ASSISTANT_HEAD = "<|im_end|>\n<|im_start|>assistant\n"


def split_pi_prompt(prompt: str) -> tuple[str, str]:
    """A π_θ prompt -> (system, question); ValueError when `templates.pi_prompt` did not make it. The system
    prompt holds no ChatML markup, so the first user header ends it; the question may hold anything."""
    if not prompt.startswith(_SYSTEM_HEAD) or not prompt.endswith(_ASSISTANT_HEAD + PREFILL):
        raise ValueError("not a π_θ prompt (ChatML system/user turns and the <|begin_of_thought|> prefill)")
    body = prompt[len(_SYSTEM_HEAD) : -len(_ASSISTANT_HEAD + PREFILL)]
    system, sep, question = body.partition(_USER_HEAD)
    if not sep:
        raise ValueError("the prompt has no user turn")
    return system, question


def conversations(train: pl.DataFrame, sources: pl.DataFrame | None) -> pl.DataFrame:
    """The train table as (system, question, assistant) + PROVENANCE, in the table's row order. `sources`:
    (prompt_idx, source) of the run's problems, or None (source then null)."""
    parts = []
    for i, prompt in enumerate(train["prompt"].to_list()):
        try:
            parts.append(split_pi_prompt(prompt))
        except ValueError as err:
            raise ValueError(f"train row {i} (prompt_idx {train['prompt_idx'][i]}): {err}") from None
    df = train.select("prompt_idx", "response", "weight", "origin").with_columns(
        pl.Series("system", [s for s, _ in parts], dtype=pl.String),
        pl.Series("question", [q for _, q in parts], dtype=pl.String),
        assistant=pl.lit(PREFILL) + pl.col("response"),
        sample_idx=pl.when(pl.col("origin") >= 0).then(pl.col("origin")).otherwise(None).cast(pl.Int64),
    )
    if sources is not None:
        lookup = sources.select(pl.col("prompt_idx").cast(pl.Int64), pl.col("source").cast(pl.String))
        df = df.join(lookup.unique("prompt_idx"), on="prompt_idx", how="left", maintain_order="left")
    else:
        df = df.with_columns(source=pl.lit(None, pl.String))
    return df.select(
        "system",
        "question",
        "assistant",
        "response",
        pl.col("weight").cast(pl.Float64),
        pl.col("origin").cast(pl.Int64),
        "source",
        pl.col("prompt_idx").cast(pl.Int64),
        "sample_idx",
    )


def _message(role: str, column: str) -> pl.Expr:
    return pl.struct(role=pl.lit(role), content=pl.col(column))


def messages_rows(conv: pl.DataFrame) -> pl.DataFrame:
    messages = pl.concat_list(
        _message("system", "system"), _message("user", "question"), _message("assistant", "assistant")
    )
    return conv.select(messages.cast(pl.List(MESSAGE)).alias("messages"), *PROVENANCE)


def prompt_completion_rows(conv: pl.DataFrame) -> pl.DataFrame:
    prompt = pl.concat_list(_message("system", "system"), _message("user", "question"))
    completion = pl.concat_list(_message("assistant", "assistant"))
    return conv.select(
        prompt.cast(pl.List(MESSAGE)).alias("prompt"),
        completion.cast(pl.List(MESSAGE)).alias("completion"),
        *PROVENANCE,
    )


def bespoke_loss(assistant: str, response: str) -> str | None:
    """Why this row would not come back unchanged from the Bespoke schema (None: it would). Ingest splits the
    assistant text into think and solution and the trainer rebuilds the response from them
    (templates.split_stratos / pi_response); a chosen trace with a π_θ0 rollout answer can break that, e.g.
    a rollout that never wrote `<|begin_of_solution|>`."""
    try:
        think, solution = templates.split_stratos(assistant)
    except ValueError as err:
        return f"assistant text: {err}"
    if not think.strip() or not solution.strip():
        return "empty think or solution span"
    if templates.pi_response(think, solution) != response:
        return "text between the sections would be lost (think/solution do not rebuild the response)"
    return None


def bespoke_rows(conv: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows in the Bespoke-Stratos schema, rows left out: prompt_idx, origin, reason)."""
    reasons = [bespoke_loss(a, r) for a, r in conv.select("assistant", "response").iter_rows()]
    marked = conv.with_columns(pl.Series("reason", reasons, dtype=pl.String))
    turns = pl.concat_list(
        pl.struct(**{"from": pl.lit("user"), "value": pl.col("question")}),
        pl.struct(**{"from": pl.lit("assistant"), "value": pl.col("assistant")}),
    )
    kept = marked.filter(pl.col("reason").is_null()).select(
        "system", turns.cast(pl.List(TURN)).alias("conversations"), *PROVENANCE
    )
    left_out = marked.filter(pl.col("reason").is_not_null()).select("prompt_idx", "origin", "reason")
    return kept, left_out


def _no_left_out(rows: Callable[[pl.DataFrame], pl.DataFrame]) -> Callable:
    def both(conv: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        left_out = pl.DataFrame(schema={"prompt_idx": pl.Int64, "origin": pl.Int64, "reason": pl.String})
        return rows(conv), left_out

    return both


# format name -> conversations frame -> (rows, rows left out with the reason)
FORMATTERS: dict[str, Callable[[pl.DataFrame], tuple[pl.DataFrame, pl.DataFrame]]] = {
    "messages": _no_left_out(messages_rows),
    "bespoke": bespoke_rows,
    "prompt_completion": _no_left_out(prompt_completion_rows),
}


def format_train(
    train: pl.DataFrame, sources: pl.DataFrame | None, fmt: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The train table in format `fmt` (one of FORMATS) and the rows that format cannot carry (with why)."""
    if fmt not in FORMATTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return FORMATTERS[fmt](conversations(train, sources))
