"""tasks/finetune.py: example builders on literal frames, one tiny end-to-end final_sft run."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
from conftest import finished_stage

from tasks import finetune
from variational import templates
from variational.config import RunConfig, TrainConfig
from variational.pipeline.fingerprint import stage_fingerprint as fp
from variational.pipeline.runner import run_stage

PROBLEMS = pl.DataFrame(
    {
        "prompt_idx": [0, 1, 2],
        "question": ["1+1?", "2+2?", "3+3?"],
        "think_ref": ["one and one", "two and two", "three and three"],
        "solution_ref": ["\\boxed{2}", "\\boxed{4}", "\\boxed{6}"],
    }
)


def test_pi_theta0_and_q_phi_examples() -> None:
    pi = finetune.pi_theta0_examples(PROBLEMS)
    assert pi["prompt"].to_list() == [templates.pi_prompt(q) for q in PROBLEMS["question"]]
    assert pi["response"][1] == templates.pi_response("two and two", "\\boxed{4}")
    assert pi["weight"].to_list() == [1.0] * 3
    assert pi["response"][1][: pi["think_chars"][1]] == "two and two"
    q = finetune.q_phi_examples(PROBLEMS, "PA")
    assert q["prompt"][2] == templates.posterior_prompt("3+3?", "\\boxed{6}", "PA")
    assert q["response"][2] == templates.posterior_response("three and three", "PA")
    assert q["prompt_idx"].to_list() == [0, 1, 2]


def test_forward_kl_weights() -> None:
    samples = pl.DataFrame(
        {
            "prompt_idx": [0, 0, 0, 1, 1, 2],
            "sample_idx": [0, 1, 2, 0, 1, 0],
            "think": ["a", "b", "c", "d", "e", "f"],
            "format_ok": [True, True, True, True, True, False],
        }
    )
    verdicts = pl.DataFrame(  # trace (0,0) has two rollouts: accuracy 0.5; (0,2) has no verdict -> 0
        {
            "prompt_idx": [0, 0, 0, 1, 1, 2],
            "sample_idx": [0, 0, 1, 0, 1, 0],
            "correct": [True, False, True, False, False, True],
        }
    )
    ex = finetune.q_phi_forward_kl_examples(PROBLEMS, samples, verdicts, "PB")
    # question 0: accuracies 0.5, 1, 0 -> 1/3, 2/3 (zero dropped); question 1: none correct -> dropped;
    # question 2: its only correct trace is unfinished (format_ok false) -> dropped
    assert ex["prompt_idx"].to_list() == [0, 0]
    assert ex["weight"].to_list() == pytest.approx([1 / 3, 2 / 3])
    assert ex["response"].to_list() == [templates.posterior_response(t, "PB") for t in ("a", "b")]
    assert ex["prompt"][0] == templates.posterior_prompt("1+1?", "\\boxed{2}", "PB")
    assert math.isclose(ex["weight"].sum(), 1.0)


def test_final_examples_think_chars() -> None:
    train = pl.DataFrame(
        {
            "row": [0],
            "prompt": ["p"],
            "response": [templates.pi_response("think", "sol")],
            "weight": [0.5],
            "origin": [-2],
            "prompt_idx": [7],
        }
    )
    ex = finetune.final_examples(train)
    assert ex.columns == list(finetune.EXAMPLES_SCHEMA) and ex["think_chars"][0] == len("think")
    assert ex["weight"][0] == 0.5


def test_fingerprints_track_inputs() -> None:
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m").model_dump(mode="json")
    up = {"problems": {"fingerprint": "p1"}}
    a = fp(finetune.Q_PHI, cfg, up)
    assert a == fp(finetune.Q_PHI, cfg, up)
    assert a != fp(finetune.Q_PHI, cfg | {"posterior_template": "PA"}, up)
    assert a != fp(finetune.Q_PHI, cfg, {"problems": {"fingerprint": "p2"}})
    assert a != fp(finetune.Q_PHI, cfg, up | {"init": {"fingerprint": "m"}})
    changed = cfg | {"q_phi": cfg["q_phi"] | {"epochs": 1}}
    assert a != fp(finetune.Q_PHI, changed, up)
    # how training is spread over processes and checkpointed does not change the weights
    spread = cfg | {"q_phi": cfg["q_phi"] | {"num_processes": 2, "save_minutes": 1}}
    assert a == fp(finetune.Q_PHI, spread, up)
    # pi_theta0 does not read the q_phi section
    assert fp(finetune.PI_THETA0, cfg, up) == fp(finetune.PI_THETA0, changed, up)


def test_final_sft_task_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    train = pl.DataFrame(
        {
            "row": list(range(4)),
            "prompt": [templates.pi_prompt(f"What is {i}+{i}?") for i in range(4)],
            "response": [templates.pi_response(f"{i} plus {i}", f"\\boxed{{{2 * i}}}") for i in range(4)],
            "weight": [1.0, 0.5, 2.0, 1.0],
            "origin": [-2, 0, 1, -1],
            "prompt_idx": [0, 1, 2, 3],
        }
    )
    up = {
        "train": finished_stage(tmp_path, "t", "train", train),
        "base_model": {"model_dir": str(tiny_model_dir)},
    }
    cfg = RunConfig(
        name="t",
        data_root=str(tmp_path),
        base_model=str(tiny_model_dir),
        final=TrainConfig(
            epochs=1, batch_size=2, max_length=512, micro_batch_tokens=1024, learning_rate=1e-3
        ),
    ).model_dump(mode="json")
    manifest = run_stage(finetune.PI_THETA, cfg, up)
    assert manifest["stage"] == "pi_theta" and manifest["rows"] == 4
    assert manifest["metrics"]["steps"] == 2
    model_dir = tmp_path / manifest["model_dir"]
    assert model_dir == tmp_path / manifest["path"] / "model"
    AutoModelForCausalLM.from_pretrained(model_dir)
    shard = pl.read_parquet(tmp_path / manifest["path"] / "part-00000.parquet")
    assert shard["weight"].to_list() == [1.0, 0.5, 2.0, 1.0]
    weights = {p: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert run_stage(finetune.PI_THETA, cfg, up) == manifest  # reused: not trained again
    assert {p: p.stat().st_mtime_ns for p in model_dir.iterdir()} == weights
