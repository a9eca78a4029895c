"""Stage `logps` (scoring): teacher-forced per-token log-probs of every posterior trace under π_θ0 and q_φ (method.md §1).

In:  problems (prompt_idx, question, solution_ref), posterior_samples (prompt_idx, sample_idx, round, think),
     and the model manifests pi_theta0, q_phi (each with "model_dir").
Out: table `logps`, one row per (prompt_idx, sample_idx, round, model, span):
     pi_theta0/think  = log π_θ0(think | x)
     pi_theta0/answer = log π_θ0(answer | x, think), answer = templates.reference_answer(solution_ref)
     q_phi/think      = log q_φ(think | x, y′)
     with token_logps (list<float32>), logp_sum, logp_mean (null for 0 tokens), n_tokens, truncated.

Both models score the SAME think ids (`scoring.encode_think`, tokenised once; method.md §8.9); π_θ0 scores
think + answer as one continuation of its prompt, split afterwards. Each context is capped at
cfg.score.max_length tokens in total (method.md §1: 32,000): the continuation's tail is cut and `truncated`
set, so n_tokens can be smaller than think_len.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from variational import templates
from variational.config import ScoreConfig
from variational.pipeline.stage import Engine, Inputs, Stage

if TYPE_CHECKING:  # torch and transformers load with the engine, not with the declaration
    import torch

PI, Q = "pi_theta0", "q_phi"  # `logps.model` values, read by tasks/weights.py
KEYS = ["prompt_idx", "sample_idx", "round"]
REQUEST_COLUMNS = [*KEYS, "pi_ids", "q_ids", "think_ids", "answer_ids"]
LOGPS_SCHEMA = {
    "prompt_idx": pl.Int64,
    "sample_idx": pl.Int64,
    "round": pl.Int64,
    "model": pl.String,
    "span": pl.String,
    "token_logps": pl.List(pl.Float32),
    "logp_sum": pl.Float64,
    "logp_mean": pl.Float64,
    "n_tokens": pl.Int64,
    "truncated": pl.Boolean,
}


def score_requests(
    problems: pl.DataFrame,
    posterior_samples: pl.DataFrame,
    tokenizer: Any,
    template: templates.PosteriorTemplate,
) -> pl.DataFrame:
    """Token ids of every scoring row: pi prompt, posterior prompt, think (tokenised ONCE), reference answer.

    One row per posterior sample, in the samples' order; a sample whose prompt_idx is not in `problems`
    raises, naming it. A missing `round` column means round 1."""
    samples = posterior_samples
    if "round" not in samples.columns:
        samples = samples.with_columns(round=pl.lit(1, pl.Int64))
    joined = samples.select(*KEYS, "think").join(
        problems.select("prompt_idx", "question", "solution_ref").cast(
            {"prompt_idx": samples["prompt_idx"].dtype}
        ),
        on="prompt_idx",
        how="left",
        maintain_order="left",
    )
    missing = joined.filter(pl.col("question").is_null())["prompt_idx"].unique().to_list()
    if missing:
        raise ValueError(f"posterior_samples refer to prompt_idx {missing[:5]} absent from problems")

    from variational.engines.scoring import encode_think

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # prompts repeat K times per question: tokenise each once
    pi_ids, q_ids, answer_ids = {}, {}, {}
    for r in joined.unique("prompt_idx").iter_rows(named=True):
        pi_ids[r["prompt_idx"]] = ids(templates.pi_prompt(r["question"]))
        q_ids[r["prompt_idx"]] = ids(templates.posterior_prompt(r["question"], r["solution_ref"], template))
        answer_ids[r["prompt_idx"]] = ids(templates.reference_answer(r["solution_ref"]))
    return pl.DataFrame(
        {
            "prompt_idx": joined["prompt_idx"].cast(pl.Int64),
            "sample_idx": joined["sample_idx"].cast(pl.Int64),
            "round": joined["round"].cast(pl.Int64),
            "pi_ids": [pi_ids[p] for p in joined["prompt_idx"]],
            "q_ids": [q_ids[p] for p in joined["prompt_idx"]],
            "think_ids": [encode_think(tokenizer, t or "") for t in joined["think"]],
            "answer_ids": [answer_ids[p] for p in joined["prompt_idx"]],
        },
        schema_overrides={c: pl.List(pl.Int32) for c in REQUEST_COLUMNS[3:]},
    )


def _cap(ctx: list[int], cont: list[int], max_length: int) -> list[int]:
    """The continuation cut so that context + continuation <= max_length tokens (method.md §1)."""
    return cont[: max(0, max_length - len(ctx))]


def forward_tokens(requests: pl.DataFrame, max_length: int) -> int:
    """Tokens the two backbones run over for these requests (each context capped at max_length)."""
    n = {c: pl.col(c).list.len() for c in REQUEST_COLUMNS[3:]}
    pi = pl.min_horizontal(n["pi_ids"] + n["think_ids"] + n["answer_ids"], max_length)
    q = pl.min_horizontal(n["q_ids"] + n["think_ids"], max_length)
    return int(requests.select((pi + q).sum()).item() or 0)


def summarize_logps(logps: np.ndarray) -> tuple[float, float | None, int]:
    """(sum, mean, count) of per-token log-probs; the mean of no tokens is None."""
    n = int(logps.shape[0])
    total = float(np.sum(logps, dtype=np.float64))
    return total, (total / n if n else None), n


def _row(key: tuple, model: str, span: str, logps: np.ndarray, truncated: bool) -> dict:
    total, mean, n = summarize_logps(logps)
    return dict(zip(KEYS, key, strict=True)) | {
        "model": model,
        "span": span,
        "token_logps": logps.tolist(),
        "logp_sum": total,
        "logp_mean": mean,
        "n_tokens": n,
        "truncated": truncated,
    }


def score_rows(
    requests: pl.DataFrame, models: dict[str, torch.nn.Module], cfg: ScoreConfig, progress: bool = True
) -> pl.DataFrame:
    """The `logps` rows of `requests` (from `score_requests`), scored by models {"pi_theta0": ..., "q_phi": ...}."""
    from variational.engines import scoring

    keys = list(requests.select(KEYS).iter_rows())
    pi_ctx, q_ctx = requests["pi_ids"].to_list(), requests["q_ids"].to_list()
    think, answer = requests["think_ids"].to_list(), requests["answer_ids"].to_list()
    opts = {"token_budget": cfg.token_budget, "chunk": cfg.vocab_chunk, "progress": progress}

    pi_cont = [_cap(c, t + a, cfg.max_length) for c, t, a in zip(pi_ctx, think, answer, strict=True)]
    q_cont = [_cap(c, t, cfg.max_length) for c, t in zip(q_ctx, think, strict=True)]
    pi_lp = scoring.score_continuations(models[PI], pi_ctx, pi_cont, **opts)
    q_lp = scoring.score_continuations(models[Q], q_ctx, q_cont, **opts)

    rows = []
    for i, key in enumerate(keys):
        n_think, n_answer = len(think[i]), len(answer[i])
        rows.append(_row(key, PI, "think", pi_lp[i][:n_think], len(pi_cont[i]) < n_think))
        rows.append(_row(key, PI, "answer", pi_lp[i][n_think:], len(pi_cont[i]) < n_think + n_answer))
        rows.append(_row(key, Q, "think", q_lp[i], len(q_cont[i]) < n_think))
    return pl.DataFrame(rows, schema=LOGPS_SCHEMA)


def score(
    problems: pl.DataFrame,
    posterior_samples: pl.DataFrame,
    models: dict[str, torch.nn.Module],
    tokenizer: Any,
    cfg: ScoreConfig,
    template: templates.PosteriorTemplate,
    progress: bool = True,
) -> pl.DataFrame:
    """problems + posterior_samples -> `logps` (the stage's core; models and tokenizer already loaded)."""
    return score_rows(score_requests(problems, posterior_samples, tokenizer, template), models, cfg, progress)


# ---------------------------------------------------------------- declaration
class Scorers:
    """The two scoring models and their (shared) tokenizer, loaded once per stage run; counts the context
    tokens read and the tokens scored for the shard stats (`counters`)."""

    def __init__(self, i: Inputs):
        from variational.engines import scoring

        t0 = time.perf_counter()
        self.tokens_in = self.tokens_out = 0

        loaded = {
            name: scoring.load_scorer(i.model_dir(name), compile=i.conf.score.compile) for name in (PI, Q)
        }
        self.models = {name: model for name, (model, _) in loaded.items()}
        self.tokenizer = loaded[PI][1]
        # both models must read the same ids: fine-tunes of one base model share one tokenizer
        if self.tokenizer.get_vocab() != loaded[Q][1].get_vocab():
            raise ValueError(
                "pi_theta0 and q_phi have different tokenizers: they must be fine-tunes of one base model"
            )
        self.start_s = time.perf_counter() - t0

    def count(self, requests: pl.DataFrame, rows: pl.DataFrame) -> None:
        contexts = requests.select(pl.col("pi_ids").list.len().sum() + pl.col("q_ids").list.len().sum())
        self.tokens_in += int(contexts.item() or 0)
        self.tokens_out += int(rows["n_tokens"].sum() or 0)

    def counters(self) -> dict[str, Any]:
        device = next(iter(self.models[PI].parameters())).device if self.models else None
        name = "cpu" if device is None or device.type == "cpu" else str(device)
        if device is not None and device.type == "cuda":
            import torch

            name = torch.cuda.get_device_name(device)
        return {
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "start_s": self.start_s,
            "device": name,
        }

    def close(self) -> None:
        self.models.clear()


def _plan(i: Inputs) -> pl.DataFrame:
    samples = i.table("posterior_samples")
    if "round" not in samples.columns:
        samples = samples.with_columns(round=pl.lit(i.round, pl.Int64))
    return samples.sort(KEYS)


def _shard(i: Inputs, engine: Engine, shard: pl.DataFrame) -> pl.DataFrame:
    scorers = engine.get()
    requests = score_requests(i.table("problems"), shard, scorers.tokenizer, i.conf.posterior_template)
    rows = score_rows(requests, scorers.models, i.conf.score)
    scorers.count(requests, rows)
    return rows


def summarize(logps: pl.DataFrame) -> str:
    s = logps.select(
        pl.len().alias("rows"),
        pl.col("n_tokens").sum().alias("tokens"),
        pl.col("truncated").sum().alias("cut"),
    ).row(0, named=True)
    return f"| rows | tokens scored | truncated spans |\n|---|---|---|\n| {s['rows']} | {s['tokens']} | {s['cut']} |\n"


LOGPS = Stage(
    name="logps",
    inputs=("problems", "posterior_samples", PI, Q),
    fields=("score", "posterior_template"),
    code=("variational.engines.scoring", "variational.templates"),
    plan=_plan,
    shard=_shard,
    shard_size="score.shard_size",
    engine=Scorers,
    summary=lambda i, logps: summarize(logps),
    needs_gpu=True,
)
