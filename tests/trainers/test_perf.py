"""trainers/perf.py: MFU from tokens/s, parameters and the device's known bf16 peak (None where unknown),
parameters from the saved safetensors, and the fields a real CPU fine-tune (through trainers/launch.py)
adds to its train_metrics.json, kept when the finished folder is reused."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from transformers import AutoModelForCausalLM

from trainers import perf
from trainers.launch import run_training
from variational.config import TrainConfig


def test_peak_flops_only_for_known_gpus_in_bf16() -> None:
    assert (
        perf.peak_flops("NVIDIA H200", "bf16") == perf.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    )
    assert perf.peak_flops("NVIDIA H200", "fp32") is None
    assert perf.peak_flops("cpu", "bf16") is None and perf.peak_flops("NVIDIA T4", "bf16") is None


def test_mfu_is_six_n_t_over_the_peak_of_all_processes() -> None:
    # 4B parameters at 8,197 tok/s per GPU (bench/RESULTS.md's H200 step) on 8 GPUs
    got = perf.mfu(8 * 8_197, 4_020_000_000, "NVIDIA H200", "bf16", processes=8)
    assert got == pytest.approx(6 * 4.02e9 * 8_197 / 989e12)
    assert perf.mfu(None, 10, "NVIDIA H200", "bf16", 1) is None
    assert perf.mfu(100.0, 10, "cpu", "fp32", 1) is None


def test_saved_params_count_a_tied_head_once(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert perf.saved_params(tiny_model_dir) == sum(p.numel() for p in model.parameters())


def test_a_cpu_fine_tune_records_device_memory_step_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    examples = pl.DataFrame({"prompt": ["a b c"] * 4, "response": ["d e f g"] * 4, "weight": [1.0] * 4})
    cfg = TrainConfig(batch_size=2, epochs=1, max_length=64, mixed_precision="no", save_minutes=0)
    metrics = run_training(tiny_model_dir, examples, cfg, tmp_path / "out")
    assert metrics["device"] == "cpu" and metrics["processes"] == 1 and metrics["precision"] == "fp32"
    assert metrics["peak_memory_gib"] > 0 and metrics["mfu"] is None  # no known peak for a CPU
    assert (
        metrics["params"] == perf.saved_params(tiny_model_dir)
        and metrics["flops_per_token"] == 6 * metrics["params"]
    )
    assert metrics["step_time_s"] == pytest.approx(
        metrics["tokens"] / metrics["tokens_per_s"] / metrics["steps"]
    )
    saved = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert {k: saved[k] for k in perf.FIELDS} == {k: metrics[k] for k in perf.FIELDS}  # the marker, extended
    again = run_training(tiny_model_dir, examples, cfg, tmp_path / "out")  # a finished folder: reused
    assert again["peak_memory_gib"] == metrics["peak_memory_gib"]
