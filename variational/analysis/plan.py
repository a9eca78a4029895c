"""`variational plan CONFIG [--gpus N]`: what a run costs before it is launched (issue 9 §4).

In: a RunConfig, the DAG the flow runs for it (`flows.recipe.dag`, computed by the CLI), a GPU count, and
the problems when at hand (the run's own finished `problems` stage, or a local/embedded dataset subset as
ingest does); otherwise the paper's count (16,710 rows), lengths a stated fraction of max_tokens. Out: per
costed stage of the DAG, in its order, the work, GPU-hours and wall time on N GPUs from the rates
(variational/analysis/rates.py: the defaults, measured ones citing bench/RESULTS.md and the others saying
"assumed", or `--calibrate RUN|FILE`: measured in a finished run or a calibration file), and each
fine-tune's optimizer steps.
`format_plan` prints it as a table; `--json` prints `Plan.to_dict()`.

Every figure is an estimate: tokens from characters at a measured ratio, perfect data-parallel scaling over
the GPUs, no engine start-up or checkpoint time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from variational import templates
from variational.analysis.rates import CHARS_PER_TOKEN, DEFAULT, REFERENCE_PARAMS, Rates, model_params
from variational.config import BenchmarkConfig, RunConfig, TrainConfig
from variational.pipeline.store import StageStore, read_stage

__all__ = ["COSTS", "FREE", "KIND_OF", "Plan", "format_plan", "model_params", "plan"]

if TYPE_CHECKING:
    from variational.pipeline.runner import Call

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
# fp32 weights and KV cache are twice the bytes of bf16: memory-bound decode at about half the rate
FLOAT32_SLOWDOWN = 2.0


@dataclass
class StageCost:
    stage: str  # the row's name: `name`, or `name[round r]` in a run of several rounds
    work: str
    tokens: int
    gpu_hours: float = 0.0  # on one GPU
    cpu_hours: float = 0.0  # on one core
    wall_hours: float = 0.0  # on the planned GPUs (or CPUs)
    rate: str = ""
    steps: int | None = None  # a fine-tune's optimizer steps (trainers/sft.py `plan_steps`)
    batch_size: int | None = None  # a fine-tune's examples per optimizer step
    key: str = ""  # the DAG call it costs: "name@round"


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
    rates: Rates = DEFAULT

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def wall_hours(self) -> float:
        return sum(s.wall_hours for s in self.stages)  # stages run one after another

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rates"] = self.rates.table()
        out |= {"total_gpu_hours": self.gpu_hours, "total_wall_hours": self.wall_hours}
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
    think = THINK_FRACTION * conf.posterior_sampling.max_tokens
    tokens = {"question": float(QUESTION_TOKENS), "think": think, "solution": float(SOLUTION_TOKENS)}
    return pl.DataFrame({**{k: [v] for k, v in tokens.items()}, "count": [rows]})


def _stored_problems(conf: RunConfig, calls: list[Call]) -> pl.DataFrame | None:
    """The run's own `problems` table: the folder of the DAG's problems fingerprint, when it is complete,
    read as its manifest lists it (a stale folder or an unlisted shard is never read)."""
    fingerprints = [c.fingerprint for c in calls if c.stage.name == "problems"]
    store = StageStore(conf.data_root, conf.name, "problems", fingerprints[0]) if fingerprints else None
    if store is None or not store.is_complete():
        return None
    return read_stage(conf.data_root, store.manifest(), ["question", "think_ref", "solution_ref"])


def _question_and_answer(row: dict[str, Any]) -> tuple[str, str] | None:
    """(question, assistant text) of a raw row ingest accepts (tasks/ingest.py `_shape`, `_turns`): a user
    turn then an assistant turn, system turns aside, both non-empty text; None otherwise."""
    conversations = row.get("conversations")
    shaped = isinstance(conversations, list) and all(isinstance(t, dict) for t in conversations)
    if not shaped or not all(isinstance(row.get(k), str | None) for k in ("system", "source")):
        return None
    turns = []
    for turn in conversations:
        role = turn.get("from", turn.get("role"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role) if isinstance(role, str) else None
        if role != "system":
            turns.append((role, turn.get("value", turn.get("content"))))
    if [role for role, _ in turns] != ["user", "assistant"]:
        return None
    (_, question), (_, answer) = turns
    ok = all(isinstance(t, str) and t.strip() for t in (question, answer))
    return (question, answer) if ok else None


def _local_problems(conf: RunConfig) -> pl.DataFrame | None:
    """question / think_ref / solution_ref of a local or embedded dataset as ingest keeps them: the subset
    of all row indices (shuffled with `subset_seed`, then the first `limit`), then its readable rows whose
    user/assistant turns split into non-empty think and solution spans (`tests` is not checked)."""
    from variational.data.raw import local_files, read_rows

    data = conf.data
    if local_files(data.dataset, data.split) is None:
        return None
    raw = read_rows(data.dataset, data.split, data.max_row_bytes)
    order = pl.DataFrame({"row_index": range(raw.n_rows)}, schema={"row_index": pl.Int64})
    if data.subset_seed is not None:
        order = order.sample(fraction=1.0, shuffle=True, seed=data.subset_seed)
    keep = set((order.head(data.limit) if data.limit is not None else order)["row_index"].to_list())
    rows = []
    for row in raw.rows:
        if row["row_index"] not in keep or (texts := _question_and_answer(row)) is None:
            continue
        try:
            think, solution = templates.split_stratos(texts[1])
        except ValueError:
            continue
        if think.strip() and solution.strip():
            rows.append((texts[0], think, solution))
    return pl.DataFrame(rows, schema=["question", "think_ref", "solution_ref"], orient="row")


def problem_lengths(conf: RunConfig, calls: list[Call], use_data: bool = True) -> tuple[pl.DataFrame, str]:
    """(lengths, where they come from): the run's problems table, else a local dataset, else the paper."""
    if use_data:
        stored = _stored_problems(conf, calls)
        if stored is not None and stored.height:
            basis = f"problems table of run {conf.name!r} ({stored.height} rows)"
            return lengths_from_problems(stored), basis
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


def benchmark_rows(spec: BenchmarkConfig) -> int | None:
    """Problems a benchmark evaluates (after `limit`); None when neither local nor in the published table."""
    from variational.data.benchmarks import benchmark_file

    path = benchmark_file(spec)
    if path is not None and path.is_file():
        rows = pl.scan_parquet(path) if path.suffix == ".parquet" else pl.scan_ndjson(path)
        n = rows.select(pl.len()).collect().item()
    else:
        n = KNOWN_BENCHMARK_ROWS.get((spec.path, spec.subset, spec.difficulty))
    if n is None:
        return None
    return min(n, spec.limit) if spec.limit else n


def _sum(values: pl.Series, count: pl.Series) -> float:
    return float((values * count).sum())


# ---------------------------------------------------------------- the estimate: one cost per DAG call


class _Work:
    """What every stage's cost is computed from: the config, the problems' lengths (tokens per problem,
    `count` problems of each), the model's speed-up over the reference shape, and the hardware."""

    def __init__(
        self, conf: RunConfig, lengths: pl.DataFrame, speedup: float, gpus: int, cpus: int, rates: Rates
    ):
        self.conf, self.speedup, self.gpus, self.cpus, self.rates = conf, speedup, gpus, cpus, rates
        self.notes: list[str] = []
        self.c, self.n = lengths["count"], int(lengths["count"].sum())
        self.K, self.M = conf.K, conf.M
        self.q, self.think, self.sol = lengths["question"], lengths["think"], lengths["solution"]
        # a sampled posterior trace imitates the reference think span; answers stop at the rollout budget
        self.trace = self.think.clip(upper_bound=conf.posterior_sampling.max_tokens)
        self.answer = self.sol.clip(upper_bound=conf.rollout_sampling.max_tokens)
        # template tokens around the question (system prompt, tags), from the real templates
        self.pi_prompt = self.q + len(templates.pi_prompt("")) / CHARS_PER_TOKEN
        self.pi_trace = self.pi_prompt + self.trace  # what a rollout prefills
        posterior = templates.posterior_prompt("", "", conf.posterior_template)
        self.q_prompt = self.q + self.sol + len(posterior) / CHARS_PER_TOKEN
        # pi_theta's examples per problem: the original and one trace (17k-mix), or every trace (all-k)
        self.final_per_problem = 2 if conf.select.mode == "17k-mix" else conf.K

    def mean_tokens(self) -> dict[str, float]:
        parts = {"question": self.q, "think": self.think, "solution": self.sol}
        return {k: round(_sum(v, self.c) / max(self.n, 1), 1) for k, v in parts.items()}

    def gpu_stage(self, work: str, tokens: float, seconds: float, rate: str, engine: bool) -> StageCost:
        hours = seconds / 3600
        tp = self.conf.engine.tensor_parallel_size
        # an engine stage runs gpus // TP engines of TP GPUs each; a fine-tune shards over every GPU
        wall = hours / ((self.gpus // tp) * tp) if engine else hours / self.gpus
        return StageCost("", work, round(tokens), gpu_hours=hours, wall_hours=wall, rate=rate)


# fine-tunes: (training rows, examples per problem, TrainConfig). q_phi on sampled traces (Eq. 9, forward
# KL: an input `prior_samples`) learns from M traces per question
FINETUNES: dict[str, Callable[[_Work, Call], tuple[pl.Series, int, TrainConfig]]] = {
    "pi_theta0": lambda w, c: (w.pi_prompt + w.think + w.sol, 1, w.conf.pi_theta0),
    "q_phi": lambda w, c: (w.q_prompt + w.think, w.M if "prior_samples" in c.inputs else 1, w.conf.q_phi),
    "pi_theta": lambda w, c: (w.pi_trace + w.sol, w.final_per_problem, w.conf.final),
}
# generations: (work, generated tokens per problem, prefill rows, prefills per problem)
GENERATIONS: dict[str, Callable[[_Work], tuple[str, pl.Series, pl.Series, int]]] = {
    "prior_samples": lambda w: (f"{w.n:,} prompts x M={w.M}", w.M * (w.trace + w.answer), w.pi_prompt, 1),
    "posterior_samples": lambda w: (f"{w.n:,} prompts x K={w.K}", w.K * w.trace, w.q_prompt, 1),
    "rollouts": lambda w: (f"{w.n * w.K:,} traces x M={w.M}", w.K * w.M * w.answer, w.pi_trace, w.K),
}
VERIFICATIONS: dict[str, Callable[[_Work], int]] = {  # answers checked
    "prior_verdicts": lambda w: w.n * w.M,
    "verdicts": lambda w: w.n * w.K * w.M,
}
# stages of negligible cost, not listed (stage -> what it does)
FREE = {"problems": "reads the data", "base_model": "finds a folder", "weights": "polars", "train": "polars"}
FREE |= {"contamination": "n-gram sets, seconds", "clean_problems": "polars"}
# the rate each costed stage runs at: what `--calibrate RUN` pools the run's shard stats into
KIND_OF = {
    **dict.fromkeys(FINETUNES, "train"),
    **dict.fromkeys(GENERATIONS, "generate"),
    "logps": "score",
    **dict.fromkeys(VERIFICATIONS, "verify"),
    "eval": "generate",
}


def _finetune(w: _Work, call: Call) -> StageCost:
    rows, per_problem, train = FINETUNES[call.stage.name](w, call)
    weights, examples = w.c * per_problem, w.n * per_problem
    rows = rows.clip(upper_bound=train.max_length)
    tokens = _sum(rows, weights) * train.epochs
    seconds = w.rates.train_seconds(rows, weights, w.speedup) * train.epochs
    work = f"{examples:,.0f} examples x {train.epochs:g} epochs"
    cost = w.gpu_stage(work, tokens, seconds, "train", engine=False)
    # trainers/sft.py `plan_steps`: ceil(examples / batch_size) steps an epoch, ceil(epochs x that) in all
    cost.steps = math.ceil(train.epochs * math.ceil(examples / train.batch_size))
    cost.batch_size = train.batch_size
    return cost


def _generate(w: _Work, call: Call) -> StageCost:
    work, generated, prefill, per_problem = GENERATIONS[call.stage.name](w)
    tokens = _sum(generated, w.c)
    seconds = tokens / (w.rates.generate_tok_s * w.speedup)
    if w.rates.generate_includes_prefill:  # a measured end-to-end rate
        return w.gpu_stage(work, tokens, seconds, "generate (prefill included)", engine=True)
    seconds += w.rates.score_seconds(prefill, per_problem * w.c, w.speedup)
    return w.gpu_stage(work, tokens, seconds, "generate + prefill", engine=True)


def _score(w: _Work, call: Call) -> StageCost:
    """logps: every posterior trace under pi (question, trace, solution) and q_phi (hinted prompt, trace)."""
    pi = (w.pi_trace + w.sol).clip(upper_bound=w.conf.score.max_length)
    q = (w.q_prompt + w.trace).clip(upper_bound=w.conf.score.max_length)
    scored = _sum(w.K * (pi + q), w.c)
    seconds = w.rates.score_seconds(pi, w.K * w.c, w.speedup) + w.rates.score_seconds(q, w.K * w.c, w.speedup)
    return w.gpu_stage(f"{w.n * w.K:,} traces x 2 models", scored, seconds, "score", engine=True)


def _verify(w: _Work, call: Call) -> StageCost:
    pairs = VERIFICATIONS[call.stage.name](w)
    hours = pairs / w.rates.verify_pairs_s_per_core / 3600
    work = f"{pairs:,} answers (CPU)"
    return StageCost("", work, 0, cpu_hours=hours, wall_hours=hours / w.cpus, rate="verify")


def _evaluate(w: _Work, call: Call) -> StageCost:
    conf = w.conf
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
        w.notes.append(f"evaluate leaves out {', '.join(skipped)}: hub benchmarks of unknown size offline")
    slowdown = FLOAT32_SLOWDOWN if (conf.eval.dtype or conf.engine.dtype) == "float32" else 1.0
    if slowdown > 1:
        w.notes.append(
            f"evaluate in float32: decode assumed {slowdown:g}x slower (twice the bytes per token)"
        )
    seconds = samples * length * slowdown / (w.rates.generate_tok_s * w.speedup)
    work = f"{samples:,} samples ({models} models), {length:,.0f} tokens each (assumed {EVAL_FRACTION} x max_tokens)"
    return w.gpu_stage(work, samples * length, seconds, "generate", engine=True)


COSTS: dict[str, Callable[[_Work, Call], StageCost]] = {
    **dict.fromkeys(FINETUNES, _finetune),
    **dict.fromkeys(GENERATIONS, _generate),
    "logps": _score,
    **dict.fromkeys(VERIFICATIONS, _verify),
    "eval": _evaluate,
}


def row_name(call: Call, rounds: int) -> str:
    """`name[round r]` in a run of several rounds; plain `name` for a call no round owns: eval, and the fits
    from the data and the base model alone (pi_theta0, the hinted q_phi) that every round starts from."""
    owned = rounds > 1 and call.stage.per_round and set(call.inputs) - {"problems", "base_model"}
    return f"{call.stage.name}[round {call.round}]" if owned else call.stage.name


def plan(
    conf: RunConfig,
    calls: list[Call],
    gpus: int = 8,
    cpus: int | None = None,
    use_data: bool = True,
    rates: Rates = DEFAULT,
) -> Plan:
    """Estimate every stage of `calls` (the DAG `flows.recipe.dag` gives for `conf`), in its order, on `gpus`
    GPUs (and `cpus` cores for verification; default 12 per GPU), at `rates` (rates.load_rates)."""
    if gpus < 1:
        raise ValueError(f"plan: --gpus must be >= 1, got {gpus}")
    tp = conf.engine.tensor_parallel_size
    if gpus < tp:
        raise ValueError(
            f"plan: engine.tensor_parallel_size={tp} needs at least {tp} GPUs, got --gpus {gpus}"
        )
    cpus = cpus or 12 * gpus  # a DGX H100 has 112 cores for 8 GPUs
    lengths, basis = problem_lengths(conf, calls, use_data)
    params, params_basis = model_params(conf.base_model)
    w = _Work(conf, lengths, REFERENCE_PARAMS / params, gpus, cpus, rates)
    p = Plan(conf.name, gpus, cpus, basis, params, params_basis, w.n, w.mean_tokens(), rates=rates)
    rounds = max((c.round for c in calls), default=1)
    for call in calls:
        if call.stage.name in COSTS:
            cost = COSTS[call.stage.name](w, call)
            cost.stage, cost.key = row_name(call, rounds), call.key
            p.stages.append(cost)
        elif call.stage.name not in FREE:
            w.notes.append(f"{call.key}: no cost model for this stage; left out of the totals")
    p.notes = [
        *w.notes,
        f"model size {params / 1e9:.2f}B ({params_basis}); rates scale by 4.02B / size",
        f"{gpus // tp} engine(s) of TP={tp}; fine-tunes shard over all {gpus} GPUs (FSDP); "
        "linear scaling assumed",
        "posterior traces are assumed as long as the reference think spans they imitate",
    ]
    return p


# ---------------------------------------------------------------- output


def _hours(h: float) -> str:
    if h == 0:
        return "-"
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:,.1f} h"


def format_plan(p: Plan) -> str:
    """The plan as a markdown table, each fine-tune's optimizer steps, then the rates and their sources."""
    lines = [
        f"plan for {p.config!r} on {p.gpus} x {p.rates.device} and {p.cpus} CPU cores",
        f"problems: {p.problems:,}; mean tokens {p.mean_tokens}; from {p.basis}",
        "",
        "| stage | work | tokens | GPU-hours | wall |",
        "|---|---|---|---|---|",
    ]
    for s in p.stages:
        hours = f"{s.gpu_hours:,.3g}" if s.gpu_hours else f"({s.cpu_hours:,.3g} CPU-h)"
        lines.append(f"| {s.stage} | {s.work} | {s.tokens:,} | {hours} | {_hours(s.wall_hours)} |")
    lines.append(f"| **total** | | | **{p.gpu_hours:,.3g}** | **{_hours(p.wall_hours)}** |")
    if steps := [s for s in p.stages if s.steps is not None]:
        lines += ["", "optimizer steps (trainers/sft.py: ceil(epochs x ceil(examples / batch_size))):"]
        lines += [f"- {s.stage}: {s.steps:,} steps of {s.batch_size:,} examples" for s in steps]
    lines += ["", "rates (per device, Qwen3-4B shape; measured or assumed, and from what):"]
    lines += [f"- {k}: {v['value']} — {v['source']}" for k, v in p.rates.table().items()]
    lines += ["", *[f"- {n}" for n in p.notes]]
    return "\n".join(lines)
