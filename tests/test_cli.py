"""The command line: argument parsing, config errors exit 2 naming the key, `runs` on an empty root."""

from __future__ import annotations

from pathlib import Path

import pytest

from variational.cli import build_parser, main


def test_parser_has_the_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "tiny", "--data-root", "/tmp/x", "--set", "K=2", "--set", "M=2"])
    assert (args.config, args.data_root, args.set) == ("tiny", "/tmp/x", ["K=2", "M=2"])
    assert parser.parse_args(["sql", "tiny", "select 1"]).query == "select 1"
    assert parser.parse_args(["sql", "tiny", "-f", "hint_leakage"]).file == "hint_leakage"
    assert parser.parse_args(["models", "prepare"]).name == "smollm2-135m"
    assert parser.parse_args(["serve"]).names == ["tiny", "subset-1k", "full-17k"]
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
