"""The command line: argument parsing (options anywhere), one-line errors with exit codes (bad config or
YAML, a missing run, a dead Prefect server: 2; failing or refused SQL: 1), Prefect's env on a fresh HOME."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import free_port

from variational.cli import build_parser, main
from variational.pipeline.runs import record_stage
from variational.pipeline.store import StageStore


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


# ---------------------------------------------------------------- issue 17: run names and damaged run.json
def test_a_run_named_dot_dot_is_refused_everywhere(
    sql_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old code: `name: ..` validated (the pattern allowed dots), so its stages went to the root's parent;
    `sql ..` looked for DATA_ROOT/../run.json."""
    assert main(["run", "tiny", "--set", "name=..", "--data-root", str(sql_root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name" in err
    for argv in (
        ["sql", "..", "select 1"],
        ["report", ".."],
        ["verify-store", ".."],
        ["sql", "r/..", "select 1"],
    ):
        assert main([*argv, "--data-root", str(sql_root)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not one plain name" in err and "Traceback" not in err
    assert sorted(p.name for p in sql_root.parent.iterdir()) == ["data"]


def test_a_truncated_run_json_is_one_line_for_every_reader(
    sql_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old code: json.loads raised JSONDecodeError out of every command: a traceback."""
    other = StageStore(sql_root, "other", "verify", "fp1")
    other.write_shard(0, pl.DataFrame({"prompt_idx": [0]}))
    record_stage(sql_root, "other", other.finish(round_=1), computed=True)
    run_json = sql_root / "r" / "run.json"
    run_json.write_text(run_json.read_text()[:30])
    root = ["--data-root", str(sql_root)]
    for argv in (
        ["sql", "r", "select 1"],
        ["report", "r", "--out", str(tmp_path / "rep")],
        ["verify-store", "r"],
    ):
        assert main([*argv, *root]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run_json} is damaged (not valid JSON" in err, err
        assert "rerun the flow of this run to rewrite it" in err
    assert main(["runs", *root]) == 2  # the other run is still listed
    out, err = capsys.readouterr()
    assert "other" in out and "verify" in out and err.count("\n") == 1 and str(run_json) in err


# ---------------------------------------------------------------- one line, not a traceback (issue 17)
def test_a_folder_or_non_utf8_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run.yaml"
    folder.mkdir()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\nbase_model: m\n".encode("latin-1"))
    for path, what in ((folder, "Is a directory"), (latin1, "not UTF-8 text")):
        assert main(["run", str(path)]) == 2  # the config loads before anything runs
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and what in err


def test_sql_file_that_is_a_folder_or_not_text_is_one_line(
    sql_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "q.sql"
    binary.write_bytes(b"SELECT '\xff'")
    for path, what in ((tmp_path, "Is a directory"), (binary, "not UTF-8 text")):
        assert main(["sql", "r", "--data-root", str(sql_root), "-f", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"sql -f {path}: cannot read" in err and what in err


def _sql(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "variational.cli", "sql", "r", "--data-root", str(root), *args]


ENDLESS = "SELECT count(*) FROM range(100000000000) t(i) WHERE i % 7 = 3"  # ~10^11 rows: hours here


def test_sql_timeout_and_memory_options(sql_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "r", "--data-root", str(sql_root), "--timeout", "1", ENDLESS]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "time limit of 1 s" in err
    big = "SELECT length(string_agg(i::VARCHAR, ',')) FROM range(100000000) t(i)"
    assert main(["sql", "r", "--data-root", str(sql_root), "--memory", "64MB", big]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Out of Memory" in err and "--memory" in err
    assert main(["sql", "r", "--data-root", str(sql_root), "--memory", "lots", "select 1"]) == 1
    assert "give a size" in capsys.readouterr().err


def test_sql_prints_max_rows_of_an_endless_result(sql_root: Path) -> None:
    endless = "SELECT i FROM range(1000000000000) t(i)"
    out = subprocess.run(
        _sql(sql_root, "--max-rows", "3", "--timeout", "120", endless),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "│ 2 " in out.stdout and "│ 3 " not in out.stdout and "the result has more" in out.stdout


def test_ctrl_c_stops_a_query_in_one_line_with_exit_130(sql_root: Path) -> None:
    """DuckDB does not return to Python while it computes: a SIGINT waited for the query's end (hours),
    and then printed a traceback."""
    proc = subprocess.Popen(
        _sql(sql_root, ENDLESS),  # the default time limit, 300 s, is far beyond this test
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )
    try:
        time.sleep(5)  # started, connected, computing
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # the query never ends by itself
        proc.wait()
    assert proc.returncode == 130 and err == "error: interrupted (Ctrl-C)\n", err[-2000:]
