"""Stage `rollouts`: M answer continuations of π_θ0 per posterior trace (design.md stage 6).

In:  problems (prompt_idx, question), posterior_samples (prompt_idx, sample_idx, round, think, format_ok) and
     the pi_theta0 model manifest ("model_dir", "fingerprint").
Out: table `rollouts`, one row per (prompt_idx, sample_idx, rollout_idx): round, seed, text (what π_θ0 wrote
     after prompt + think + `<|end_of`; `_thought|>...<|end_of_solution|>` when well formed, the stop string
     kept), n_tokens, finish_reason.

Only traces with format_ok get rollouts: a trace that never closed its thought has no answer position, and
the weights stage gives it accuracy null (the summary counts them). The prompt is templates.rollout_prompt
(π_θ prompt + think + `<|end_of`); n = M per trace, one seed per trace (method.md §8.6), prefix caching on:
the K traces of a question share the π_θ prompt and the M samples of a trace share all of it.
`parity: official` (variational/parity.py `rollout_rules`) does what sample_from_initial_reasoning_model.py
does: every trace gets rollouts (an unclosed one after its whole response + `<|end_of`), and the M rollouts
of a trace are M requests of n=1 sharing ONE seed, the same for every trace of sample index k (the
official split k): near-identical answers. n=M with that seed would not be the same: vLLM seeds child j of
a request with seed + j (vllm/v1/engine/parallel_sampling.py), so the M answers would be independent.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from variational import parity, templates
from variational.config import SamplingConfig
from variational.engines.samples import ENGINE_FIELDS, open_sampler
from variational.engines.sampling import Completion, request_seed
from variational.pipeline.stage import Engine, Inputs, Stage

WELL_FORMED = templates.END_THOUGHT.removeprefix(templates.END_OF)  # "_thought|>": how an answer starts
REQUEST_SCHEMA = {"prompt_idx": pl.Int64, "sample_idx": pl.Int64, "round": pl.Int64, "prompt": pl.String}
ROLLOUTS_SCHEMA = {
    "prompt_idx": pl.Int64,
    "sample_idx": pl.Int64,
    "rollout_idx": pl.Int64,
    "round": pl.Int64,
    "seed": pl.Int64,
    "text": pl.String,
    "n_tokens": pl.Int64,
    "finish_reason": pl.String,
}

# ---------------------------------------------------------------- pure core


def rollout_requests(
    problems: pl.DataFrame, posterior_samples: pl.DataFrame, round_: int = 1, unclosed: bool = False
) -> pl.DataFrame:
    """Well-formed traces (every trace when `unclosed`) -> (prompt_idx, sample_idx, round, prompt), sorted so
    a question's traces are adjacent.

    A trace whose prompt_idx is not in `problems` raises, naming it. A missing `round` column means round_."""
    samples = posterior_samples
    if "round" not in samples.columns:
        samples = samples.with_columns(round=pl.lit(round_, pl.Int64))
    if not unclosed:
        samples = samples.filter(pl.col("format_ok"))
    traces = samples.select("prompt_idx", "sample_idx", "round", "think")
    joined = traces.join(problems.select("prompt_idx", "question"), on="prompt_idx", how="left")
    if (missing := joined.filter(pl.col("question").is_null())).height:
        raise ValueError(
            f"rollouts: posterior sample(s) of prompt_idx {missing['prompt_idx'].unique().to_list()[:5]} "
            "have no problem; posterior_samples and problems come from different runs"
        )
    rows = [
        {"prompt_idx": p, "sample_idx": k, "round": r, "prompt": templates.rollout_prompt(q, think)}
        for p, k, r, think, q in joined.select(
            "prompt_idx", "sample_idx", "round", "think", "question"
        ).iter_rows()
    ]
    return pl.DataFrame(rows, schema=REQUEST_SCHEMA).sort("prompt_idx", "sample_idx")


def request_seeds(requests: pl.DataFrame, sampling_cfg: SamplingConfig, shared: bool = False) -> list[int]:
    """One seed per trace, stable in (round, prompt_idx, sample_idx); `shared` (official): one seed per
    (round, sample_idx), the same for every question, as the official split k runs with seed k."""
    return [
        request_seed(sampling_cfg.seed, int(r), 0 if shared else int(p), int(k))
        for p, k, r in requests.select("prompt_idx", "sample_idx", "round").iter_rows()
    ]


def generate_rollouts(
    sampler: Any, prompts: list[str], seeds: list[int], m: int, sampling: SamplingConfig, shared_seed: bool
) -> list[list[Completion]]:
    """M completions per prompt: one request with n=M (its children seeded seed, seed+1, ...: independent),
    or, with `shared_seed`, M requests of n=1 that all carry the prompt's seed (the official copies)."""
    kwargs = {"sampling": sampling, "stop": [templates.ANSWER_STOP], "include_stop": True}
    if not shared_seed:
        return sampler.generate(prompts, n=m, seeds=seeds, **kwargs)
    copies = sampler.generate(
        [p for p in prompts for _ in range(m)], n=1, seeds=[s for s in seeds for _ in range(m)], **kwargs
    )
    return [[c[0] for c in copies[i * m : (i + 1) * m]] for i in range(len(prompts))]


def parse_rollouts(
    requests: pl.DataFrame, completions: list[list[Completion]], seeds: list[int]
) -> pl.DataFrame:
    """Requests x their M completions -> `rollouts` rows."""
    if not (len(completions) == len(seeds) == requests.height):
        raise ValueError(
            f"{requests.height} requests, {len(completions)} completion lists, {len(seeds)} seeds: "
            "pass one of each per request"
        )
    rows = [
        {
            "prompt_idx": p,
            "sample_idx": k,
            "rollout_idx": m,
            "round": r,
            "seed": seed,
            "text": c.text,
            "n_tokens": c.n_tokens,
            "finish_reason": c.finish_reason,
        }
        for (p, k, r), comps, seed in zip(
            requests.select("prompt_idx", "sample_idx", "round").iter_rows(), completions, seeds, strict=True
        )
        for m, c in enumerate(comps)
    ]
    return pl.DataFrame(rows, schema=ROLLOUTS_SCHEMA)


def summarize(traces: int, requests: int, rollouts: pl.DataFrame) -> str:
    s = rollouts.select(
        pl.len().alias("rollouts"),
        pl.col("text").str.starts_with(WELL_FORMED).mean().alias("ok"),
        (pl.col("finish_reason") == "length").mean().alias("cut"),
        pl.col("n_tokens").mean().alias("tokens"),
    ).row(0, named=True)
    return (
        "| traces | with rollouts | skipped (no `<|end_of`) | rollouts | start `_thought|>` | finish=length "
        "| mean tokens |\n|---|---|---|---|---|---|---|\n"
        f"| {traces} | {requests} | {traces - requests} | {s['rollouts']} | {s['ok'] or 0:.1%} | "
        f"{s['cut'] or 0:.1%} | {s['tokens'] or 0:.0f} |\n"
    )


# ---------------------------------------------------------------- declaration
def _plan(i: Inputs) -> pl.DataFrame:
    rules = parity.rollout_rules(i.conf)
    return rollout_requests(i.table("problems"), i.table("posterior_samples"), i.round, rules.unclosed_traces)


def _shard(i: Inputs, engine: Engine, shard: pl.DataFrame) -> pl.DataFrame:
    if shard.is_empty():  # no well-formed trace at all: an empty table, no engine
        return pl.DataFrame(schema=ROLLOUTS_SCHEMA)
    shared = parity.rollout_rules(i.conf).shared_seed
    seeds = request_seeds(shard, i.conf.rollout_sampling, shared)
    prompts = shard["prompt"].to_list()
    completions = generate_rollouts(engine.get(), prompts, seeds, i.conf.M, i.conf.rollout_sampling, shared)
    return parse_rollouts(shard, completions, seeds)


def _summary(i: Inputs, rollouts: pl.DataFrame) -> str:
    traces = i.table("posterior_samples", columns=["prompt_idx"]).height
    return summarize(traces, rollouts.select("prompt_idx", "sample_idx").n_unique(), rollouts)


ROLLOUTS = Stage(
    name="rollouts",
    inputs=("problems", "posterior_samples", "pi_theta0"),
    fields=("parity", "M", "rollout_sampling", *ENGINE_FIELDS),
    uses=("engine",),
    code=(
        "variational.engines.samples",
        "variational.engines.sampling",
        "variational.templates",
        "variational.parity",
    ),
    plan=_plan,
    shard=_shard,
    shard_size="rollout_sampling.shard_size",
    engine=open_sampler("pi_theta0", prefix_caching=True),
    summary=_summary,
    needs_gpu=True,
)
