"""Sample tables from engine completions: the columns every sampling stage writes, and the engine glue
they share (posterior_samples, prior_samples, rollouts).

In: requests (prompt_idx, prompt), the engine's completions per request, seeds. Out: one row per completion
with the think span cut at the first `<|end_of` and counted in the scorer's own token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from variational import templates
from variational.engines import sampling
from variational.engines.sampling import Completion

SAMPLES_SCHEMA = {
    "prompt_idx": pl.Int64,
    "sample_idx": pl.Int64,
    "round": pl.Int64,
    "seed": pl.Int64,
    "prompt": pl.String,
    "response": pl.String,
    "think": pl.String,
    "think_len": pl.Int64,
    "format_ok": pl.Boolean,
    "finish_reason": pl.String,
}


def sample_rows(
    requests: pl.DataFrame,
    completions: list[list[Completion]],
    round_: int,
    seeds: list[int],
    tokenizer_count: Callable[[str], int],
    schema: dict[str, Any] = SAMPLES_SCHEMA,
) -> pl.DataFrame:
    """Requests (prompt_idx, prompt) x their completions -> sample rows with the think span cut and counted."""
    if not (len(completions) == len(seeds) == requests.height):
        raise ValueError(
            f"{requests.height} requests, {len(completions)} completion lists, {len(seeds)} seeds: "
            "pass one of each per request"
        )
    rows = []
    for (p, prompt), comps, seed in zip(
        requests.select("prompt_idx", "prompt").iter_rows(), completions, seeds, strict=True
    ):
        for k, c in enumerate(comps):
            think, ok = templates.cut_think(c.text)
            rows.append(
                {
                    "prompt_idx": p,
                    "sample_idx": k,
                    "round": round_,
                    "seed": seed,
                    "prompt": prompt,
                    "response": c.text,
                    "think": think,
                    "think_len": tokenizer_count(think),
                    "format_ok": ok,
                    "finish_reason": c.finish_reason,
                }
            )
    return pl.DataFrame(rows, schema=schema)


def summarize(samples: pl.DataFrame) -> str:
    """A one-row markdown table: traces, well-formed share, truncated share, think length."""
    s = samples.select(
        pl.len().alias("traces"),
        pl.col("prompt_idx").n_unique().alias("questions"),
        pl.col("format_ok").mean().alias("ok"),
        (pl.col("finish_reason") == "length").mean().alias("cut"),
        pl.col("think_len").median().alias("median"),
        pl.col("think_len").max().alias("max"),
    ).row(0, named=True)
    return (
        "| questions | traces | format_ok | finish=length | think_len median | max |\n|---|---|---|---|---|---|\n"
        f"| {s['questions']} | {s['traces']} | {s['ok'] or 0:.1%} | {s['cut'] or 0:.1%} | "
        f"{s['median']} | {s['max']} |\n"
    )


ENGINE_FIELDS = ("engine.backend", "engine.dtype")  # what changes the samples; memory/batching knobs do not


def think_counter(sampler: sampling.Sampler) -> Callable[[str], int]:
    """think -> think_len: the length of `scoring.encode_think`, the very ids the logps stage feeds (the
    sampler's tokenizer: q_phi, pi_theta0 and the base model share one)."""
    from variational.engines import scoring  # torch + transformers: only once an engine runs

    return lambda think: len(scoring.encode_think(sampler.tokenizer, think))


def open_sampler(model: str, *, prefix_caching: bool = True) -> Callable[[Any], sampling.Sampler]:
    """The engine opener of a sampling stage: vLLM (or the transformers fallback) on upstream `model`.
    Prefix caching on: the n samples of a request, and requests with one system prompt, prefill it once;
    the rows equal those of an engine without it (bench/RESULTS.md 2026-12-04)."""
    return lambda i: sampling.Sampler(i.model_dir(model), i.conf.engine, prefix_caching=prefix_caching)
