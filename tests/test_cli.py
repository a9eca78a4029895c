"""The command line: argument parsing (options anywhere), one-line errors with exit codes (bad config or
YAML, a missing run, a dead Prefect server: 2; failing or refused SQL: 1), Prefect's env on a fresh HOME."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import free_port

from variational.cli import build_parser, main
from variational.pipeline.store import StageStore, record_stage


def test_parser_has_the_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "tiny", "--data-root", "/tmp/x", "--set", "K=2", "--set", "M=2"])
    assert (args.config, args.data_root, args.set) == ("tiny", "/tmp/x", ["K=2", "M=2"])
    assert parser.parse_args(["sql", "tiny", "select 1"]).query == "select 1"
    assert parser.parse_args(["sql", "tiny", "-f", "hint_leakage"]).file == "hint_leakage"
    assert parser.parse_args(["models", "prepare"]).name == "smollm2-135m"
    assert parser.parse_args(["serve"]).names == ["tiny", "subset-1k", "full-17k", "full-17k-official"]
    for cmd in (["runs"], ["report", "tiny"], ["verifier-report"]):
        parser.parse_args(cmd)


def test_bad_config_exits_2_and_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "tiny", "--set", "weights.estimator=best"]) == 2
    err = capsys.readouterr().err
    assert "weights.estimator" in err and "'acc', 'gml' or 'likelihood'" in err


def test_runs_on_an_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "--data-root", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out


def test_sql_on_a_missing_run_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "nope", "select 1", "--data-root", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_run_with_a_dead_prefect_api_exits_2_before_running(
    clean_prefect_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    clean_prefect_env.setenv("PREFECT_API_URL", dead)
    assert main(["run", "tiny", "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and dead in err and "prefect server start" in err
    assert not (tmp_path / "data" / "tiny").exists()  # nothing ran


# ---------------------------------------------------------------- one-line errors, options anywhere
def test_bad_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nK: [1, 2\nM: 3\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "not valid YAML" in err and "line 3" in err
    assert main(["run", "tiny", "--set", "K=[1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set K=[1" in err


def test_several_config_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "tiny", "--set", "K=0", "--set", "select.mode=best"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "K:" in err and "select.mode" in err


@pytest.fixture
def sql_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    store = StageStore(root, "r", "verify", "fp1")
    store.write_shard(0, pl.DataFrame({"prompt_idx": [0, 1, 2], "correct": [True, False, True]}))
    record_stage(root, "r", store.finish(round_=1), computed=True)
    return root


@pytest.mark.parametrize("order", ["options_last", "options_between", "options_first"])
def test_sql_takes_options_anywhere(sql_root: Path, capsys: pytest.CaptureFixture[str], order: str) -> None:
    query, root = "select count(*) as n from verdicts", str(sql_root)
    argv = {
        "options_last": ["sql", "r", query, "--data-root", root],
        "options_between": ["sql", "r", "--data-root", root, query],
        "options_first": ["sql", "--data-root", root, "--max-rows", "5", "r", query],
    }[order]
    assert main(argv) == 0
    assert "│ 3 " in capsys.readouterr().out


def test_invalid_sql_exits_1_with_one_line(sql_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "r", "--data-root", str(sql_root), "selec 1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "syntax error" in err and "Traceback" not in err


def test_sql_copy_into_a_stage_folder_is_refused(sql_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage = sql_root / "r" / "verify" / "fp1"
    attack = f"COPY (SELECT 9 AS prompt_idx, true AS correct) TO '{stage}/part-00001.parquet'"
    assert main(["sql", "r", "--data-root", str(sql_root), attack]) == 1
    assert "COPY statements are refused" in capsys.readouterr().err
    assert sorted(p.name for p in stage.glob("part-*")) == ["part-00000.parquet"]
