"""trainers/sft.py on the tiny random Llama: loss, weights, packing isolation, loss falls, resume."""

from __future__ import annotations

import copy
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from trainers import distributed, sft
from variational import templates
from variational.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Two and two make four.", 1.0),
    (
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
        "Blue, like the sky at noon.",
        1.0,
    ),
    ("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", "Hi there!", 1.0),
]


def frame(rows=ROWS) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["prompt", "response", "weight"], orient="row")


@pytest.fixture(scope="module")
def tok_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    return tok, model


@pytest.fixture(scope="module")
def tok_model64(tok_model):
    """The tiny model in float64, for gradient identities: in fp32 the sums of a packed row and of separate
    rows round differently per CPU kernel (up to 4e-5 apart on this AVX2 CPU), in fp64 ~1e-16."""
    tok, model = tok_model
    return tok, copy.deepcopy(model).double()


def grads(model, batches: list[dict], denom: float = 1.0) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        wsum, _ = sft.micro_batch_loss(model, b)
        (wsum / denom).backward()
        total += wsum.item() / denom
    out = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return total, out


# Of the largest gradient entry. Measured on an AVX2 EPYC, 2026-11-29: packed vs alone 2e-16 in fp64 (5.6e-6 in
# fp32, hence fp64 here); weight 3 vs 3x weight 1 5e-8 (transformers runs RMSNorm in fp32 even in an fp64
# model), so 1e-5 leaves 200x for other CPUs' kernels; a wrong packing (examples attending to each other)
# is 0.23, and weight 2 instead of 3 is 0.33.
GRAD_REL_TOL = 1e-5


def grad_gap(a: dict, b: dict) -> float:
    """Largest |a - b| over all parameters, relative to the largest |b| entry (the gradient's scale)."""
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[n] - b[n]).abs().max()) for n in b) / scale


def assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    gap = grad_gap(a, b)
    assert gap <= GRAD_REL_TOL, f"gradients differ by {gap:.2e} of their scale (allowed {GRAD_REL_TOL:.0e})"


def test_tokenize_boundary_truncation_and_think_weights(tok_model) -> None:
    tok, _ = tok_model
    cfg = TrainConfig(max_length=16, think_weight=0.5, answer_weight=2.0)
    think, solution = "Let me think.", "42"
    df = pl.DataFrame(
        {
            "prompt": [ROWS[0][0]],
            "response": [templates.pi_response(think, solution)],
            "weight": [3.0],
            "think_chars": [len(think)],
        }
    )
    cfg_long = cfg.model_copy(update={"max_length": 4096})
    (ex,) = sft.tokenize_examples(tok, df, cfg_long)
    p = tok(ROWS[0][0], add_special_tokens=False)["input_ids"]
    r = tok(df["response"][0], add_special_tokens=False)["input_ids"]
    assert ex.ids == p + r and ex.n_prompt == len(p) and not ex.truncated
    n_think = len(tok(think, add_special_tokens=False)["input_ids"])
    assert ex.weights[:n_think] == [1.5] * n_think and set(ex.weights[n_think:]) == {6.0}
    (short,) = sft.tokenize_examples(tok, df, cfg)
    assert short.truncated and len(short.ids) == 16 and short.ids == (p + r)[:16]
    with pytest.raises(ValueError, match="think_chars"):
        sft.tokenize_examples(tok, df.drop("think_chars"), cfg)


def test_token_mean_equals_plain_sft_loss(tok_model) -> None:
    tok, model = tok_model
    cfg = TrainConfig(loss_normalizer="token_mean")
    exs = sft.tokenize_examples(tok, frame(), cfg)
    wsum, n = sft.micro_batch_loss(model, sft.collate(exs))
    ours = wsum / sft.normaliser("token_mean", exs, avg_response_len=123.0)
    # hand-written: each example alone, CE of every response token given its prefix, mean over all tokens
    ces = []
    with torch.no_grad():
        for prompt, response, _ in ROWS:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([p + r])).logits[0]
            ces.append(F.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(r), reduction="none"))
    plain = torch.cat(ces).mean()
    assert n == sum(len(c) for c in ces)
    torch.testing.assert_close(ours.detach(), plain, atol=1e-5, rtol=1e-5)


def test_packed_equals_alone_and_padded(tok_model64) -> None:
    tok, model = tok_model64
    exs = sft.tokenize_examples(tok, frame(), TrainConfig())
    loss_packed, g_packed = grads(model, [sft.collate(exs)])
    loss_alone, g_alone = grads(model, [sft.collate([e]) for e in exs])
    loss_padded, g_padded = grads(model, [sft.collate(exs, packed=False, pad_id=tok.pad_token_id)])
    loss_tail, g_tail = grads(model, [sft.collate(exs, pad_to=64)])  # packed row with a pad segment
    assert loss_tail == pytest.approx(loss_alone, rel=1e-7)
    assert_grads_close(g_tail, g_alone)
    assert loss_packed == pytest.approx(loss_alone, rel=1e-7)
    assert loss_padded == pytest.approx(loss_alone, rel=1e-7)
    assert_grads_close(g_packed, g_alone)
    assert_grads_close(g_padded, g_alone)
    # the checks can fail: the same row read as ONE sequence (positions do not restart, so each example
    # attends to the ones before it) gives another loss and gradients far outside the tolerance (the random
    # model is near-uniform, so the gap is small, but many orders above fp64 rounding)
    b = sft.collate(exs)
    b["position_ids"] = torch.arange(b["input_ids"].shape[1])[None]
    loss_wrong, g_wrong = grads(model, [b])
    assert abs(loss_wrong - loss_alone) > 1e-2
    assert grad_gap(g_wrong, g_alone) > 1e3 * GRAD_REL_TOL


def test_zero_weight_contributes_no_gradient(tok_model64) -> None:
    tok, model = tok_model64
    rows = [ROWS[0], (ROWS[1][0], ROWS[1][1], 0.0)]
    exs = sft.tokenize_examples(tok, frame(rows), TrainConfig())
    _, g_zero = grads(model, [sft.collate([exs[1]])])
    assert all(bool((g == 0).all()) for g in g_zero.values())
    # Dr. SFT divides by L̄·|S|: the weight-0 example only adds to |S| (2 instead of 1)
    avg = 10.0
    _, g_pair = grads(model, [sft.collate(exs)], sft.normaliser("dr_sft", exs, avg))
    _, g_one = grads(model, [sft.collate(exs[:1])], sft.normaliser("dr_sft", exs[:1], avg))
    assert_grads_close({k: 2 * v for k, v in g_pair.items()}, g_one)


def test_weights_scale_gradient(tok_model64) -> None:
    tok, model = tok_model64
    one = sft.tokenize_examples(tok, frame(ROWS[:1]), TrainConfig())
    three = sft.tokenize_examples(tok, frame([(ROWS[0][0], ROWS[0][1], 3.0)]), TrainConfig())
    _, g1 = grads(model, [sft.collate(one)])
    _, g3 = grads(model, [sft.collate(three)])
    assert_grads_close({k: 3 * v for k, v in g1.items()}, g3)
    # and the check can fail: weight 3 is not weight 2
    assert grad_gap({k: 2 * v for k, v in g1.items()}, g3) > 1e3 * GRAD_REL_TOL


def test_plan_steps_schedule_and_packing() -> None:
    cfg = TrainConfig(batch_size=4, epochs=1.5, seed=7)
    plan = sft.plan_steps(10, cfg)
    assert [len(s) for s in plan] == [4, 4, 2, 4, 4]  # 3 steps per epoch, 1.5 epochs -> ceil(4.5)
    assert sorted(i for s in plan[:3] for i in s) == list(range(10))
    assert plan == sft.plan_steps(10, cfg) and plan[:3] != plan[3:] + [[]]
    assert plan[:3] != sft.plan_steps(10, cfg.model_copy(update={"seed": 8}))[:3]
    lr = [sft.lr_at(s, 10, TrainConfig(learning_rate=1.0, warmup_ratio=0.2)) for s in range(10)]
    assert (
        lr[0] == 0.5
        and lr[1] == 1.0
        and lr[2] == 1.0
        and lr[-1] < 0.05
        and lr == sorted(lr[:2]) + sorted(lr[2:], reverse=True)
    )
    assert sft.pack([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    exs = [sft.Example([1] * n, 1, [1.0] * (n - 1), False) for n in (5, 5, 5)]
    shards = [sft.shard_step(exs, 10, 2, r, packed=True) for r in range(2)]
    assert [len(s) for s in shards] == [1, 1] and shards[1][0] == [exs[2]]
    assert [len(m) for m in sft.shard_step(exs, 10, 4, 3, packed=True)] == [0]  # empty pad micro-batch


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
    exs = sft.tokenize_examples(AutoTokenizer.from_pretrained(model_dir), df, TrainConfig(max_length=512))
    with torch.no_grad():
        wsum, n = sft.micro_batch_loss(model, sft.collate(exs))
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


def test_resume_after_crash_equals_uninterrupted(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    df = literal_rows(12)
    cfg = TrainConfig(
        learning_rate=1e-3, epochs=2, batch_size=4, micro_batch_tokens=64, max_length=48, save_steps=2
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
    cfg = TrainConfig(
        learning_rate=1e-3, epochs=2, batch_size=2, micro_batch_tokens=64, max_length=48, save_steps=1000
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
