"""The tiny recipe's torch paths on one device, timed (issue 21 item 4): called by bench/gpu_check.py.

Three paths of the project, run through their real code on a random-weight model of a given shape with a
synthetic word-level tokenizer (no hub, no files: every id decodes, so sampling random weights works):
- training: trainers.launch.run_training (the fine-tune stages' loop: packing, bf16 autocast on CUDA, AdamW), a few
  optimizer steps; tokens/s, step time, peak memory and MFU from its own metrics;
- scoring: tasks.score.score_rows (the logps stage: both backbones, chunked lm-head), tokens/s over the
  tokens the backbones run;
- sampling: variational.engines.sampling.Sampler with the transformers backend (the sampler where vLLM is
  absent), n samples per prompt; generated tokens/s, prompt tokens counted apart.
`measure(shape, device)` returns table rows and a calibration (variational/analysis/rates.py CALIBRATION,
the format `variational plan --calibrate FILE` reads). Needs torch, transformers, numpy, polars, pydantic
and pyyaml; a missing one is reported as a skipped row, not a crash.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

WORDS = 2_000  # words of the synthetic vocabulary besides the specials; the rest of the vocab is filler
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the embedded SmolLM2-135M-Instruct (config.json of the prepared folder)
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=49152,
    rope_theta=100000.0,
)  # fmt: skip


def tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose every id is a word (`w17`), so any sampled id decodes; the templates'
    tags are added tokens, so stop strings work as with a real tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from variational import templates

    tags = [templates.END_THOUGHT, templates.END_SOLUTION, templates.BEGIN_THOUGHT, templates.BEGIN_SOLUTION]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tags)}
    vocab |= {f"w{i}": len(vocab) + i for i in range(vocab_size - len(vocab))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:] + tags})
    return fast


def model_folder(shape: str, device: str, out: Path) -> tuple[Path, int]:
    """A random-weight model of `shape` (tiny: SmolLM2-135M; 4b: Qwen3-4B) saved with the synthetic
    tokenizer; returns (folder, parameters)."""
    from bench.gpu_check import QWEN3_4B, TINY

    cfgs = {"tiny": (LlamaConfig, SMOLLM2_135M), "4b": (Qwen3Config, QWEN3_4B), "dry": (Qwen3Config, TINY)}
    cls, shape_cfg = cfgs[shape]
    tok = tokenizer(shape_cfg["vocab_size"])
    config = cls(**shape_cfg, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if shape == "4b" else torch.float32  # 8 GB to write instead of 16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    return out, params


def _text(words: int, offset: int) -> str:
    return " ".join(f"w{(offset + 7 * i) % 1000}" for i in range(words))  # in every shape's vocabulary


def measure_training(folder: Path, device: str, examples: int, length: int) -> dict[str, Any]:
    import polars as pl

    from trainers.launch import run_training
    from variational.config import TrainConfig

    rows = [(_text(length // 4, i), _text(3 * length // 4, i + 1)) for i in range(examples)]
    frame = pl.DataFrame(
        {"prompt": [p for p, _ in rows], "response": [r for _, r in rows], "weight": [1.0] * examples}
    )
    cfg = TrainConfig(batch_size=max(1, examples // 4), micro_batch_tokens=4 * length, max_length=length + 8,
                      epochs=1, save_minutes=0, mixed_precision="auto")  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        m = run_training(folder, frame, cfg, Path(out))
    return {"tokens_per_s": m["tokens_per_s"], "context": m["tokens"] / m["examples"], "seconds": m["wall_time_s"],
            "peak_memory_gib": m["peak_memory_gib"], "mfu": m["mfu"], "step_time_s": m["step_time_s"]}  # fmt: skip


def measure_scoring(folder: Path, device: str, rows: int, length: int) -> dict[str, Any]:
    import polars as pl

    from tasks.score import REQUEST_COLUMNS, score_rows
    from variational.config import ScoreConfig
    from variational.engines.scoring import load_scorer

    model, _ = load_scorer(folder, device=device)
    words = min(WORDS, model.config.vocab_size - 10)
    ids = lambda n, k: [(k + 13 * i) % words + 10 for i in range(n)]  # noqa: E731
    requests = pl.DataFrame(
        {"prompt_idx": range(rows), "sample_idx": [0] * rows, "round": [1] * rows,
         "pi_ids": [ids(64, r) for r in range(rows)], "q_ids": [ids(96, r) for r in range(rows)],
         "think_ids": [ids(length - 128, r) for r in range(rows)], "answer_ids": [ids(32, r) for r in range(rows)]},
        schema_overrides={c: pl.List(pl.Int32) for c in REQUEST_COLUMNS[3:]},
    )  # fmt: skip
    cfg = ScoreConfig(token_budget=8 * length, max_length=2 * length)
    score_rows(requests.head(2), {"pi_theta0": model, "q_phi": model}, cfg, progress=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    score_rows(requests, {"pi_theta0": model, "q_phi": model}, cfg, progress=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(96 + 64 + 2 * (length - 128) + 32 for _ in range(rows))  # both backbones' forward tokens
    return {"tokens_per_s": tokens / seconds, "context": tokens / (2 * rows), "seconds": seconds}


def measure_sampling(folder: Path, device: str, prompts: int, n: int, max_tokens: int) -> dict[str, Any]:
    from variational.config import EngineConfig, SamplingConfig
    from variational.engines.sampling import Sampler

    dtype = "bfloat16" if device == "cuda" else "float32"
    engine = EngineConfig(backend="transformers", dtype=dtype, max_model_len=4096, max_num_seqs=prompts * n)
    with Sampler(folder, engine) as sampler:
        texts = [_text(200, i) for i in range(prompts)]
        sp = SamplingConfig(temperature=0.7, max_tokens=max_tokens, seed=0)
        sampler.generate(texts[:1], n=1, sampling=sp.model_copy(update={"max_tokens": 4}))  # warm-up
        before = sampler.counters()
        _sync(device)
        t0 = time.perf_counter()
        sampler.generate(texts, n=n, sampling=sp)
        _sync(device)
        seconds = time.perf_counter() - t0
        after = sampler.counters()
    out = after["tokens_out"] - before["tokens_out"]
    return {"tokens_per_s": out / seconds, "context": 0.0, "seconds": seconds, "start_s": before["start_s"]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


SIZES = {  # shape -> (train examples, length), (score rows, length), (prompts, n, max_tokens)
    "dry": ((4, 128), (4, 256), (2, 2, 8)),
    "tiny": ((16, 640), (32, 1024), (32, 4, 128)),
    "4b": ((8, 2048), (16, 1024), (32, 4, 256)),
}


def measure(shape: str, device: str) -> tuple[list[list[str]], dict[str, Any]]:
    """Table rows (path, shape, setting, tokens/s, seconds, notes) and the calibration of this shape."""
    rows: list[list[str]] = []
    rates: dict[str, dict[str, Any]] = {}
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder, params = model_folder(shape, device, Path(tmp) / "model")
        except Exception as err:  # noqa: BLE001 - reported as a row
            return [["recipe", shape, "model", "error", "", repr(err)[:120]]], {}
        (tr, tl), (sr, sl), (sp, sn, st) = SIZES[shape]
        paths = {
            "train": ("trainers.launch.run_training", f"{tr} examples x {tl} tok", lambda: measure_training(folder, device, tr, tl)),
            "score": ("tasks.score.score_rows", f"{sr} traces x {sl} tok, 2 backbones", lambda: measure_scoring(folder, device, sr, sl)),
            "generate": ("Sampler (transformers)", f"{sp} prompts x n={sn}, {st} new", lambda: measure_sampling(folder, device, sp, sn, st)),
        }  # fmt: skip
        for kind, (path, setting, run) in paths.items():
            try:
                got = run()
            except ImportError as err:
                rows.append([path, shape, setting, "skipped", "", f"needs {err.name}: pip install it"])
                continue
            except Exception as err:  # noqa: BLE001 - one failed path must not hide the others
                traceback.print_exc()
                rows.append([path, shape, setting, "error", "", repr(err)[:120]])
                continue
            rates[kind] = {"tokens_per_s": got["tokens_per_s"], "context": got["context"]}
            extra = {
                k: got[k]
                for k in ("peak_memory_gib", "mfu", "step_time_s", "start_s")
                if got.get(k) is not None
            }
            notes = ", ".join(f"{k} {v:.3g}" for k, v in extra.items())
            rows.append([path, shape, setting, f"{got['tokens_per_s']:,.0f}", f"{got['seconds']:.1f}", notes])
    calibration = {
        "source": f"bench/gpu_check.py ({shape} shape, random weights)",
        "device": name,
        "measured_at": time.strftime("%Y-%m-%d"),
        "params": params,
        "rates": rates,
    }
    return rows, calibration
