"""trainers/sft.py on the tiny random Llama: the loss falls and the folder loads, resume after a crash equals
an uninterrupted run, the CLI, timed checkpoints, and (slow) killed and stopped runs resume to the same weights.
The loss itself: tests/trainers/test_model.py; tokens, steps and packing: tests/trainers/test_batches.py."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from trainers import distributed, sft
from trainers.batches import collate, tokenize_examples
from trainers.model import micro_batch_loss
from variational.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def frame(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["prompt", "response", "weight"], orient="row")


def literal_rows(n: int) -> pl.DataFrame:
    rows = [
        (
            f"<|im_start|>user\nWhat is {i} + {i}?<|im_end|>\n<|im_start|>assistant\n",
            f"{i} + {i} = {2 * i}.",
            1.0,
        )
        for i in range(n)
    ]
    return frame(rows)


def small_rows(n: int = 16) -> pl.DataFrame:
    path = REPO / "variational" / "data" / "mini_stratos.jsonl"
    from tasks.ingest import ingest

    problems, _ = ingest(pl.read_ndjson(path))
    from tasks.finetune import pi_theta0_examples

    return pi_theta0_examples(problems.head(n))


def mean_loss(model_dir: Path, df: pl.DataFrame) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    exs = tokenize_examples(AutoTokenizer.from_pretrained(model_dir), df, TrainConfig(max_length=512))
    with torch.no_grad():
        wsum, n = micro_batch_loss(model, collate(exs))
    return wsum.item() / n


def test_loss_falls_and_folder_loads(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    df = small_rows(4)
    cfg = TrainConfig(
        learning_rate=1e-2, epochs=3, batch_size=2, micro_batch_tokens=2048, max_length=512, warmup_ratio=0.1
    )
    with caplog.at_level(logging.INFO, logger=sft.logger.name):
        m = sft.train(tiny_model_dir, df, cfg, tmp_path / "out", progress=False)
    # the log says which precision was chosen and why (fp32 on a CPU without native bf16)
    native = torch.cuda.is_available() or distributed.cpu_has_native_bf16()
    chosen = "bf16" if native else "fp32"
    assert any(f"precision {chosen} (mixed_precision: auto" in r.getMessage() for r in caplog.records)
    assert m["steps"] == 6 and len(m["loss_curve"]) == 6
    assert m["padding_fraction"] == 0.0 and m["tokens"] > 0
    before, after = mean_loss(tiny_model_dir, df), mean_loss(tmp_path / "out", df)  # loads the saved folder
    assert after < 0.75 * before, (before, after, m["loss_curve"])
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
    assert not (tmp_path / "out" / sft.CHECKPOINTS).exists()
    # a second call finds the finished folder and trains nothing
    assert sft.train(tiny_model_dir, df, cfg, tmp_path / "out", progress=False) == json.loads(
        (tmp_path / "out" / sft.METRICS).read_text()
    )


# Resume vs uninterrupted: the same process, the same kernels, the same order of operations, so the runs
# agree to float rounding in either precision; each test states its precision rather than leaving it to the
# CPU (`auto` is bf16 on a CPU with native bf16, fp32 elsewhere).
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_after_crash_equals_uninterrupted(
    tiny_model_dir: Path, tmp_path: Path, precision: str
) -> None:
    from safetensors.torch import load_file

    df = literal_rows(12)
    cfg = TrainConfig(
        learning_rate=1e-3,
        epochs=2,
        batch_size=4,
        micro_batch_tokens=64,
        max_length=48,
        save_steps=2,
        mixed_precision=precision,
    )
    full = sft.train(tiny_model_dir, df, cfg, tmp_path / "full", progress=False)
    crashed = sft.train(tiny_model_dir, df, cfg, tmp_path / "resumed", progress=False, stop_after=5)
    assert crashed["stopped"] and [p.name for p in sft.checkpoints(tmp_path / "resumed")] == ["step-00004"]
    resumed = sft.train(tiny_model_dir, df, cfg, tmp_path / "resumed", progress=False)
    assert resumed["steps"] == full["steps"] == 6
    assert resumed["loss_curve"] == pytest.approx(full["loss_curve"], rel=1e-5)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert not torch.equal(base["model.norm.weight"], a["model.norm.weight"])  # it did train


def test_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    literal_rows(4).write_parquet(tmp_path / "train.parquet")
    sft.main(
        [
            "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "m"),
            "--set", "epochs=1", "--set", "batch_size=2", "--set", "max_length=64",
        ]
    )  # fmt: skip
    assert json.loads((tmp_path / "m" / sft.METRICS).read_text())["steps"] == 2


def test_timed_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    df = literal_rows(8)
    # save_steps beyond the run: only the clock can trigger a checkpoint
    cfg = TrainConfig(epochs=1, batch_size=2, micro_batch_tokens=64, max_length=48, save_steps=1000)
    timed = cfg.model_copy(update={"save_minutes": 1e-9})  # due after every step
    sft.train(tiny_model_dir, df, timed, tmp_path / "timed", progress=False, stop_after=3)
    assert [p.name for p in sft.checkpoints(tmp_path / "timed")] == ["step-00003"]
    off = cfg.model_copy(update={"save_minutes": 0})
    sft.train(tiny_model_dir, df, off, tmp_path / "off", progress=False, stop_after=3)
    assert sft.checkpoints(tmp_path / "off") == []


def test_tiny_config_trains_fast_and_checkpoints_by_time() -> None:
    conf = load_config("tiny")
    for section in (conf.pi_theta0, conf.q_phi, conf.final):
        assert section.mixed_precision == "auto"  # bf16 only where the CPU has it (issue 11 item 2)
        assert 0 < section.save_minutes <= 2  # a killed tiny run keeps its training (issue 11 item 9)


def cli(model_dir: Path, data: Path, config: Path, out: Path) -> subprocess.Popen:
    args = ["--model", str(model_dir), "--data", str(data), "--train-config", str(config), "--out", str(out)]
    return subprocess.Popen(
        [sys.executable, "-m", "trainers.sft", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen, done) -> list[str]:
    """Lines of `proc` until `done(line)` or its end."""
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if done(line):
            break
    return lines


@pytest.mark.slow
def test_killed_and_stopped_runs_resume_to_the_same_weights(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file

    df = literal_rows(12)
    df.write_parquet(tmp_path / "train.parquet")
    cfg = TrainConfig(  # fp32 stated: the comparison below is to float32 rounding
        learning_rate=1e-3,
        epochs=2,
        batch_size=2,
        micro_batch_tokens=64,
        max_length=48,
        save_steps=1000,
        mixed_precision="no",
    )  # 12 steps; save_steps beyond them: checkpoints come from the clock or the stop only
    full = sft.train(tiny_model_dir, df, cfg, tmp_path / "full", progress=False)
    reference = load_file(tmp_path / "full" / "model.safetensors")

    def resume_and_compare(out: Path) -> None:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=sft.logger.name):
            resumed = sft.train(tiny_model_dir, df, cfg, out, progress=False)
        assert any("resumed from" in r.getMessage() for r in caplog.records)
        assert resumed["loss_curve"] == pytest.approx(full["loss_curve"], rel=1e-5)
        weights = load_file(out / "model.safetensors")
        for k in reference:
            torch.testing.assert_close(weights[k], reference[k], atol=1e-5, rtol=0)

    # SIGKILL once a timed checkpoint exists (one after every step): nothing runs at the kill
    (tmp_path / "timed.json").write_text(cfg.model_copy(update={"save_minutes": 1e-9}).model_dump_json())
    proc = cli(tiny_model_dir, tmp_path / "train.parquet", tmp_path / "timed.json", tmp_path / "killed")
    lines = read_until(proc, lambda line: "sft: step 3/12" in line)
    proc.kill()
    proc.wait()
    done = sft.checkpoints(tmp_path / "killed")
    assert done and not (tmp_path / "killed" / sft.METRICS).exists(), lines
    resume_and_compare(tmp_path / "killed")

    # SIGTERM mid-run with no checkpoint yet: the trainer writes one at the next micro-batch boundary, exits 143
    (tmp_path / "untimed.json").write_text(cfg.model_copy(update={"save_minutes": 0}).model_dump_json())
    proc = cli(tiny_model_dir, tmp_path / "train.parquet", tmp_path / "untimed.json", tmp_path / "stopped")
    lines = read_until(proc, lambda line: "sft: step 2/12" in line)
    assert sft.checkpoints(tmp_path / "stopped") == [], lines
    proc.send_signal(signal.SIGTERM)
    lines += read_until(proc, lambda line: False)
    assert proc.wait(timeout=60) == 143, lines
    (stopped_at,) = sft.checkpoints(tmp_path / "stopped")
    assert 2 <= int(stopped_at.name.removeprefix("step-")) < 12, lines
    assert not (tmp_path / "stopped" / sft.METRICS).exists()
    resume_and_compare(tmp_path / "stopped")
