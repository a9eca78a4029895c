"""Stage `posterior_samples`: K traces per question from the hinted posterior q_φ(z | x, y′) (design.md stage 4).

In:  problems (prompt_idx, question, solution_ref) and the q_phi model manifest ("model_dir", "fingerprint").
Out: table `posterior_samples`, one row per (prompt_idx, sample_idx, round): seed, prompt, response (the
     generated text, stop string included), think (response cut at the first `<|end_of`), think_len (tokens of
     think + `<|end_of`, the ids the logps stage uses), format_ok (the `<|end_of` tag was generated),
     finish_reason ("stop" | "length").

One engine request per question with n = K and its own seed (method.md §6: T=0.7, top_p 1, top_k −1;
§8.6: n=K, not K copies). Sharded by questions (`posterior_sampling.shard_size`); the engine starts on the
first missing shard only, so a finished or fully resumed stage starts none.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from variational import templates
from variational.config import SamplingConfig
from variational.engines.samples import ENGINE_FIELDS, open_sampler, sample_rows, summarize, think_counter
from variational.engines.sampling import Completion, request_seed
from variational.pipeline.stage import Engine, Inputs, Stage

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


def parse_posterior(
    requests: pl.DataFrame,
    completions: list[list[Completion]],
    round_: int,
    seeds: list[int],
    tokenizer_count: Callable[[str], int],
) -> pl.DataFrame:
    """The `posterior_samples` rows of one batch of requests (see the module docstring for the columns)."""
    return sample_rows(requests, completions, round_, seeds, tokenizer_count)


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
    code=(
        "variational.engines.samples",
        "variational.engines.sampling",
        "variational.templates",
        "variational.engines.scoring",
    ),
    plan=lambda i: posterior_requests(i.table("problems"), i.conf.posterior_template),
    shard=_shard,
    shard_size="posterior_sampling.shard_size",
    engine=open_sampler("q_phi"),
    summary=lambda i, samples: summarize(samples),
    needs_gpu=True,
)
