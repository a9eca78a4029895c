"""variational/analysis/plan.py and `variational plan`: work counts from the config and the data, costs from
rates, one row per costed call of the flow's DAG (flows.recipe.dag), in its order."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from flows.recipe import dag
from variational.analysis.plan import (
    COSTS,
    FREE,
    PAPER_ROWS,
    SOLUTION_TOKENS,
    THINK_FRACTION,
    Plan,
    lengths_from_problems,
    model_params,
)
from variational.analysis.plan import plan as plan_dag
from variational.cli import main
from variational.config import RunConfig, load_config
from variational.data.raw import embedded_path
from variational.pipeline.store import StageStore


def plan(conf: RunConfig, **kwargs) -> Plan:
    """The planner on the DAG the flow runs for `conf` (what `variational plan` does)."""
    return plan_dag(conf, dag(conf.model_dump(mode="json")), **kwargs)


def by_stage(p) -> dict:
    return {s.stage: s for s in p.stages}


def test_full_17k_uses_the_papers_counts_without_data(tmp_path: Path) -> None:
    conf = load_config("full-17k", [f"data_root={tmp_path}"])  # hub dataset, nothing local
    p = plan(conf, gpus=8)
    assert p.problems == PAPER_ROWS == 16_710 and "paper's counts" in p.basis
    assert p.mean_tokens["think"] == pytest.approx(THINK_FRACTION * 32_764, abs=0.1)
    stages = by_stage(p)
    assert stages["posterior_samples"].work == "16,710 prompts x K=8"
    assert stages["logps"].work == "133,680 traces x 2 models"
    assert stages["rollouts"].tokens == pytest.approx(133_680 * 8 * SOLUTION_TOKENS, rel=1e-6)
    assert stages["verdicts"].work.startswith("1,069,440 answers") and stages["verdicts"].gpu_hours == 0
    assert stages["pi_theta"].work == "33,420 examples x 3 epochs"  # 17k-mix: originals + one trace each
    # ~1.6-2.1B scored tokens: the order of magnitude issue 9 gives for full-17k
    assert 1.5e9 < stages["logps"].tokens < 2.5e9
    assert all(s.gpu_hours > 0 for s in p.stages if s.stage != "verdicts")
    # twice the GPUs, half the wall time (linear scaling), same GPU-hours
    p16 = plan(conf, gpus=16)
    assert p16.gpu_hours == pytest.approx(p.gpu_hours)
    assert p16.wall_hours == pytest.approx(p.wall_hours / 2, rel=1e-6)


def test_tiny_counts_come_from_the_embedded_data(tmp_path: Path) -> None:
    conf = load_config("tiny", [f"data_root={tmp_path}"])
    p = plan(conf, gpus=1)
    assert p.problems == 8 and "embedded:mini_stratos" in p.basis
    stages = by_stage(p)
    assert stages["posterior_samples"].work == "8 prompts x K=4"
    assert stages["verdicts"].work.startswith("128 answers")  # 8 x K=4 x M=4
    # the embedded model is ~30x smaller than Qwen3-4B, so its rates are ~30x higher
    assert p.params == pytest.approx(134.5e6)
    assert 0 < p.gpu_hours < 0.01


def _problems_frame(n: int, question: int, think: int, solution: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "question": ["q" * question] * n,
            "think_ref": ["t" * think] * n,
            "solution_ref": ["s" * solution] * n,
        }
    )


def test_a_stored_problems_table_wins_over_the_papers_counts(tmp_path: Path) -> None:
    conf = load_config("full-17k", [f"data_root={tmp_path}"])
    (problems,) = [c for c in dag(conf.model_dump(mode="json")) if c.stage.name == "problems"]
    store = StageStore(tmp_path, "full-17k", "problems", problems.fingerprint)
    store.write_shard(0, _problems_frame(3, 250, 2500, 500))
    assert plan(conf, gpus=8).problems == PAPER_ROWS  # no manifest yet: not a finished stage
    store.finish(round_=1)
    p = plan(conf, gpus=8)
    assert p.problems == 3 and "problems table" in p.basis
    assert p.mean_tokens == {"question": 100.0, "think": 1000.0, "solution": 200.0}
    assert plan(conf, gpus=8, use_data=False).problems == PAPER_ROWS


def test_the_stored_problems_are_read_through_their_manifest_only(tmp_path: Path) -> None:
    """Only the folder of this config's fingerprint, and in it only the shards its manifest lists."""
    conf = load_config("full-17k", [f"data_root={tmp_path}"])
    (problems,) = [c for c in dag(conf.model_dump(mode="json")) if c.stage.name == "problems"]
    stale = StageStore(tmp_path, "full-17k", "problems", "0123456789abcdef")  # another config's problems
    stale.write_shard(0, _problems_frame(7, 10, 10, 10))
    stale.finish(round_=1)
    assert plan(conf, gpus=8).problems == PAPER_ROWS
    store = StageStore(tmp_path, "full-17k", "problems", problems.fingerprint)
    store.write_shard(0, _problems_frame(3, 250, 2500, 500))
    store.finish(round_=1)
    junk = _problems_frame(5, 25_000, 25, 25).with_columns(extra=pl.lit("not in the manifest"))
    junk.write_parquet(store.dir / "part-00001.parquet")  # a stray shard: never listed, never read
    assert [f.name for f in store.unlisted_shards()] == ["part-00001.parquet"] and store.is_complete()
    p = plan(conf, gpus=8)
    assert p.problems == 3 and "(3 rows)" in p.basis
    assert p.mean_tokens == {"question": 100.0, "think": 1000.0, "solution": 200.0}


@pytest.mark.parametrize(
    "overrides", [[], ["rounds=2"], ["posterior_objective=forward_kl"]], ids=["tiny", "rounds2", "fkl"]
)
def test_rows_are_the_dags_costed_stages_in_its_order(tmp_path: Path, overrides: list[str]) -> None:
    conf = load_config("tiny", [f"data_root={tmp_path}", *overrides])
    calls = dag(conf.model_dump(mode="json"))
    p = plan_dag(conf, calls, gpus=1)
    assert [s.key for s in p.stages] == [c.key for c in calls if c.stage.name in COSTS]
    # every stage of the DAG is either costed or one of the free ones, and nothing else is listed
    assert [s.stage.split("[")[0] for s in p.stages] == [
        c.stage.name for c in calls if c.stage.name not in FREE
    ]
    free = {"problems", "contamination", "base_model", "weights", "train"}
    assert {c.stage.name for c in calls} & set(FREE) == free
    for s in p.stages:  # a row that names a round names its call's round
        assert "[" not in s.stage or s.stage.endswith(f"[round {s.key.split('@')[1]}]")


def test_rows_of_two_rounds_and_of_forward_kl(tmp_path: Path) -> None:
    two = plan(load_config("tiny", [f"data_root={tmp_path}", "rounds=2"]), gpus=1)
    loop = ["posterior_samples", "logps", "rollouts", "verdicts", "pi_theta"]
    assert [s.stage for s in two.stages] == [
        "pi_theta0",
        "q_phi",
        *[f"{name}[round 1]" for name in loop],
        *[f"{name}[round 2]" for name in ["prior_samples", "prior_verdicts", "q_phi", *loop]],
        "eval",
    ]
    fkl = plan(load_config("tiny", [f"data_root={tmp_path}", "posterior_objective=forward_kl"]), gpus=1)
    assert [s.stage for s in fkl.stages] == [
        "pi_theta0",
        "prior_samples",
        "prior_verdicts",
        "q_phi",
        *loop,
        "eval",
    ]


def test_fine_tunes_count_their_optimizer_steps(tmp_path: Path) -> None:
    """trainers/sft.py `plan_steps`: ceil(examples / batch_size) steps an epoch, ceil(epochs x that) in all."""
    full = by_stage(plan(load_config("full-17k", [f"data_root={tmp_path}"]), gpus=8))
    assert (full["pi_theta0"].steps, full["pi_theta0"].batch_size) == (525, 96)  # 175 x 3
    assert (full["q_phi"].steps, full["pi_theta"].steps) == (10_450, 525)  # 1,045 x 10; 33,420 / 192 x 3
    assert full["logps"].steps is None and full["verdicts"].steps is None
    tiny = by_stage(plan(load_config("tiny", [f"data_root={tmp_path}", "pi_theta0.epochs=1.5"]), gpus=1))
    assert tiny["pi_theta0"].steps == 6  # 8 examples, batch 2: 4 an epoch, ceil(1.5 x 4)
    assert tiny["pi_theta0"].work == "8 examples x 1.5 epochs"


def test_local_datasets_are_subset_as_ingest_does(tmp_path: Path) -> None:
    """The embedded set through variational/data/raw.py: shuffle with subset_seed over every row, then limit."""
    subset = load_config("tiny", [f"data_root={tmp_path}", "data.limit=5", "data.subset_seed=3"])
    p = plan(subset, gpus=1)  # the same 5 problems as tasks/ingest.py keeps
    assert p.problems == 5 and p.mean_tokens == {"question": 53.0, "think": 41.0, "solution": 18.1}
    rows = [json.loads(line) for line in embedded_path("embedded:mini_stratos").read_text().splitlines()]
    bad = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "no tags"}]}
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([json.dumps(rows[0]), "not json", json.dumps(bad), json.dumps(rows[1])]) + "\n")
    p = plan(load_config("tiny", [f"data_root={tmp_path}", f"data.dataset={data}", "data.limit=3"]), gpus=1)
    assert p.problems == 1 and f"dataset {data} (1 problems)" in p.basis  # rows 0-2: one good, two rejected


def test_rounds_forward_kl_and_all_k_change_the_work(tmp_path: Path) -> None:
    base = [f"data_root={tmp_path}", "eval.enabled=false"]
    two = by_stage(plan(load_config("tiny", [*base, "rounds=2"]), gpus=1))
    assert {"prior_samples[round 2]", "q_phi[round 2]", "pi_theta[round 2]"} <= two.keys()
    assert "prior_samples[round 1]" not in two and "eval" not in two
    fkl = by_stage(plan(load_config("tiny", [*base, "posterior_objective=forward_kl"]), gpus=1))
    assert fkl["q_phi"].work == "32 examples x 1 epochs"  # 8 problems x M=4 prior traces
    allk = by_stage(plan(load_config("tiny", [*base, "select.mode=all-k"]), gpus=1))
    assert allk["pi_theta"].work == "32 examples x 1 epochs"  # every trace of 8 problems x K=4


def test_tensor_parallel_needs_enough_gpus(tmp_path: Path) -> None:
    conf = load_config("full-17k", [f"data_root={tmp_path}", "engine.tensor_parallel_size=4"])
    with pytest.raises(ValueError, match="tensor_parallel_size=4 needs at least 4 GPUs"):
        plan(conf, gpus=2)
    # TP=4 on 6 GPUs: one engine, two GPUs idle while sampling
    p = by_stage(plan(conf, gpus=6))["posterior_samples"]
    assert p.wall_hours == pytest.approx(p.gpu_hours / 4)


def test_lengths_and_model_size() -> None:
    frame = pl.DataFrame({"question": ["ab" * 5], "think_ref": ["x" * 25], "solution_ref": [""]})
    assert lengths_from_problems(frame).row(0) == (4.0, 10.0, 0.0, 1)
    assert model_params("Qwen/Qwen2.5-7B-Instruct")[0] == 7e9
    assert model_params("HuggingFaceTB/SmolLM2-360M")[0] == 360e6
    assert "assumed" in model_params("some/model")[1]


def test_cli_prints_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "full-17k", "--gpus", "8", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| posterior_samples | 16,710 prompts x K=8 |" in out and "assumed" in out and "measured" in out
    assert "- pi_theta0: 525 steps of 96 examples" in out and "- q_phi: 10,450 steps of 16 examples" in out
    assert main(["plan", "tiny", "--gpus", "2", "--json", "--data-root", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 2 and data["problems"] == 8 and data["total_gpu_hours"] > 0
    steps = {s["stage"]: s["steps"] for s in data["stages"]}
    assert steps["pi_theta0"] == 4 and steps["pi_theta"] == 4 and steps["logps"] is None
    assert {"score", "train", "generate", "verify"} <= data["rates"].keys()
