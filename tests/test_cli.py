"""The command line: argument parsing (options anywhere), one-line errors with exit codes (bad config or
YAML, a missing run, a dead Prefect server: 2; failing or refused SQL: 1), Prefect's env on a fresh HOME."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from variational.cli import CliError, _prefect_env, build_parser, check_prefect_api, main
from variational.store import StageStore, record_stage


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


# ---------------------------------------------------------------- Prefect: fresh machines, dead servers
PREFECT_VARS = (
    "PREFECT_API_URL",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
)


@pytest.fixture
def prefect_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The Prefect variables unset for the test and restored after it (the CLI sets them in os.environ)."""
    for name in PREFECT_VARS:
        monkeypatch.setenv(name, "placeholder")  # records the original value for the teardown
        monkeypatch.delenv(name)
    return monkeypatch


def test_prefect_env_waits_long_for_the_temporary_server(
    prefect_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _prefect_env(str(tmp_path))
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "180"
    assert os.environ["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path.resolve() / ".prefect" / "results")
    prefect_env.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
    _prefect_env(str(tmp_path))
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "600"  # the user's value wins


def fresh_home_env(tmp_path: Path) -> dict[str, str]:
    """A new user's environment: an empty HOME (it exists, as a home does), no Prefect settings."""
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "home" / ".prefect")}
    return env


def test_prefect_reads_the_startup_timeout_from_our_env(tmp_path: Path) -> None:
    """Guards the variable's name: a brand-new Prefect process (fresh HOME) sees our 180 s, not its 20 s."""
    code = (
        "import sys; from variational.cli import _prefect_env; _prefect_env(sys.argv[1]); "
        "from prefect.settings import get_current_settings as s; "
        "print(s().server.ephemeral.startup_timeout_seconds)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "data")],
        env=fresh_home_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split()[-1] == "180"


@pytest.mark.slow
def test_a_flow_starts_from_a_brand_new_prefect_home(tmp_path: Path) -> None:
    """The temporary server migrates a new database before the flow runs; with Prefect's 20 s default this
    timed out on loaded 2-core machines (issue 11 item 1)."""
    code = (
        "import sys; from variational.cli import _prefect_env; _prefect_env(sys.argv[1])\n"
        "from prefect import flow\n"
        "@flow\n"
        "def answer() -> int:\n"
        "    return 42\n"
        "print('flow returned', answer())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "data")],
        env=fresh_home_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "flow returned 42" in out.stdout
    assert (tmp_path / "home" / ".prefect").is_dir()  # the new home was used, not the developer's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # the name http.server calls
        code = 200 if self.path == "/api/health" else 404
        code = self.status if code == 200 else code
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def test_a_live_prefect_api_passes_the_check(health_server: str) -> None:
    check_prefect_api(health_server)
    check_prefect_api(None)  # no URL: the temporary server, nothing to check


def test_an_unhealthy_or_dead_prefect_api_is_one_clear_error(health_server: str) -> None:
    with pytest.raises(CliError, match=r"HTTP 404"):
        check_prefect_api(health_server + "/wrong")
    dead = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(CliError, match=rf"PREFECT_API_URL={dead} .*unset PREFECT_API_URL"):
        check_prefect_api(dead)


def test_run_with_a_dead_prefect_api_exits_2_before_running(
    prefect_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    prefect_env.setenv("PREFECT_API_URL", dead)
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
