"""Stages `finetune_pi_theta0`, `finetune_q_phi`, `final_sft`: weighted SFT (trainers/sft.py) on three tables.

In:  upstream manifests: "problems" (pi_theta0; q_phi hinted), "prior_samples" + "prior_verdicts" (q_phi
     when posterior_objective is forward_kl), "train" (final), optional "init" (a model manifest with
     `model_dir` to start from, for EM rounds > 1; default: the base model).
Out: the examples each model trained on as the stage's Parquet shards (prompt_idx, prompt, response,
     weight, think_chars), the HF model folder `<stage dir>/model`, and a manifest with `model_dir` and the
     training metrics. The store folder is stable (it is named by the fingerprint), so a crash mid-training
     resumes from the trainer's checkpoint on rerun.

Example builders (pure):
- `pi_theta0_examples`: the π_θ template on the reference traces (method.md §4), weight 1.
- `q_phi_examples`: the hinted posterior template (PA/PB), the reference solution as hint y′, the reference
  thought as target, weight 1: the paper's practice (method.md §2 "In practice").
- `q_phi_forward_kl_examples`: Eq.9: traces z_m sampled from π_θ without the hint, weight w̃_m = accuracy of
  z_m normalised over the M traces of the question. Traces of weight 0 (and questions with no correct trace)
  are dropped: they carry no gradient but would still count in the Dr. SFT normaliser's example count.
- `final_examples`: the `train` table as is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import polars as pl

import trainers.sft
from trainers.sft import train
from variational import models, templates
from variational.config import RunConfig
from variational.stage import finish_stage, logger, open_store, reuse_stage, stage_task
from variational.store import code_version, fingerprint, read_stage

PI_THETA0, Q_PHI, FINAL = "finetune_pi_theta0", "finetune_q_phi", "final_sft"
SECTION = {PI_THETA0: "pi_theta0", Q_PHI: "q_phi", FINAL: "final"}  # RunConfig training section per stage
SHARD_ROWS = 4096
EXAMPLES_SCHEMA = pl.Schema(
    {
        "prompt_idx": pl.Int64,
        "prompt": pl.String,
        "response": pl.String,
        "weight": pl.Float64,
        "think_chars": pl.Int64,
    }
)


# ---------------------------------------------------------------- pure example builders
def pi_theta0_examples(problems: pl.DataFrame) -> pl.DataFrame:
    rows = [
        {
            "prompt_idx": p["prompt_idx"],
            "prompt": templates.pi_prompt(p["question"]),
            "response": templates.pi_response(p["think_ref"], p["solution_ref"]),
            "weight": 1.0,
            "think_chars": len(p["think_ref"]),
        }
        for p in problems.iter_rows(named=True)
    ]
    return pl.DataFrame(rows, schema=EXAMPLES_SCHEMA)


def q_phi_examples(problems: pl.DataFrame, template: templates.PosteriorTemplate) -> pl.DataFrame:
    rows = [
        {
            "prompt_idx": p["prompt_idx"],
            "prompt": templates.posterior_prompt(p["question"], p["solution_ref"], template),
            "response": templates.posterior_response(p["think_ref"], template),
            "weight": 1.0,
            "think_chars": len(p["think_ref"]),
        }
        for p in problems.iter_rows(named=True)
    ]
    return pl.DataFrame(rows, schema=EXAMPLES_SCHEMA)


def q_phi_forward_kl_examples(
    problems: pl.DataFrame,
    prior_samples: pl.DataFrame,
    prior_verdicts: pl.DataFrame,
    template: templates.PosteriorTemplate,
) -> pl.DataFrame:
    """Eq.9: hinted-posterior targets = prior traces, weights = per-question normalised accuracy.

    A trace's accuracy is the mean `correct` of its verdict rows (0 when it has none); a trace whose think
    span is unfinished (format_ok false) gets weight 0."""
    acc = prior_verdicts.group_by("prompt_idx", "sample_idx").agg(
        accuracy=pl.col("correct").cast(pl.Float64).mean()
    )
    traces = (
        prior_samples.select("prompt_idx", "sample_idx", "think", "format_ok")
        .join(acc, on=["prompt_idx", "sample_idx"], how="left")
        .with_columns(raw=pl.when(pl.col("format_ok")).then(pl.col("accuracy").fill_null(0.0)).otherwise(0.0))
        .with_columns(total=pl.col("raw").sum().over("prompt_idx"))
        .filter(pl.col("raw") > 0)  # also drops every trace of a question with no correct one
        .with_columns(weight=pl.col("raw") / pl.col("total"))
        .join(problems.select("prompt_idx", "question", "solution_ref"), on="prompt_idx", how="inner")
        .sort("prompt_idx", "sample_idx")
    )
    rows = [
        {
            "prompt_idx": t["prompt_idx"],
            "prompt": templates.posterior_prompt(t["question"], t["solution_ref"], template),
            "response": templates.posterior_response(t["think"], template),
            "weight": t["weight"],
            "think_chars": len(t["think"]),
        }
        for t in traces.iter_rows(named=True)
    ]
    return pl.DataFrame(rows, schema=EXAMPLES_SCHEMA)


def final_examples(train_table: pl.DataFrame) -> pl.DataFrame:
    """The `train` table -> examples; think_chars from the response's `<|end_of` cut when absent."""
    df = train_table
    if "think_chars" not in df.columns:
        df = df.with_columns(
            think_chars=pl.col("response").map_elements(
                lambda r: len(templates.cut_think(r)[0]), return_dtype=pl.Int64
            )
        )
    if "prompt_idx" not in df.columns:
        df = df.with_columns(prompt_idx=pl.lit(None, dtype=pl.Int64))
    return df.select(pl.col(name).cast(dtype) for name, dtype in EXAMPLES_SCHEMA.items())


# ---------------------------------------------------------------- fingerprints
def _start_identity(cfg: dict, upstream: dict[str, dict]) -> str:
    init = upstream.get("init")
    if init:
        return init.get("fingerprint") or str(init["model_dir"])
    return models.model_identity(cfg["base_model"])


def _fingerprint(
    stage: str, inputs: tuple[str, ...], cfg: dict, upstream: dict[str, dict], round_: int
) -> str:
    config = {"train": cfg[SECTION[stage]], "start_model": _start_identity(cfg, upstream)}
    if stage == Q_PHI:
        config |= {
            "posterior_template": cfg["posterior_template"],
            "objective": _q_phi_objective(cfg, upstream),
        }
    return fingerprint(
        stage,
        code=code_version(sys.modules[__name__], trainers.sft, templates),
        config=config,
        upstream={k: upstream[k]["fingerprint"] for k in inputs if k in upstream},
        round=round_,
    )


def _q_phi_objective(cfg: dict, upstream: dict[str, dict]) -> str:
    # the flow sends prior samples only for forward KL (and for every round > 1, Algorithm 1)
    return "forward_kl" if "prior_samples" in upstream else "hinted_sft"


def fingerprint_pi_theta0(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    return _fingerprint(PI_THETA0, ("problems",), cfg, upstream, round_)


def fingerprint_q_phi(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    return _fingerprint(Q_PHI, ("problems", "prior_samples", "prior_verdicts"), cfg, upstream, round_)


def fingerprint_final(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    return _fingerprint(FINAL, ("train",), cfg, upstream, round_)


FINGERPRINTS = {PI_THETA0: fingerprint_pi_theta0, Q_PHI: fingerprint_q_phi, FINAL: fingerprint_final}


# ---------------------------------------------------------------- the shared task body
def finetune(
    stage: str,
    cfg: dict,
    upstream: dict[str, dict],
    round_: int,
    build: Callable[[RunConfig, dict[str, dict]], pl.DataFrame],
) -> dict:
    """Open the store, reuse it when complete, else build the examples, persist them, train, finish."""
    conf = RunConfig.model_validate(cfg)
    store = open_store(cfg, stage, FINGERPRINTS[stage](cfg, upstream, round_))
    if store.is_complete():
        return reuse_stage(store, round_)
    examples = build(conf, upstream)
    if examples.is_empty():
        raise ValueError(f"{stage}: no training examples (upstream {sorted(upstream)}); nothing to train on")
    for i in range(0, examples.height, SHARD_ROWS):
        if not store.has_shard(i // SHARD_ROWS):
            store.write_shard(i // SHARD_ROWS, examples.slice(i, SHARD_ROWS))
    init = upstream.get("init")
    start = str(init["model_dir"]) if init else models.resolve_model(conf.base_model)
    logger().info("%s: %d examples, from %s -> %s", stage, examples.height, start, store.model_dir)
    metrics = train(start, examples, getattr(conf, SECTION[stage]), store.model_dir)
    summary = (
        "| examples | steps | tokens | tokens/s | first loss | final loss |\n|---|---|---|---|---|---|\n"
        f"| {examples.height} | {metrics['steps']} | {metrics['tokens']} | {metrics['tokens_per_s'] or 0:.0f} "
        f"| {metrics['loss_curve'][0]:.4f} | {metrics['final_loss']:.4f} |\n"
    )
    return finish_stage(
        store,
        round_,
        rows_in=examples.height,
        summary=summary,
        model_dir=str(store.model_dir),
        metrics=metrics,
    )


def _pi_theta0(conf: RunConfig, upstream: dict[str, dict]) -> pl.DataFrame:
    return pi_theta0_examples(read_stage(upstream["problems"]))


def _q_phi(conf: RunConfig, upstream: dict[str, dict]) -> pl.DataFrame:
    problems = read_stage(upstream["problems"])
    if "prior_samples" in upstream:
        samples, verdicts = read_stage(upstream["prior_samples"]), read_stage(upstream["prior_verdicts"])
        return q_phi_forward_kl_examples(problems, samples, verdicts, conf.posterior_template)
    if conf.posterior_objective == "forward_kl":
        raise ValueError("posterior_objective forward_kl needs upstream prior_samples and prior_verdicts")
    return q_phi_examples(problems, conf.posterior_template)


def _final(conf: RunConfig, upstream: dict[str, dict]) -> pl.DataFrame:
    return final_examples(read_stage(upstream["train"]))


@stage_task(PI_THETA0, fingerprint_pi_theta0)
def finetune_pi_theta0_task(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict:
    return finetune(PI_THETA0, cfg, upstream, round_, _pi_theta0)


@stage_task(Q_PHI, fingerprint_q_phi)
def finetune_q_phi_task(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict:
    return finetune(Q_PHI, cfg, upstream, round_, _q_phi)


@stage_task(FINAL, fingerprint_final)
def final_sft_task(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict:
    return finetune(FINAL, cfg, upstream, round_, _final)
