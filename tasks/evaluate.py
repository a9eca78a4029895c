"""evaluate: benchmarks -> k samples per problem from each model -> math-verify -> `eval` table + summary.

In:  model manifests under upstream keys "base", "pi_theta0", "pi_theta" (each with "model_dir"), and
     cfg.eval.benchmarks (embedded:<name>, a local .jsonl/.parquet file or folder, or a hub id).
Out: the `eval` table, one shard per model (shard i = i-th evaluated model, so a crash while evaluating the
     third model keeps the first two), columns model, benchmark, problem_id, sample, text, n_tokens,
     finish_reason, extracted, correct, status; and `summary.parquet` beside the shards (one row per
     model x benchmark: n_problems, k, avg_at_k, pass@1, pass@2, ... in WIDE format, null where a
     benchmark has fewer samples than that k), rendered as the markdown artifact comparing the models.
Metrics (method.md §6): Avg@k = mean accuracy over all k samples of a problem, averaged over problems;
Pass@k = the unbiased estimator of Chen et al. 2021 on the same samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl

import variational
from tasks import verify  # math_verify itself is imported only in its worker processes
from variational import sampling, templates
from variational.config import BenchmarkConfig, EvalConfig, RunConfig
from variational.sampling import Sampler, request_seed
from variational.stage import finish_stage, logger, open_store, reuse_stage, stage_task
from variational.store import code_version, fingerprint, write_parquet_atomic

# store folder and task name; the DuckDB view is `eval` (variational.sqlview.TABLE_OF). stage_task's cache
# check looks for <run>/<task name>/<fp>/manifest.json, so the two names must be the same.
STAGE = "evaluate"
MODELS = ("base", "pi_theta0", "pi_theta")
EMBEDDED_EVAL_DIR = Path(variational.__file__).resolve().parent / "data" / "eval"
KEY = ["model", "benchmark", "problem_id", "sample"]
# Column names seen in public math benchmarks (MATH-500, AIME, OlympiadBench, GSM8K, NuminaMath ...),
# tried in this order; `solution` is a last resort for gold (its last \boxed{} or text after ####).
ID_COLUMNS = ("id", "problem_id", "unique_id", "idx", "question_id", "ID")
PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question", "prompt")
GOLD_COLUMNS = ("answer", "final_answer", "expected_answer", "gold", "ground_truth", "Answer")
SOLUTION_COLUMNS = ("solution", "Solution")


# ---------------------------------------------------------------- metrics (pure)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for n samples of which c are correct.

    Product form 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, stable for n in the thousands."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def powers_of_two(k: int) -> list[int]:
    return [2**e for e in range(int(math.log2(k)) + 1)] if k >= 1 else []


def summarize(eval_rows: pl.DataFrame, ks: list[int] | None = None) -> pl.DataFrame:
    """Per (model, benchmark): n_problems, k, avg_at_k, pass@1, pass@2, ... (wide, fractions in [0, 1]).

    k = samples per problem (the smallest count when problems differ); `ks` default: the powers of two
    <= k of each benchmark; a pass@j column is null for a benchmark with k < j. Rows whose status is
    `gold_unparsable` are skipped (their samples counted in n_skipped): a gold that does not parse says nothing about the
    model (open-r1 does the same). Input columns: model, benchmark, problem_id, sample, correct[, status]."""
    skip = pl.col("status") == "gold_unparsable" if "status" in eval_rows.columns else pl.lit(False)
    per_problem = (
        eval_rows.with_columns(skip=skip)
        .group_by("model", "benchmark", "problem_id")
        .agg(
            n=(~pl.col("skip")).sum().cast(pl.Int64),
            c=(pl.col("correct").fill_null(False) & ~pl.col("skip")).sum().cast(pl.Int64),
            n_skipped=pl.col("skip").sum().cast(pl.Int64),
        )
    )
    out: list[dict[str, Any]] = []
    all_ks: set[int] = set()
    for (model, bench), grp in per_problem.sort("model", "benchmark").group_by(
        "model", "benchmark", maintain_order=True
    ):
        scored = grp.filter(pl.col("n") > 0)
        k = int(scored["n"].min()) if scored.height else 0
        row: dict[str, Any] = {
            "model": model,
            "benchmark": bench,
            "n_problems": scored.height,
            "n_skipped": int(grp["n_skipped"].sum()),
            "k": k,
            "avg_at_k": float((scored["c"] / scored["n"]).mean()) if scored.height else None,
        }
        for j in ks if ks is not None else powers_of_two(k):
            all_ks.add(j)
            if 1 <= j <= k:
                pairs = zip(scored["n"].to_list(), scored["c"].to_list(), strict=True)
                row[f"pass@{j}"] = sum(pass_at_k(n, c, j) for n, c in pairs) / scored.height
        out.append(row)
    schema: dict[str, Any] = {
        "model": pl.String,
        "benchmark": pl.String,
        "n_problems": pl.Int64,
        "n_skipped": pl.Int64,
        "k": pl.Int64,
        "avg_at_k": pl.Float64,
    } | {f"pass@{j}": pl.Float64 for j in sorted(all_ks)}
    return pl.DataFrame([{c: r.get(c) for c in schema} for r in out], schema=schema)


def summary_markdown(summary: pl.DataFrame, models: list[str] | None = None) -> str:
    """One row per benchmark x metric, one column per model (base | pi_theta0 | pi_theta), in percent."""
    if summary.is_empty():
        return "_no eval rows_\n"
    present = summary["model"].unique().to_list()
    cols = [m for m in (models or list(MODELS)) if m in present] + sorted(
        m for m in present if m not in (models or MODELS)
    )
    metrics = ["avg_at_k"] + [c for c in summary.columns if c.startswith("pass@")]
    lines = ["| benchmark | n | metric | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for bench in summary["benchmark"].unique(maintain_order=True).to_list():
        sub = summary.filter(pl.col("benchmark") == bench)
        by_model = {r["model"]: r for r in sub.iter_rows(named=True)}
        n = int(sub["n_problems"].max())
        k = int(sub["k"].max())
        for metric in metrics:
            vals = [by_model.get(m, {}).get(metric) for m in cols]
            if all(v is None for v in vals):
                continue
            name = f"avg@{k}" if metric == "avg_at_k" else metric
            cells = " | ".join("—" if v is None else f"{100 * v:.1f}" for v in vals)
            lines.append(f"| {bench} | {n} | {name} | {cells} |")
    return "\n".join(lines) + "\n\nValues in %. avg@k = mean accuracy over the k samples per problem.\n"


# ---------------------------------------------------------------- benchmarks


def benchmark_file(spec: BenchmarkConfig) -> Path | None:
    """The local file or folder behind a benchmark spec; None for a hub id."""
    path = spec.path
    if path.startswith("embedded:"):
        name = path.removeprefix("embedded:")
        file = EMBEDDED_EVAL_DIR / f"{name}.jsonl"
        if not file.exists():
            have = sorted(p.stem for p in EMBEDDED_EVAL_DIR.glob("*.jsonl"))
            raise FileNotFoundError(f"no embedded benchmark {name!r} in {EMBEDDED_EVAL_DIR}; have {have}")
        return file
    local = Path(path).expanduser()
    if local.exists():
        return local
    if local.suffix in (".jsonl", ".json", ".parquet"):
        raise FileNotFoundError(f"benchmark file {path!r} does not exist")
    return None


def _as_golds(value: Any) -> list[str]:
    """An answer field (str, number, list, 'text #### 18', '... \\boxed{x}') -> accepted answer strings."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [g for v in value for g in _as_golds(v)]
    if isinstance(value, float) and value.is_integer():
        return [str(int(value))]
    text = str(value).strip()
    if "####" in text:  # GSM8K: the final answer follows the last ####
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = templates.last_boxed(text)
    if boxed is not None:
        text = boxed.strip()
    return [text] if text else []


def normalize_benchmark(rows: list[dict[str, Any]], name: str) -> pl.DataFrame:
    """Raw benchmark records -> problem_id (str), problem, gold (list[str]); names the bad rows on error."""
    if not rows:
        raise ValueError(f"benchmark {name!r} is empty")
    fields = set().union(*(r.keys() for r in rows[:50]))

    def pick(options: tuple[str, ...]) -> str | None:
        return next((c for c in options if c in fields), None)

    id_col, problem_col = pick(ID_COLUMNS), pick(PROBLEM_COLUMNS)
    gold_cols = [c for c in GOLD_COLUMNS + SOLUTION_COLUMNS if c in fields]
    if problem_col is None or not gold_cols:
        raise ValueError(
            f"benchmark {name!r}: need a problem column {PROBLEM_COLUMNS} and an answer column "
            f"{GOLD_COLUMNS + SOLUTION_COLUMNS}; found {sorted(fields)}"
        )
    out, missing = [], []
    for i, r in enumerate(rows):
        pid = str(r[id_col]) if id_col and r.get(id_col) is not None else str(i)
        gold = next((g for c in gold_cols if (g := _as_golds(r.get(c)))), [])
        if not gold:
            missing.append(pid)
        out.append({"problem_id": pid, "problem": str(r[problem_col]), "gold": list(dict.fromkeys(gold))})
    if missing:
        raise ValueError(
            f"benchmark {name!r}: {len(missing)} rows without a gold answer in {gold_cols} "
            f"(first: {missing[:5]}); fix the file or pick another answer column"
        )
    df = pl.DataFrame(out, schema={"problem_id": pl.String, "problem": pl.String, "gold": pl.List(pl.String)})
    if df["problem_id"].n_unique() != df.height:
        raise ValueError(f"benchmark {name!r}: duplicate problem ids in column {id_col!r}")
    return df


def _hub_rows(hub_id: str) -> list[dict[str, Any]]:
    import datasets  # heavy; only for hub ids and dataset folders

    ds = datasets.load_dataset(hub_id)
    split = "test" if "test" in ds else next(iter(ds))
    return ds[split].to_list()


def load_benchmark(name: str, spec: BenchmarkConfig) -> pl.DataFrame:
    """embedded:<name> | local .jsonl/.json/.parquet | dataset folder or hub id (split 'test' else the
    first) -> problem_id, problem, gold (list[str]); the first `spec.limit` rows."""
    file = benchmark_file(spec)
    if file is None or file.is_dir():
        rows = _hub_rows(spec.path if file is None else str(file))
    elif file.suffix == ".parquet":
        rows = pl.read_parquet(file).to_dicts()
    else:  # json lines; read row by row because answer fields mix strings and numbers
        with file.open() as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    if spec.limit is not None:
        rows = rows[: spec.limit]
    return normalize_benchmark(rows, name)


def benchmark_hash(spec: BenchmarkConfig) -> str:
    """Content hash of a local benchmark (file or folder); the hub id itself for a hub dataset."""
    file = benchmark_file(spec)
    if file is None:
        return f"hub:{spec.path}"
    h = hashlib.sha256()
    for f in sorted(file.rglob("*")) if file.is_dir() else [file]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- stage core (pure)


def build_eval_requests(benchmarks: dict[str, pl.DataFrame], cfg: EvalConfig) -> pl.DataFrame:
    """benchmark -> problems frames -> one request per problem: request_idx (stable, used for seeds),
    benchmark, problem_id, prompt (the pi_theta template), gold, k."""
    frames = []
    for name, df in benchmarks.items():
        if name not in cfg.benchmarks:
            raise ValueError(f"benchmark {name!r} is not in eval.benchmarks {list(cfg.benchmarks)}")
        frames.append(
            df.select(
                pl.lit(name).alias("benchmark"),
                pl.col("problem_id").cast(pl.String),
                pl.col("problem").map_elements(templates.pi_prompt, return_dtype=pl.String).alias("prompt"),
                pl.col("gold"),
                pl.lit(cfg.benchmarks[name].k, dtype=pl.Int64).alias("k"),
            )
        )
    if not frames:
        raise ValueError("eval.benchmarks is empty: add at least one benchmark to the config")
    return pl.concat(frames).with_row_index("request_idx").with_columns(pl.col("request_idx").cast(pl.Int64))


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


# ---------------------------------------------------------------- task


def _modules() -> list[ModuleType]:
    """This stage's code plus the helpers whose changes change its rows (prompts, engine, verifier)."""
    return [sys.modules[__name__], templates, verify, sampling]


def _model_id(manifest: dict) -> str:
    # the lead passes the base model as a manifest with only model_dir; a trained model has a fingerprint
    return manifest.get("fingerprint") or str(manifest["model_dir"])


def fingerprint_of(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> str:
    conf = RunConfig.model_validate(cfg)
    return fingerprint(
        STAGE,
        code=code_version(*_modules()),
        config={"eval": conf.eval, "engine": conf.engine, "verify_timeout_s": conf.verify.timeout_s},
        upstream={m: _model_id(upstream[m]) for m in conf.eval.models if m in upstream},
        benchmarks={name: benchmark_hash(spec) for name, spec in conf.eval.benchmarks.items()},
        round=round_,
    )


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
                        "gold": req["gold"],
                    }
                )
    return pl.DataFrame(rows, schema_overrides={"gold": pl.List(pl.String), "sample": pl.Int64})


@stage_task(STAGE, fingerprint_of)
def evaluate_task(cfg: dict, upstream: dict[str, dict], round_: int = 1) -> dict:
    conf = RunConfig.model_validate(cfg)
    store = open_store(cfg, STAGE, fingerprint_of(cfg, upstream, round_))
    if store.is_complete():
        return reuse_stage(store, round_)
    log = logger()
    models = [m for m in conf.eval.models if m in upstream]
    if not models:
        raise ValueError(f"evaluate: none of eval.models {conf.eval.models} in upstream {sorted(upstream)}")
    if skipped := [m for m in conf.eval.models if m not in upstream]:
        log.warning("evaluate: no upstream model for %s; skipping them", skipped)
    benchmarks = {name: load_benchmark(name, spec) for name, spec in conf.eval.benchmarks.items()}
    requests = build_eval_requests(benchmarks, conf.eval)
    log.info("evaluate: %d problems over %s, models %s", requests.height, list(benchmarks), models)

    for i, model in enumerate(models):
        if store.has_shard(i):  # shard i = model i: finished models survive a crash
            log.info("evaluate: %s already evaluated (shard %d)", model, i)
            continue
        with Sampler(upstream[model]["model_dir"], conf.engine) as sampler:
            samples = generate_samples(sampler, requests, model, conf.eval)
        verdicts = verify.check_answers(samples, timeout_s=conf.verify.timeout_s, workers=conf.verify.workers)
        store.write_shard(i, score_eval(samples, verdicts))
        log.info("evaluate: %s done, %d samples", model, samples.height)

    summary = summarize(store.read())
    summary_path = store.dir / "summary.parquet"
    write_parquet_atomic(summary, summary_path)
    md = summary_markdown(summary, list(conf.eval.models))
    return finish_stage(
        store,
        round_,
        rows_in=requests.height,
        summary=md,
        models=models,
        summary_path=str(summary_path),
        summary_markdown=md,
    )
