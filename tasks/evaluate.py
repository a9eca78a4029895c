"""Stage `eval`: benchmarks -> k samples per problem from each model -> each benchmark's grader -> `eval` + summary.

In:  model manifests under upstream keys "base", "pi_theta0", "pi_theta" (each with "model_dir"), and
     cfg.eval.benchmarks (embedded:<name>, a local .jsonl/.parquet file or folder, or a hub id), loaded and
     prompted by variational.data.benchmarks as the paper's harness does (SkyThought 0d190f1).
Out: the `eval` table, one shard per model (shard i = i-th evaluated model, so a crash while evaluating the
     third model keeps the first two), columns model, benchmark, problem_id, sample, text, n_tokens,
     finish_reason, extracted, correct, status (our grader) and extracted_official, correct_official,
     status_official (the official harness's); and `summary.parquet` beside the shards (one row per
     model x benchmark x grader: n_problems, k, avg_at_k, its 95% bootstrap interval, pass@1, pass@2, ...
     in WIDE format, null where a benchmark has fewer samples than that k), rendered as the markdown
     artifact comparing the models, with the paper's table (Math avg / Other avg beside its 4B numbers).
Graders (grade_samples): every sample is graded both ways in one pass. Ours: math -> math-verify,
mmlu_pro / gpqa -> the chosen letter, code -> the tests by the APPS rules. Official (method.md §10): math ->
the official math grader on the benchmark's answer, mmlu_pro / gpqa -> the harness's letter readers, code ->
the LiveCodeBench harness's rules in our sandbox. `parity` picks the prompts (variational/parity.py
`eval_prompts`): strict asks every model in the π_θ template with the starter code of LiveCodeBench
functional problems; official asks through each model's own chat template (the trained models: Sky-T1 +
`<begin_of_thought>` prefill; the base model: qwen_cot), AIME25 question-first, LiveCodeBench without
starter code, GPQA in the harness's option order.
Metrics and summary tables (avg@k, its interval, pass@k, the paper's table): variational/analysis/metrics.py.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from variational import parity, templates
from variational.analysis.metrics import MODELS, VERDICT_COLUMNS, summarize, summary_markdown  # noqa: F401
from variational.config import EngineConfig, EvalConfig, VerifyConfig
from variational.data import benchmarks
from variational.data.benchmarks import benchmark_hash, load_benchmark  # noqa: F401  (the task uses them)
from variational.engines.sampling import Sampler, request_seed
from variational.pipeline.stage import Engine, Inputs, Stage, logger
from variational.verifiers import answers
from variational.verifiers.answers import GRADING_CODE
from variational.verifiers.math_rules import MathPool
from variational.verifiers.procpool import cpu_count

KEY = ["model", "benchmark", "problem_id", "sample"]


# ---------------------------------------------------------------- stage core (pure)


def build_eval_requests(benchmarks: dict[str, pl.DataFrame], cfg: EvalConfig) -> pl.DataFrame:
    """benchmark -> problems frames (variational.data.benchmarks.load_benchmark) -> one request per problem:
    request_idx (stable, used for seeds), benchmark, problem_id, user (the harness's user message), prompt
    (the pi_theta template around it: strict parity; `frame_prompts` reframes it), grader, gold, tests, k."""
    frames = []
    for name, df in benchmarks.items():
        if name not in cfg.benchmarks:
            raise ValueError(f"benchmark {name!r} is not in eval.benchmarks {list(cfg.benchmarks)}")
        spec = cfg.benchmarks[name]
        frames.append(
            df.select(
                pl.lit(name).alias("benchmark"),
                pl.col("problem_id").cast(pl.String),
                pl.col("user").cast(pl.String),
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


def frame_prompts(requests: pl.DataFrame, frame: str, model: str, tokenizer: Any = None) -> pl.DataFrame:
    """The prompt each model is asked with around the harness's user message (parity.EvalPrompts.frame):
    "pi_template" (strict): the π_θ template for every model. "chat_template" (official): the model's own
    chat template, the trained models with the Sky-T1 system prompt and the `<begin_of_thought>` prefill,
    the base model with qwen_cot and the template's generation prompt (the harness's model configs)."""
    if frame == "pi_template":
        render = templates.pi_prompt
    elif frame != "chat_template":
        raise ValueError(f"unknown eval prompt frame {frame!r}; use pi_template or chat_template")
    elif model == "base":

        def render(user: str) -> str:
            return templates.chat_template_prompt(tokenizer, templates.QWEN_COT_SYSTEM, user, None)
    else:

        def render(user: str) -> str:
            system, prefill = templates.OFFICIAL_EVAL_SYSTEM, templates.OFFICIAL_EVAL_PREFILL
            return templates.chat_template_prompt(tokenizer, system, user, prefill)

    return requests.with_columns(prompt=pl.Series([render(u) for u in requests["user"]], dtype=pl.String))


def eval_engine_config(engine: EngineConfig, cfg: EvalConfig) -> EngineConfig:
    """The engine settings for evaluation: `eval.dtype` (the paper evaluates in float32) over engine.dtype."""
    return engine if cfg.dtype is None else engine.model_copy(update={"dtype": cfg.dtype})


def _grade_choices(rows: pl.DataFrame, grader: str) -> pl.DataFrame:
    if grader == "official":
        extracted = [
            benchmarks.official_choice(t, g) for t, g in zip(rows["text"], rows["grader"], strict=True)
        ]
    else:
        extracted = [
            benchmarks.extract_choice(t, benchmarks.LETTERS[g])
            for t, g in zip(rows["text"].to_list(), rows["grader"].to_list(), strict=True)
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


def _grade(rows: pl.DataFrame, cfg: VerifyConfig, grader: str, pool: MathPool | None) -> pl.DataFrame:
    """__row, extracted, correct, status of every row by one grader ("strict": ours, "official": the
    harness's: the first gold only, as its handlers read one answer per problem). `pool`: the strict
    grader's workers; the official grader's are check_answers' own."""
    verdict_cols = ["__row", "extracted", "correct", "status"]
    parts = []
    math_rows = rows.filter(pl.col("grader") == "math").select("__row", "text", "gold")
    if math_rows.height:
        if grader == "official":
            math_rows = math_rows.with_columns(pl.col("gold").list.head(1))
        checked = answers.check_answers(math_rows, cfg.timeout_s, cfg.workers, pool=pool, grader=grader)
        parts.append(checked.select(verdict_cols))
    choice_rows = rows.filter(pl.col("grader").is_in(["mmlu_pro", "gpqa"]))
    if choice_rows.height:
        parts.append(_grade_choices(choice_rows, grader))
    code_rows = rows.filter(pl.col("grader") == "code")
    if code_rows.height:
        checked = answers.check_code(
            code_rows.select("__row", "text", "tests"),
            timeout_s=cfg.code_timeout_s,
            memory_mb=cfg.code_memory_mb,
            workers=cfg.workers,
            problem_timeout_s=cfg.code_problem_timeout_s,
            comparison="lcb" if grader == "official" else "apps",
            sandbox=cfg.sandbox,
        )
        parts.append(checked.select(verdict_cols))
    return pl.concat([p.cast({"extracted": pl.String}) for p in parts])


def grade_samples(samples: pl.DataFrame, cfg: VerifyConfig) -> pl.DataFrame:
    """samples[text, grader, gold, tests, ...] -> the same rows + both verdicts (metrics.VERDICT_COLUMNS):
    extracted, correct, status by our graders and extracted_official, correct_official, status_official by
    the official harness's, each row by its benchmark's grader (module docstring)."""
    rows = samples.with_row_index("__row")
    graders = set(rows["grader"].unique().to_list())
    if unknown := graders - {"math", "mmlu_pro", "gpqa", "code"}:
        raise ValueError(
            f"grade_samples: unknown graders {sorted(unknown)}; use math, mmlu_pro, gpqa or code"
        )
    n_math = rows.filter(pl.col("grader") == "math").height
    with MathPool(min(cfg.workers or cpu_count(), max(1, n_math))) as pool:  # workers start on first use
        for grader, names in VERDICT_COLUMNS.items():
            verdicts = _grade(rows, cfg, grader, pool if grader == "strict" else None)
            renamed = verdicts.rename(dict(zip(("extracted", "correct", "status"), names, strict=True)))
            rows = rows.join(renamed, on="__row", how="left")
    return rows.sort("__row").drop("__row")


def score_eval(samples: pl.DataFrame, verdicts: pl.DataFrame) -> pl.DataFrame:
    """samples (model, benchmark, problem_id, sample, text[, n_tokens, finish_reason]) + verdicts (the same
    keys + extracted, correct, status[, and their *_official twins]) -> the `eval` table. Every sample
    needs exactly one verdict of each grader present."""
    sets = [cols for cols in VERDICT_COLUMNS.values() if cols[2] in verdicts.columns]
    v = verdicts.select(*KEY, *(c for cols in sets for c in cols))
    if v.select(KEY).is_duplicated().any():
        raise ValueError("score_eval: duplicate verdicts for the same (model, benchmark, problem_id, sample)")
    extra = [c for c in ("n_tokens", "finish_reason") if c in samples.columns]
    out = samples.select(*KEY, "text", *extra).join(v, on=KEY, how="left")
    missing = out.filter(pl.any_horizontal(pl.col(cols[2]).is_null() for cols in sets))
    if missing.height:
        raise ValueError(f"score_eval: {missing.height} samples have no verdict, e.g. {missing.row(0)[:4]}")
    return out.with_columns(pl.col(cols[1]).cast(pl.Boolean) for cols in sets).sort(KEY)


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
    model, prompts = part["model"][0], parity.eval_prompts(i.conf)
    specs = i.conf.eval.benchmarks.items()
    requests = build_eval_requests(
        {name: load_benchmark(name, spec, prompts) for name, spec in specs}, i.conf.eval
    )
    logger().info("eval: %s on %d problems (%s prompts)", model, requests.height, prompts.frame)
    sampler = engine.get().serve(i.model_dir(UPSTREAM_OF[model]))
    requests = frame_prompts(requests, prompts.frame, model, sampler.tokenizer)
    samples = generate_samples(sampler, requests, model, i.conf.eval)
    return score_eval(samples, grade_samples(samples, i.conf.verify))


def _benchmarks(i: Inputs) -> dict:
    return {"benchmarks": {name: benchmark_hash(spec) for name, spec in i.conf.eval.benchmarks.items()}}


EVAL = Stage(
    name="eval",
    inputs=("base_model", "pi_theta0", "pi_theta"),
    fields=(
        "parity",
        "eval",
        "engine",
        "verify.timeout_s",
        "verify.code_timeout_s",
        "verify.code_problem_timeout_s",
        "verify.code_memory_mb",
        "verify.code_sandboxed",
    ),
    uses=("verify",),
    code=(
        *GRADING_CODE,
        "variational.parity",
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
