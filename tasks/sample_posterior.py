"""Stage `sample_posterior`: K traces per question from the hinted posterior q_φ(z | x, y′) (design.md stage 4).

In:  problems (prompt_idx, question, solution_ref) and the q_phi model manifest ("model_dir", "fingerprint").
Out: table `posterior_samples`, one row per (prompt_idx, sample_idx, round): seed, prompt, response (the
     generated text, stop string included), think (response cut at the first `<|end_of`), think_len (tokens of
     think + `<|end_of`, the ids the score stage uses), format_ok (the `<|end_of` tag was generated),
     finish_reason ("stop" | "length").

One engine request per question with n = K and its own seed (method.md §6: T=0.7, top_p 1, top_k −1;
§8.6: n=K, not K copies). Sharded by questions (`posterior_sampling.shard_size`); the engine starts on the
first missing shard only, so a finished or fully resumed stage starts none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from variational import sampling, templates
from variational.config import SamplingConfig
from variational.runner import Engine, Inputs, Stage
from variational.sampling import Completion, request_seed

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

# ---------------------------------------------------------------- pure core


def posterior_requests(problems: pl.DataFrame, template: templates.PosteriorTemplate) -> pl.DataFrame:
    """problems -> (prompt_idx, prompt): the hinted posterior prompt of every question, by prompt_idx."""
    rows = [
        {"prompt_idx": p, "prompt": templates.posterior_prompt(q, y, template)}
        for p, q, y in problems.select("prompt_idx", "question", "solution_ref").iter_rows()
    ]
    return pl.DataFrame(rows, schema={"prompt_idx": pl.Int64, "prompt": pl.String}).sort("prompt_idx")


def request_seeds(prompt_idx: list[int], sampling_cfg: SamplingConfig, round_: int) -> list[int]:
    """One seed per request, stable in (prompt_idx, round): a rerun or a resumed shard redraws the same."""
    return [request_seed(sampling_cfg.seed, round_, int(p)) for p in prompt_idx]


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


def parse_posterior(
    requests: pl.DataFrame,
    completions: list[list[Completion]],
    round_: int,
    seeds: list[int],
    tokenizer_count: Callable[[str], int],
) -> pl.DataFrame:
    """The `posterior_samples` rows of one batch of requests (see the module docstring for the columns)."""
    return sample_rows(requests, completions, round_, seeds, tokenizer_count)


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


# ---------------------------------------------------------------- engine glue (shared by the sample stages)
ENGINE_FIELDS = ("engine.backend", "engine.dtype")  # what changes the samples; memory/batching knobs do not


def think_counter(sampler: sampling.Sampler) -> Callable[[str], int]:
    """think -> think_len: the length of `scoring.encode_think`, the very ids the score stage feeds (the
    sampler's tokenizer: q_phi, pi_theta0 and the base model share one)."""
    from variational import scoring  # torch + transformers: only once an engine runs

    return lambda think: len(scoring.encode_think(sampler.tokenizer, think))


def open_sampler(model: str, *, prefix_caching: bool = False) -> Callable[[Inputs], sampling.Sampler]:
    """The engine opener of a sampling stage: vLLM (or the transformers fallback) on upstream `model`."""
    return lambda i: sampling.Sampler(i.model_dir(model), i.conf.engine, prefix_caching=prefix_caching)


# ---------------------------------------------------------------- declaration
def _shard(i: Inputs, engine: Engine, shard: pl.DataFrame) -> pl.DataFrame:
    seeds = request_seeds(shard["prompt_idx"].to_list(), i.conf.posterior_sampling, i.round)
    sampler = engine.get()
    stop = [templates.posterior_stop(i.conf.posterior_template)]
    completions = sampler.generate(
        shard["prompt"].to_list(), n=i.conf.K, sampling=i.conf.posterior_sampling, stop=stop, seeds=seeds
    )
    return parse_posterior(shard, completions, i.round, seeds, think_counter(sampler))


POSTERIOR_SAMPLES = Stage(
    name="posterior_samples",
    inputs=("problems", "q_phi"),
    fields=("K", "posterior_template", "posterior_sampling", *ENGINE_FIELDS),
    uses=("engine",),
    code=("variational.sampling", "variational.templates", "variational.scoring"),
    plan=lambda i: posterior_requests(i.table("problems"), i.conf.posterior_template),
    shard=_shard,
    shard_size="posterior_sampling.shard_size",
    engine=open_sampler("q_phi"),
    summary=lambda i, samples: summarize(samples),
    needs_gpu=True,
)
