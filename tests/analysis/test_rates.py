"""variational/analysis/rates.py and `variational plan --calibrate`: the defaults say which rates are measured
and which assumed; a finished run's shard stats or a calibration file replace them, scaled to the reference
shape by model size and along the defaults' curves by context, and the plan says where each came from."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from flows.recipe import dag
from variational.analysis import rates
from variational.analysis.plan import KIND_OF, plan
from variational.cli import main
from variational.config import load_config
from variational.pipeline import runs, shardstats, store

SMOL = 134.5e6  # the embedded model's parameters (rates.KNOWN_PARAMS)


def _stage(root: Path, name: str, records: list[dict]) -> None:
    """A finished stage whose shards carry these stats records, recorded in run.json as the runner does."""
    st = store.StageStore(root, "tiny", name, f"fp-{name}")
    for r in records:
        st.write_shard(r["shard"], pl.DataFrame({"x": [1]}))
        shardstats.write_record(st.dir, shardstats.new_record(name, 1, **r))
    st.write_side(shardstats.SIDE_TABLE, shardstats.gather(st.dir, st.shard_files()))
    manifest = st.finish(round_=1, extra_files=("shard_stats.parquet",))
    runs.record_stage(root, "tiny", manifest, computed=True)


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    conf = load_config("tiny", [f"data_root={tmp_path}"])
    runs.begin_run(tmp_path, "tiny", conf.model_dump(mode="json"))
    cpu = {"device": "cpu"}
    # generation: 1,000 + 500 tokens in 30 s of work (the 20 s engine start left out)
    _stage(tmp_path, "posterior_samples", [
        {"shard": 0, "tokens_in": 400, "tokens_out": 1000, "seconds": 40.0, "engine_start_s": 20.0, **cpu},
        {"shard": 1, "tokens_in": 200, "tokens_out": 500, "seconds": 10.0, **cpu},
    ])  # fmt: skip
    # scoring: 8 traces, 2 backbones, (3,000 context + 1,000 scored) tokens in 8 s -> 500 tok/s at 250 tokens
    _stage(
        tmp_path,
        "logps",
        [{"shard": 0, "rows_in": 8, "tokens_in": 3000, "tokens_out": 1000, "seconds": 8.0, **cpu}],
    )
    # training: 2,000 tokens at 250 tok/s on 8 examples (250-token rows)
    _stage(tmp_path, "pi_theta0", [
        {"shard": 0, "rows_out": 8, "tokens_in": 2000, "tokens_per_s": 250.0, "seconds": 12.0, **cpu}
    ])  # fmt: skip
    # verification: 100 rows in 2 s with verify.workers = 2 -> 25 per second per core
    _stage(tmp_path, "verdicts", [{"shard": 0, "rows_out": 100, "seconds": 2.0, **cpu}])
    return tmp_path


def test_defaults_say_which_rates_are_measured_and_which_assumed() -> None:
    table = rates.DEFAULT.table()
    assert set(table) == set(rates.KINDS)
    assert not table["generate"]["measured"] and table["generate"]["source"].startswith("assumed")
    assert table["score"]["measured"] and table["train"]["measured"] and table["verify"]["measured"]
    assert rates.DEFAULT.score_time(1024) == pytest.approx(1 / 69_084)


def test_a_run_calibrates_every_rate_it_measured(finished_run: Path) -> None:
    cal = rates.calibration_from_run(finished_run, "tiny", KIND_OF)
    assert cal["params"] == SMOL and cal["device"] == "cpu" and "run 'tiny'" in cal["source"]
    got = cal["rates"]
    assert got["generate"]["tokens_per_s"] == pytest.approx(1500 / 30)
    assert got["score"] == {"tokens_per_s": pytest.approx(500.0), "context": pytest.approx(250.0)}
    assert got["train"] == {"tokens_per_s": pytest.approx(250.0), "context": pytest.approx(250.0)}
    assert got["verify"]["pairs_per_s_per_core"] == pytest.approx(25.0)


def test_calibrated_rates_are_scaled_to_the_reference_shape(finished_run: Path) -> None:
    r = rates.calibrated(rates.calibration_from_run(finished_run, "tiny", KIND_OF))
    to_ref = rates.REFERENCE_PARAMS / SMOL
    assert r.generate_tok_s == pytest.approx(50.0 / to_ref) and r.generate_includes_prefill
    # the score curve passes through the measured point, its shape (a : b) kept
    assert 1 / r.score_time(250) == pytest.approx(500.0 / to_ref)
    assert r.score_b / r.score_a == pytest.approx(rates.SCORE_B / rates.SCORE_A)
    assert 1 / r.train_time(250) == pytest.approx(250.0 / to_ref)
    assert r.verify_pairs_s_per_core == pytest.approx(25.0)
    table = r.table()
    for kind in ("generate", "score", "train", "verify"):
        assert table[kind]["measured"] and table[kind]["device"] == "cpu" and "tiny" in table[kind]["run"]
    assert table["tokens"]["source"] == rates.DEFAULT.table()["tokens"]["source"]  # not measured by runs


def test_a_calibration_file_sets_only_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "h200.json"
    cal = {"source": "bench/gpu_check.py", "device": "NVIDIA H200", "measured_at": "2026-12-04"}
    cal |= {"params": rates.REFERENCE_PARAMS, "rates": {"generate": {"tokens_per_s": 9000.0, "context": 0}}}
    path.write_text(json.dumps(cal))
    r = rates.load_rates(str(path), tmp_path, KIND_OF)
    assert r.generate_tok_s == 9000.0 and r.device == "NVIDIA H200"
    assert (r.score_a, r.train_at_2k) == (rates.SCORE_A, rates.TRAIN_AT_2K)
    assert r.table()["generate"]["run"] == "bench/gpu_check.py"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object with `params` and `rates`"):
        rates.load_rates(str(path), tmp_path, KIND_OF)


def test_a_measured_generation_rate_replaces_generate_plus_prefill(finished_run: Path) -> None:
    conf = load_config("tiny", [f"data_root={finished_run}"])
    calls = dag(conf.model_dump(mode="json"))
    assumed = {s.stage: s for s in plan(conf, calls, gpus=1).stages}
    measured = {
        s.stage: s
        for s in plan(conf, calls, gpus=1, rates=rates.load_rates("tiny", finished_run, KIND_OF)).stages
    }
    assert assumed["rollouts"].rate == "generate + prefill"
    assert measured["rollouts"].rate == "generate (prefill included)"
    assert measured["rollouts"].tokens == assumed["rollouts"].tokens  # the same work, another rate
    # 50 tok/s for a 135M model on this CPU vs 6,000 x 30 assumed for an H200: far slower
    assert measured["rollouts"].gpu_hours > 100 * assumed["rollouts"].gpu_hours


def test_cli_calibrate_from_a_run_and_errors(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(finished_run)
    assert main(["plan", "tiny", "--gpus", "1", "--data-root", root, "--calibrate", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rates"]["generate"]["measured"] and data["rates"]["generate"]["device"] == "cpu"
    assert main(["plan", "tiny", "--gpus", "1", "--data-root", root, "--calibrate", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "plan for 'tiny' on 1 x cpu" in out and "measured: run 'tiny'" in out
    assert main(["plan", "tiny", "--data-root", root, "--calibrate", "nosuchrun"]) == 2
    assert "no run 'nosuchrun'" in capsys.readouterr().err
