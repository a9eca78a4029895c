"""Where the scorer's time goes at Qwen3-4B shape on one GPU: backbone vs chunked lm-head, eager vs
per-layer torch.compile. Random weights; prints one table. `python bench/gpu_probe.py` (GPU only)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: E402

from bench.gpu_check import QWEN3_4B, matmul_rate  # noqa: E402
from variational.engines.scoring import VARLEN, compile_for_scoring, score_continuations  # noqa: E402


def timed(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    rate = matmul_rate("cuda", torch.bfloat16, 8192)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            Qwen3Config(**QWEN3_4B), dtype=torch.bfloat16, attn_implementation=VARLEN
        )
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    rows, row = 16, 1024
    g = torch.Generator().manual_seed(0)
    ctxs = [torch.randint(0, 151936, (64,), generator=g).tolist() for _ in range(rows)]
    conts = [torch.randint(0, 151936, (row - 64,), generator=g).tolist() for _ in range(rows)]
    tokens = rows * row
    floor = 2 * n_params * tokens / rate
    ids = torch.randint(0, 151936, (1, tokens), device="cuda")
    pos = torch.arange(row, device="cuda").repeat(rows)[None]
    cu = torch.tensor([i * row for i in range(rows + 1)])
    out = []

    def backbone() -> None:
        with torch.inference_mode():
            model.model(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu)

    def scorer(chunk: int) -> None:
        score_continuations(model, ctxs, conts, token_budget=tokens, chunk=chunk, progress=False)

    for name, fn in [("backbone only (eager)", backbone)] + [
        (f"scorer eager, chunk {c}", lambda c=c: scorer(c)) for c in (2048, 8192)
    ]:
        dt = timed(fn)
        out.append((name, tokens / dt, 100 * floor / dt))
        print(out[-1], flush=True)
    t0 = time.perf_counter()
    compile_for_scoring(model)
    try:
        dt = timed(lambda: scorer(2048), reps=3)
        out.append(
            (
                f"scorer compiled, {rows} x {row} packed (compile {time.perf_counter() - t0:.0f}s)",
                tokens / dt,
                100 * floor / dt,
            )
        )
        for n in (4096, 32768):  # other packed lengths: dynamic shapes, no recompile per length
            k = n // row
            c, y = ctxs[:1] * k, conts[:1] * k
            dt = timed(
                lambda c=c, y=y, n=n: score_continuations(
                    model, c, y, token_budget=n, chunk=2048, progress=False
                )
            )
            out.append((f"scorer compiled, {k} x {row} packed", n / dt, 100 * 2 * n_params * n / rate / dt))
            print(out[-1], flush=True)
        dt = timed(backbone)
        out.append(("backbone only (compiled)", tokens / dt, 100 * floor / dt))
        mem0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ids32 = torch.randint(0, 151936, (32704,), generator=g).tolist()
        t1 = time.perf_counter()
        score_continuations(model, [ids32[:64]], [ids32[64:]], token_budget=32768, chunk=2048, progress=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t1
        peak = (torch.cuda.max_memory_allocated() - mem0) / 2**30
        out.append(
            (
                f"scorer compiled, 1 row x 32704 (peak {peak:.2f} GiB above weights)",
                32704 / dt,
                100 * 2 * n_params * 32704 / rate / dt,
            )
        )
    except Exception as err:  # report, don't hide
        out.append((f"compile failed: {err!r}"[:160], 0, 0))
    print(
        f"\nH/W {torch.cuda.get_device_name()}, matmul {rate / 1e12:.0f} TFLOP/s, {rows} rows x {row} packed\n"
    )
    print("| variant | tokens/s | % of 2NT floor |\n|---|---|---|")
    for name, tps, pct in out:
        print(f"| {name} | {tps:,.0f} | {pct:.0f}% |")


if __name__ == "__main__":
    main()
