"""GPU check of the scorer (and one SFT step) at Qwen3-4B shape, for one lent H100/H200. Self-contained.

    python bench/gpu_check.py              # on the GPU machine, from the repo root (< 6 minutes)
    python bench/gpu_check.py --dry-run    # tiny config on CPU: checks that the script runs

Needs only torch, transformers and numpy (no vLLM, no `pip install -e .`, no internet): the repo root goes
on sys.path and variational.engines.scoring is imported from the working tree. The model is a RANDOM-weight
Qwen3ForCausalLM of Qwen3-4B shape built from a config on the GPU in bf16 (throughput does not depend on the
weights). Measures:
- the bf16 matmul rate of a large torch.mm: the yardstick;
- the scorer (packed, chunked lm-head) at 4k/16k/32k tokens, one row and a packed batch of 1k-token rows,
  tokens/s, peak memory above the weights, and % of the FLOP floor 2·params·tokens at the measured matmul
  rate (a second floor adds causal attention, 2·T_row²·(heads·head_dim)·layers, which dominates at 32k);
- the naive full-vocabulary path (all logits, fp32 log_softmax) where it fits, and its max abs difference;
- one SFT forward+backward (trainers.sft collate + micro_batch_loss when importable) with flex_attention
  packing and gradient checkpointing, tokens/s vs 8·params·tokens (6 + 2 for the recomputed forward).
- the tiny recipe's torch paths (bench/gpu_recipe.py, issue 21): trainers.sft.train, tasks.score.score_rows
  and the transformers sampler, at the embedded model's shape (`tiny`) and Qwen3-4B's (`4b`); their rates
  go into a calibration file for `variational plan --calibrate FILE` and, with `--results`, into
  bench/RESULTS.md (dated, with the device).
Prints markdown tables; exits 1 when any measurement failed other than an expected naive-path OOM.

    python bench/gpu_check.py --recipe-only --results   # only the recipe paths, rates into RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: E402

from variational.engines.scoring import VARLEN, score_continuations  # noqa: E402

QWEN3_4B = dict(
    hidden_size=2560,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=9728,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
)
TINY = QWEN3_4B | dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, vocab_size=1024,
)  # fmt: skip
CHUNK = 2048  # ScoreConfig.vocab_chunk default
errors: list[str] = []
rows: list[list[str]] = []


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str) -> tuple[float, float, object]:
    """(seconds, peak GiB above what was allocated before, result)."""
    sync(device)
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else float("nan")
    return dt, peak, out


def add(
    what: str,
    setting: str,
    tokens: int,
    dt: float,
    peak: float,
    floor_s: float,
    attn_s: float,
    note: str = "",
) -> None:
    rows.append(
        [
            what,
            setting,
            f"{tokens / dt:,.0f}",
            f"{peak:.2f}",
            f"{100 * floor_s / dt:.0f}%",
            f"{100 * (floor_s + attn_s) / dt:.0f}%",
            note,
        ]
    )


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters = 20 if device == "cuda" else 2
    dt, _, _ = measure(lambda: [torch.mm(a, b) for _ in range(iters)], device)
    return 2 * n**3 * iters / dt


def naive_logps(model: torch.nn.Module, ids: list[int], n_ctx: int, device: str) -> np.ndarray:
    """What the official code did: all logits, fp32 log_softmax over the full vocabulary."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        pos = torch.arange(n_ctx - 1, len(ids) - 1, device=device)
        return logp[pos, torch.tensor(ids[n_ctx:], device=device)].float().cpu().numpy()


def check_scorer(
    model: torch.nn.Module, lengths: list[int], row: int, device: str, rate: float, n_params: int
) -> None:
    """Per length n: one row of n tokens, a packed batch of n // row rows (varlen and sdpa), the naive path."""
    cfg = model.config
    attn_width = cfg.num_attention_heads * cfg.head_dim
    rng = np.random.default_rng(0)

    def floors(row_lengths: list[int]) -> tuple[float, float]:
        tokens = sum(row_lengths)
        attn = sum(
            2 * n * n * attn_width * cfg.num_hidden_layers for n in row_lengths
        )  # causal: half of 4·n²·d
        return 2 * n_params * tokens / rate, attn / rate

    def score(ctxs: list, conts: list, budget: int) -> list[np.ndarray]:
        return score_continuations(model, ctxs, conts, token_budget=budget, chunk=CHUNK, progress=False)

    # warm-up of every path (kernel selection, allocator) on two short rows
    warm = rng.integers(0, cfg.vocab_size, 2 * row).tolist()
    for attn in (VARLEN, "sdpa"):
        model.set_attn_implementation(attn)
        score([warm[:64], warm[row : row + 64]], [warm[64:row], warm[row + 64 :]], 2 * row)
    naive_logps(model, warm, 64, device)
    model.set_attn_implementation(VARLEN)
    for n in lengths:
        ids = rng.integers(0, cfg.vocab_size, n).tolist()
        ctx, cont = ids[:64], ids[64:]
        scored = None
        try:
            dt, peak, scored = measure(lambda c=ctx, y=cont, n=n: score([c], [y], n), device)
            add("scorer varlen", f"{n} tok, 1 row", n, dt, peak, *floors([n - 1]))
        except Exception as err:
            errors.append(f"scorer 1 row {n}: {err!r}")
            rows.append(["scorer varlen", f"{n} tok, 1 row", "error", "", "", "", repr(err)[:80]])
        k = max(1, n // row)
        ctxs = [rng.integers(0, cfg.vocab_size, 64).tolist() for _ in range(k)]
        conts = [rng.integers(0, cfg.vocab_size, row - 64).tolist() for _ in range(k)]
        for attn in (VARLEN, "sdpa"):
            model.set_attn_implementation(attn)
            label = "scorer varlen" if attn == VARLEN else "scorer sdpa block-mask"
            try:
                dt, peak, _ = measure(lambda a=ctxs, b=conts, n=n: score(a, b, n), device)
                add(label, f"{k} rows x {row} packed", k * row, dt, peak, *floors([row - 1] * k))
            except Exception as err:
                if attn == VARLEN:
                    errors.append(f"scorer packed {n}: {err!r}")
                rows.append([label, f"{k} rows x {row} packed", "error", "", "", "", repr(err)[:80]])
            finally:
                model.set_attn_implementation(VARLEN)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        try:
            model.set_attn_implementation("sdpa")
            dt, peak, ref = measure(lambda ids=ids: naive_logps(model, ids, 64, device), device)
            diff = float(np.max(np.abs(ref - scored[0]))) if scored is not None else float("nan")
            add(
                "naive full-vocab",
                f"{n} tok, 1 row",
                n,
                dt,
                peak,
                *floors([n - 1]),
                f"max abs diff {diff:.3f}",
            )
        except torch.OutOfMemoryError:
            rows.append(["naive full-vocab", f"{n} tok, 1 row", "OOM", "", "", "", "does not fit"])
        except Exception as err:
            errors.append(f"naive {n}: {err!r}")
            rows.append(["naive full-vocab", f"{n} tok, 1 row", "error", "", "", "", repr(err)[:80]])
        finally:
            model.set_attn_implementation(VARLEN)
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()


def check_train_step(model: torch.nn.Module, tokens: int, device: str, rate: float, n_params: int) -> None:
    """One packed forward+backward with flex_attention (bf16 weights; no optimizer state: AdamW for 4B
    params in fp32 alone is 64 GB)."""
    try:
        from trainers.sft import Example, collate, micro_batch_loss

        source = "trainers.sft"
    except ImportError as err:  # e.g. polars/pydantic absent on the GPU box
        Example = collate = micro_batch_loss = None
        source = f"inline ({type(err).__name__}: {err})"
    rng = np.random.default_rng(1)
    n_ex = max(1, tokens // 2048)
    length = tokens // n_ex
    vocab = model.config.vocab_size
    if collate is not None:
        exs = [
            Example(rng.integers(0, vocab, length).tolist(), 256, [1.0] * (length - 256), False)
            for _ in range(n_ex)
        ]
        batch = {k: v.to(device) for k, v in collate(exs, packed=True).items()}

        def step() -> None:
            loss, _ = micro_batch_loss(model, batch)
            loss.backward()
    else:
        ids = torch.tensor(rng.integers(0, vocab, (1, n_ex * length)), device=device)
        pos = torch.arange(length, device=device).repeat(n_ex)[None]

        def step() -> None:
            out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
            out.loss.backward()

    model.set_attn_implementation("flex_attention" if device == "cuda" else "sdpa")
    model.train().requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        t_warm, _, _ = measure(step, device)  # includes flex_attention compilation
        model.zero_grad(set_to_none=True)
        dt, peak, _ = measure(step, device)
        attn = (
            3
            * n_ex
            * 2
            * length**2
            * model.config.num_attention_heads
            * model.config.head_dim
            * model.config.num_hidden_layers
        )
        add(
            "sft fwd+bwd flex",
            f"{n_ex} x {length} packed",
            n_ex * length,
            dt,
            peak,
            8 * n_params * n_ex * length / rate,
            attn / rate,
            f"{source}; warm-up {t_warm:.0f}s; floor 8·N·T",
        )
    except Exception as err:
        traceback.print_exc()
        errors.append(f"train step: {err!r}")
        rows.append(["sft fwd+bwd flex", f"{n_ex} x {length} packed", "error", "", "", "", repr(err)[:80]])
    finally:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
        model.eval().requires_grad_(False)
        model.set_attn_implementation(VARLEN)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny config on CPU, small lengths")
    parser.add_argument("--no-train", action="store_true", help="skip the SFT step")
    parser.add_argument("--recipe", default="tiny,4b", help="shapes for the recipe paths (tiny, 4b; none)")
    parser.add_argument("--recipe-only", action="store_true", help="only the recipe paths")
    parser.add_argument(
        "--calibration", type=Path, help="calibration file to write (default bench/calibration-<device>.json)"
    )
    parser.add_argument("--results", action="store_true", help="append the recipe table to bench/RESULTS.md")
    return parser.parse_args(argv)


def run_recipe(args: argparse.Namespace, device: str) -> None:
    """The recipe paths per shape; the calibration of the largest shape measured goes to the file."""
    from bench import gpu_recipe

    shapes = ["dry"] if args.dry_run else [s for s in args.recipe.split(",") if s and s != "none"]
    table, calibration = [], {}
    for shape in shapes:
        rows, cal = gpu_recipe.measure(shape, device)
        table += rows
        calibration = cal if cal.get("rates") else calibration
        errors.extend(f"recipe {r[0]} ({shape}): {r[-1]}" for r in rows if r[3] == "error")
    head = ["path", "shape", "setting", "tokens/s", "seconds", "notes"]
    text = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    text += "".join("| " + " | ".join(r) + " |\n" for r in table)
    print(f"\n### gpu_check: the recipe's torch paths ({calibration.get('device', device)})\n\n{text}")
    if calibration:
        name = re.sub(r"[^a-z0-9]+", "-", calibration["device"].lower()).strip("-")
        folder = Path(tempfile.gettempdir()) if args.dry_run else REPO / "bench"  # a dry run leaves no file
        path = args.calibration or folder / f"calibration-{name}.json"
        path.write_text(json.dumps(calibration, indent=1) + "\n")
        print(f"calibration: {path} (variational plan CONFIG --calibrate {path})")
    if args.results and not args.dry_run:
        when = time.strftime("%Y-%m-%d")
        section = (
            f"\n## {when} — the recipe's torch paths on {calibration.get('device', device)} "
            f"(`bench/gpu_check.py --recipe-only --results`, random weights)\n\n{text}"
        )
        with open(REPO / "bench" / "RESULTS.md", "a") as fh:
            fh.write(section)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        print("no CUDA device: use --dry-run on CPU", file=sys.stderr)
        return 2
    if args.recipe_only:
        run_recipe(args, device)
        return finish()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    config = Qwen3Config(**(TINY if args.dry_run else QWEN3_4B))
    lengths = [256, 512, 1024] if args.dry_run else [4096, 16384, 32768]
    train_tokens = 512 if args.dry_run else 8192

    rate = matmul_rate(device, dtype, 1024 if args.dry_run else 8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=VARLEN)
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())  # tied lm-head counted once, as it runs once
    hw = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(
        f"{hw}; torch {torch.__version__}, transformers {transformers.__version__}; {dtype}; "
        f"params {n_params / 1e9:.3f} B; matmul {rate / 1e12:.1f} TFLOP/s; setup {time.perf_counter() - t_start:.0f}s",
        flush=True,
    )
    try:
        check_scorer(model, lengths, 128 if args.dry_run else 1024, device, rate, n_params)
    except Exception as err:
        traceback.print_exc()
        errors.append(f"scorer: {err!r}")
    if not args.no_train:
        check_train_step(model, train_tokens, device, rate, n_params)

    print(f"\n### gpu_check: Qwen3-4B shape (random weights), {hw}, {dtype}")
    print(
        f"bf16 matmul {rate / 1e12:.1f} TFLOP/s; params {n_params / 1e9:.3f} B; chunk {CHUNK}; wall {time.perf_counter() - t_start:.0f}s\n"
    )
    head = [
        "what",
        "setting",
        "tokens/s",
        "peak GiB above weights",
        "% of 2NT floor",
        "% of floor + attn",
        "notes",
    ]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    run_recipe(args, device)
    return finish()


def finish() -> int:
    if errors:
        print("\nERRORS:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
