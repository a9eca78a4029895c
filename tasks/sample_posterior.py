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

import importlib
import sys
from collections.abc import Callable
from typing import Any

import polars as pl

from variational import sampling, templates
from variational.config import RunConfig, SamplingConfig
from variational.sampling import Completion, request_seed
from variational.stage import finish_stage, logger, open_store, reuse_stage, run_shards, stage_task
from variational.store import code_version, fingerprint, read_stage

STAGE = "sample_posterior"
TABLE = "posterior_samples"
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


def think_counter(sampler: sampling.Sampler) -> Callable[[str], int]:
    """think -> think_len: the length of `scoring.encode_think`, the very ids the score stage feeds (the
    sampler's tokenizer: q_phi, pi_theta0 and the base model share one)."""
    from variational import scoring  # torch + transformers: only once an engine runs

    return lambda think: len(scoring.encode_think(sampler.tokenizer, think))


def model_id(manifest: dict) -> str:
    # a trained model has a fingerprint; a base model passed as a bare manifest has only its folder
    return manifest.get("fingerprint") or str(manifest["model_dir"])


def engine_fields(conf: RunConfig) -> dict:
    """The engine settings that change what is sampled (memory and batching knobs do not)."""
    return {"backend": conf.engine.backend, "dtype": conf.engine.dtype}


class LazySampler:
    """Opens the Sampler on first use (a fully cached stage never starts an engine); close() is idempotent."""

    def __init__(self, model_dir: str, conf: RunConfig, *, prefix_caching: bool = False):
        self.model_dir, self.conf, self.prefix_caching = model_dir, conf, prefix_caching
        self._sampler: sampling.Sampler | None = None

    def get(self) -> sampling.Sampler:
        if self._sampler is None:
            self._sampler = sampling.Sampler(
                self.model_dir, self.conf.engine, prefix_caching=self.prefix_caching
            )
        return self._sampler

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None


# ---------------------------------------------------------------- Prefect task


def fingerprint_of(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    conf = RunConfig.model_validate(cfg)
    return fingerprint(
        STAGE,
        code=code_version(
            sys.modules[__name__], sampling, templates, importlib.import_module("variational.scoring")
        ),
        config={
            "K": conf.K,
            "posterior_template": conf.posterior_template,
            "posterior_sampling": conf.posterior_sampling,
            "engine": engine_fields(conf),
        },
        upstream={"problems": upstream["problems"]["fingerprint"], "q_phi": model_id(upstream["q_phi"])},
        round=round_,
    )


@stage_task(STAGE, fingerprint_of)
def sample_posterior_task(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict:
    conf = RunConfig.model_validate(cfg)
    store = open_store(cfg, STAGE, fingerprint_of(cfg, upstream, round_))
    if store.is_complete():
        return reuse_stage(store, round_)
    requests = posterior_requests(read_stage(upstream["problems"]), conf.posterior_template)
    model_dir = str(upstream["q_phi"]["model_dir"])
    engine = LazySampler(model_dir, conf)
    stop = [templates.posterior_stop(conf.posterior_template)]

    def compute(shard: pl.DataFrame) -> pl.DataFrame:
        seeds = request_seeds(shard["prompt_idx"].to_list(), conf.posterior_sampling, round_)
        sampler = engine.get()
        completions = sampler.generate(
            shard["prompt"].to_list(), n=conf.K, sampling=conf.posterior_sampling, stop=stop, seeds=seeds
        )
        return parse_posterior(shard, completions, round_, seeds, think_counter(sampler))

    try:
        done, reused = run_shards(store, requests, conf.posterior_sampling.shard_size, compute)
    finally:
        engine.close()
    logger().info("%s: %d shards sampled, %d reused", STAGE, done, reused)
    return finish_stage(store, round_, rows_in=requests.height, summary=summarize(store.read()))
