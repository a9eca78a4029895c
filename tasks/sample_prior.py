"""Stage `prior_samples`: M traces per question from the policy π_θ WITHOUT the hint (forward KL, method.md §2 Eq.9).

In:  problems (prompt_idx, question) and the policy model manifest ("model_dir", "fingerprint"): π_θ0 in
     round 1, the last π_θ in later rounds (Algorithm 1).
Out: table `prior_samples`, one row per (prompt_idx, sample_idx, round): the `posterior_samples` columns
     (seed, prompt, response, think, think_len, format_ok, finish_reason) plus `text` (= response, a full
     π_θ completion ending in `<|end_of_solution|>` when finished) and `rollout_idx` = 0, so the prior_verdicts stage
     reads these rows like rollouts and its accuracies become the weights w_m of Eq.9.

Sampling: `posterior_sampling` (the same long-trace settings as q_φ's, a whole think + answer must fit),
n = M per question, stop `<|end_of_solution|>` kept in the text.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from variational import templates
from variational.config import SamplingConfig
from variational.engines.samples import ENGINE_FIELDS, open_sampler, sample_rows, summarize, think_counter
from variational.engines.sampling import Completion, request_seed
from variational.pipeline.stage import Engine, Inputs, Stage

PRIOR_STREAM = 1  # the last seed key: keeps prior seeds apart from the posterior seeds of the same question


def prior_requests(problems: pl.DataFrame) -> pl.DataFrame:
    """problems -> (prompt_idx, prompt): the π_θ prompt (no hint) of every question, by prompt_idx."""
    rows = [
        {"prompt_idx": p, "prompt": templates.pi_prompt(q)}
        for p, q in problems.select("prompt_idx", "question").iter_rows()
    ]
    return pl.DataFrame(rows, schema={"prompt_idx": pl.Int64, "prompt": pl.String}).sort("prompt_idx")


def request_seeds(prompt_idx: list[int], sampling_cfg: SamplingConfig, round_: int) -> list[int]:
    return [request_seed(sampling_cfg.seed, round_, int(p), PRIOR_STREAM) for p in prompt_idx]


def parse_prior(
    requests: pl.DataFrame,
    completions: list[list[Completion]],
    round_: int,
    seeds: list[int],
    tokenizer_count: Callable[[str], int],
) -> pl.DataFrame:
    """The `prior_samples` rows of one batch of requests: sample rows + text (the response) + rollout_idx 0."""
    rows = sample_rows(requests, completions, round_, seeds, tokenizer_count)
    return rows.with_columns(text=pl.col("response"), rollout_idx=pl.lit(0, pl.Int64))


# ---------------------------------------------------------------- declaration
def _shard(i: Inputs, engine: Engine, shard: pl.DataFrame) -> pl.DataFrame:
    seeds = request_seeds(shard["prompt_idx"].to_list(), i.conf.posterior_sampling, i.round)
    sampler = engine.get()
    completions = sampler.generate(
        shard["prompt"].to_list(),
        n=i.conf.M,
        sampling=i.conf.posterior_sampling,
        stop=[templates.ANSWER_STOP],
        seeds=seeds,
        include_stop=True,
    )
    return parse_prior(shard, completions, i.round, seeds, think_counter(sampler))


PRIOR_SAMPLES = Stage(
    name="prior_samples",
    inputs=("problems", "policy"),
    fields=("M", "posterior_sampling", *ENGINE_FIELDS),
    uses=("engine",),
    code=(
        "variational.engines.samples",
        "variational.engines.sampling",
        "variational.templates",
        "variational.engines.scoring",
    ),
    plan=lambda i: prior_requests(i.table("problems")),
    shard=_shard,
    shard_size="posterior_sampling.shard_size",
    engine=open_sampler("policy"),
    summary=lambda i, samples: summarize(samples),
    needs_gpu=True,
)
