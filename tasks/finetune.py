"""Model stages `pi_theta0`, `q_phi`, `pi_theta` (the final SFT): weighted SFT (trainers/sft.py) on three tables.

In:  upstream refs: "problems" (pi_theta0; q_phi hinted), "prior_samples" + "prior_verdicts" (q_phi
     when posterior_objective is forward_kl), "train" (pi_theta), "base_model", optional "init" (the model
     to start from in EM rounds > 1; default: the base model).
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

from collections.abc import Callable
from pathlib import Path

import polars as pl

from trainers.launch import run_training
from variational import templates
from variational.config import TrainConfig
from variational.pipeline.stage import Inputs, Stage, logger

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


# ---------------------------------------------------------------- declarations
def start_model(i: Inputs) -> str:
    """Where training starts: the previous round's model (`init`, EM rounds > 1) or the base model."""
    return i.model_dir("init") if i.has("init") else i.model_dir("base_model")


def trainer(section: str) -> Callable[[Inputs, pl.DataFrame, Path], dict]:
    """The `train` hook of a model stage: weighted SFT with the config section `section`."""

    def run(i: Inputs, examples: pl.DataFrame, out_dir: Path) -> dict:
        metrics = run_training(start_model(i), examples, getattr(i.conf, section), out_dir, log=logger())
        summary = (
            "| examples | steps | tokens | tokens/s | first loss | final loss |\n|---|---|---|---|---|---|\n"
            f"| {examples.height} | {metrics['steps']} | {metrics['tokens']} | {metrics['tokens_per_s'] or 0:.0f} "
            f"| {metrics['loss_curve'][0]:.4f} | {metrics['final_loss']:.4f} |\n"
        )
        return {"metrics": metrics, "summary": summary}

    return run


def _q_phi_examples(i: Inputs) -> pl.DataFrame:
    problems = i.table("problems")
    if i.has("prior_samples"):  # Eq.9 (forward_kl, and every EM round > 1: Algorithm 1)
        samples, verdicts = i.table("prior_samples"), i.table("prior_verdicts")
        return q_phi_forward_kl_examples(problems, samples, verdicts, i.conf.posterior_template)
    if i.conf.posterior_objective == "forward_kl":
        raise ValueError("posterior_objective forward_kl needs upstream prior_samples and prior_verdicts")
    return q_phi_examples(problems, i.conf.posterior_template)


_MODEL = {
    "code": (
        "trainers.sft",
        "trainers.batches",
        "trainers.model",
        "trainers.distributed",
        "trainers.checkpoint",
        "variational.templates",
    ),
    "verify_inputs": True,  # hash-check the examples' sources before hours of training
    "needs_gpu": True,
}
# How a run is spread and checkpointed does not change the weights (tests/test_distributed.py: 1 vs 2
# processes agree within 1e-5): those knobs are read, never fingerprinted.
PLACEMENT = ("num_processes", "nodes", "save_steps", "save_minutes")


def trained_by(section: str) -> dict[str, tuple[str, ...]]:
    """The Stage fields/uses of a model trained with config section `section`."""
    results = tuple(f"{section}.{f}" for f in TrainConfig.model_fields if f not in PLACEMENT)
    return {"fields": results, "uses": (section,)}


PI_THETA0 = Stage(
    name="pi_theta0",
    inputs=("problems", "base_model", "init"),
    **trained_by("pi_theta0"),
    examples=lambda i: pi_theta0_examples(i.table("problems")),
    train=trainer("pi_theta0"),
    **_MODEL,
)
Q_PHI = Stage(
    name="q_phi",
    inputs=("problems", "prior_samples", "prior_verdicts", "base_model", "init"),
    fields=trained_by("q_phi")["fields"] + ("posterior_template", "posterior_objective"),
    uses=("q_phi",),
    examples=_q_phi_examples,
    train=trainer("q_phi"),
    **_MODEL,
)
PI_THETA = Stage(
    name="pi_theta",
    inputs=("train", "base_model", "init"),
    **trained_by("final"),
    examples=lambda i: final_examples(i.table("train")),
    train=trainer("final"),
    **_MODEL,
)
