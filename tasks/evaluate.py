"""Stage `eval`: benchmarks -> k samples per problem from each model -> each benchmark's grader -> `eval` + summary.

In:  model manifests under upstream keys "base", "pi_theta0", "pi_theta" (each with "model_dir"), and
     cfg.eval.benchmarks (embedded:<name>, a local .jsonl/.parquet file or folder, or a hub id), loaded and
     prompted by variational.data.benchmarks as the paper's harness does (SkyThought 0d190f1).
Out: the `eval` table, one shard per model (shard i = i-th evaluated model, so a crash while evaluating the
     third model keeps the first two), columns model, benchmark, problem_id, sample, text, n_tokens,
     finish_reason, extracted, correct, status; and `summary.parquet` beside the shards (one row per
     model x benchmark: n_problems, k, avg_at_k, its 95% bootstrap interval, pass@1, pass@2, ... in WIDE
     format, null where a benchmark has fewer samples than that k), rendered as the markdown artifact
     comparing the models, with the paper's table (Math avg / Other avg beside its 4B numbers).
Graders (grade_samples): math -> math-verify, mmlu_pro / gpqa -> the chosen letter, code -> the tests.
Metrics and summary tables (avg@k, its interval, pass@k, the paper's table): variational/analysis/metrics.py.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from variational import templates
from variational.analysis.metrics import MODELS, summarize, summary_markdown  # noqa: F401
from variational.config import EngineConfig, EvalConfig, VerifyConfig
from variational.data import benchmarks
from variational.data.benchmarks import benchmark_hash, load_benchmark  # noqa: F401  (the task uses them)
from variational.engines.sampling import Sampler, request_seed
from variational.pipeline.stage import Engine, Inputs, Stage, logger
from variational.verifiers import answers
from variational.verifiers.answers import GRADING_CODE

KEY = ["model", "benchmark", "problem_id", "sample"]


# ---------------------------------------------------------------- stage core (pure)


def build_eval_requests(benchmarks: dict[str, pl.DataFrame], cfg: EvalConfig) -> pl.DataFrame:
    """benchmark -> problems frames (variational.data.benchmarks.load_benchmark) -> one request per problem:
    request_idx (stable, used for seeds), benchmark, problem_id, prompt (the pi_theta template around the
    harness's user message), grader, gold, tests, k."""
    frames = []
    for name, df in benchmarks.items():
        if name not in cfg.benchmarks:
            raise ValueError(f"benchmark {name!r} is not in eval.benchmarks {list(cfg.benchmarks)}")
        spec = cfg.benchmarks[name]
        frames.append(
            df.select(
                pl.lit(name).alias("benchmark"),
                pl.col("problem_id").cast(pl.String),
                pl.col("user").map_elements(templates.pi_prompt, return_dtype=pl.String).alias("prompt"),
                pl.lit(spec.grader).alias("grader"),
                pl.col("gold").cast(pl.List(pl.String)),
                (pl.col("tests") if "tests" in df.columns else pl.lit(None)).cast(pl.String).alias("tests"),
                pl.lit(spec.k, dtype=pl.Int64).alias("k"),
            )
        )
    if not frames:
        raise ValueError("eval.benchmarks is empty: add at least one benchmark to the config")
    return pl.concat(frames).with_row_index("request_idx").with_columns(pl.col("request_idx").cast(pl.Int64))


def eval_engine_config(engine: EngineConfig, cfg: EvalConfig) -> EngineConfig:
    """The engine settings for evaluation: `eval.dtype` (the paper evaluates in float32) over engine.dtype."""
    return engine if cfg.dtype is None else engine.model_copy(update={"dtype": cfg.dtype})


def _grade_choices(rows: pl.DataFrame) -> pl.DataFrame:
    extracted = [
        benchmarks.extract_choice(text, benchmarks.LETTERS[grader])
        for text, grader in zip(rows["text"].to_list(), rows["grader"].to_list(), strict=True)
    ]
    correct = [x is not None and x in gold for x, gold in zip(extracted, rows["gold"].to_list(), strict=True)]
    status = [
        "no_answer" if x is None else "ok" if ok else "wrong"
        for x, ok in zip(extracted, correct, strict=True)
    ]
    return rows.select("__row").with_columns(
        pl.Series("extracted", extracted, pl.String),
        pl.Series("correct", correct, pl.Boolean),
        pl.Series("status", status, pl.String),
    )


def grade_samples(samples: pl.DataFrame, cfg: VerifyConfig) -> pl.DataFrame:
    """samples[text, grader, gold, tests, ...] -> the same rows + extracted, correct, status, each row by
    its benchmark's grader: math -> answers.check_answers (math-verify), mmlu_pro / gpqa -> the chosen
    letter (benchmarks.extract_choice), code -> answers.check_code on the APPS `input_output` tests."""
    rows = samples.with_row_index("__row")
    graders = set(rows["grader"].unique().to_list())
    if unknown := graders - {"math", "mmlu_pro", "gpqa", "code"}:
        raise ValueError(
            f"grade_samples: unknown graders {sorted(unknown)}; use math, mmlu_pro, gpqa or code"
        )
    verdict_cols = ["__row", "extracted", "correct", "status"]
    parts = []
    math_rows = rows.filter(pl.col("grader") == "math")
    if math_rows.height:
        checked = answers.check_answers(math_rows.select("__row", "text", "gold"), cfg.timeout_s, cfg.workers)
        parts.append(checked.select(verdict_cols))
    choice_rows = rows.filter(pl.col("grader").is_in(["mmlu_pro", "gpqa"]))
    if choice_rows.height:
        parts.append(_grade_choices(choice_rows))
    code_rows = rows.filter(pl.col("grader") == "code")
    if code_rows.height:
        checked = answers.check_code(
            code_rows.select("__row", "text", "tests"),
            timeout_s=cfg.code_timeout_s,
            memory_mb=cfg.code_memory_mb,
            workers=cfg.workers,
        )
        parts.append(checked.select(verdict_cols))
    verdicts = pl.concat([p.cast({"extracted": pl.String}) for p in parts])
    return rows.join(verdicts, on="__row", how="left").sort("__row").drop("__row")


def score_eval(samples: pl.DataFrame, verdicts: pl.DataFrame) -> pl.DataFrame:
    """samples (model, benchmark, problem_id, sample, text[, n_tokens, finish_reason]) + verdicts (the same
    keys + extracted, correct, status) -> the `eval` table. Every sample needs exactly one verdict."""
    v = verdicts.select(*KEY, "extracted", "correct", "status")
    if v.select(KEY).is_duplicated().any():
        raise ValueError("score_eval: duplicate verdicts for the same (model, benchmark, problem_id, sample)")
    extra = [c for c in ("n_tokens", "finish_reason") if c in samples.columns]
    out = samples.select(*KEY, "text", *extra).join(v, on=KEY, how="left")
    missing = out.filter(pl.col("status").is_null())
    if missing.height:
        raise ValueError(f"score_eval: {missing.height} samples have no verdict, e.g. {missing.row(0)[:4]}")
    return out.with_columns(pl.col("correct").cast(pl.Boolean)).sort(KEY)


# ---------------------------------------------------------------- generation
def generate_samples(sampler: Any, requests: pl.DataFrame, model: str, cfg: EvalConfig) -> pl.DataFrame:
    """k completions per request (grouped by k: one engine call per distinct k, n=k, never k copies).
    Seeds: sampling.seed + a stable offset per request (sampling.request_seed of request_idx), so every
    problem has its own stream and reruns reproduce it."""
    rows = []
    for (k,), grp in requests.group_by("k", maintain_order=True):
        outs = sampler.generate(
            grp["prompt"].to_list(),
            n=int(k),
            sampling=cfg.sampling,
            stop=[templates.ANSWER_STOP],
            seeds=[request_seed(cfg.sampling.seed, 0, int(i)) for i in grp["request_idx"]],
            include_stop=True,
        )
        for req, comps in zip(grp.iter_rows(named=True), outs, strict=True):
            for j, comp in enumerate(comps):
                rows.append(
                    {
                        "model": model,
                        "benchmark": req["benchmark"],
                        "problem_id": req["problem_id"],
                        "sample": j,
                        "text": comp.text,
                        "n_tokens": comp.n_tokens,
                        "finish_reason": comp.finish_reason,
                        "grader": req["grader"],
                        "gold": req["gold"],
                        "tests": req["tests"],
                    }
                )
    overrides = {"gold": pl.List(pl.String), "sample": pl.Int64, "tests": pl.String, "grader": pl.String}
    return pl.DataFrame(rows, schema_overrides=overrides)


# ---------------------------------------------------------------- declaration
UPSTREAM_OF = {"base": "base_model", "pi_theta0": "pi_theta0", "pi_theta": "pi_theta"}  # eval.models -> stage


def _plan(i: Inputs) -> pl.DataFrame:
    """One shard per model to evaluate (shard i = model i), so a finished model survives a crash."""
    models = [m for m in i.conf.eval.models if i.has(UPSTREAM_OF[m])]
    if not models:
        raise ValueError(f"eval: none of eval.models {i.conf.eval.models} is upstream ({sorted(i.refs)})")
    if skipped := [m for m in i.conf.eval.models if m not in models]:
        logger().warning("eval: no upstream model for %s; skipping them", skipped)
    return pl.DataFrame({"model": models})


class EvalSampler:
    """The engine of the eval stage: one Sampler for every model it evaluates, opened on the first and
    handed the next model's weights (Sampler.load: the models are fine-tunes of one base model), so three
    models cost one engine start. Settings: engine with `eval.dtype`; prefix caching on, so the n = k
    samples of a problem and all problems share the prefill of the system prompt (the rows are those of
    an engine without it: bench/RESULTS.md 2026-12-04)."""

    def __init__(self, i: Inputs):
        self.config = eval_engine_config(i.conf.engine, i.conf.eval)
        self.sampler: Sampler | None = None

    def serve(self, model_dir: str) -> Sampler:
        if self.sampler is None:
            self.sampler = Sampler(model_dir, self.config, prefix_caching=True)
        else:
            self.sampler.load(model_dir)
        return self.sampler

    def counters(self) -> dict[str, Any]:
        return self.sampler.counters() if self.sampler is not None else {}

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()


def _shard(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
    model = part["model"][0]
    benchmarks = {name: load_benchmark(name, spec) for name, spec in i.conf.eval.benchmarks.items()}
    requests = build_eval_requests(benchmarks, i.conf.eval)
    logger().info("eval: %s on %d problems of %s", model, requests.height, list(benchmarks))
    sampler = engine.get().serve(i.model_dir(UPSTREAM_OF[model]))
    samples = generate_samples(sampler, requests, model, i.conf.eval)
    return score_eval(samples, grade_samples(samples, i.conf.verify))


def _benchmarks(i: Inputs) -> dict:
    return {"benchmarks": {name: benchmark_hash(spec) for name, spec in i.conf.eval.benchmarks.items()}}


EVAL = Stage(
    name="eval",
    inputs=("base_model", "pi_theta0", "pi_theta"),
    fields=("eval", "engine", "verify.timeout_s", "verify.code_timeout_s", "verify.code_memory_mb"),
    uses=("verify",),
    code=(
        *GRADING_CODE,
        "variational.engines.sampling",
        "variational.data.benchmarks",
        "variational.analysis.metrics",
    ),
    plan=_plan,
    shard=_shard,
    engine=EvalSampler,
    identity=_benchmarks,
    summary=lambda i, rows: summary_markdown(summarize(rows), list(i.conf.eval.models)),
    side=lambda i, rows: {"summary": summarize(rows)},
    per_round=False,
    needs_gpu=True,
)
