"""variational/pipeline/orchestration.py: Prefect's env on a fresh HOME, the temporary server's startup
timeout, the health check of a configured server (one clear error when it is dead)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from variational.pipeline.orchestration import ServerUnreachable, check_api, prefect_env


def test_prefect_env_waits_long_for_the_temporary_server(
    clean_prefect_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    prefect_env(str(tmp_path))
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "180"
    assert os.environ["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path.resolve() / ".prefect" / "results")
    clean_prefect_env.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
    prefect_env(str(tmp_path))
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
        "import sys; from variational.pipeline.orchestration import prefect_env; prefect_env(sys.argv[1]); "
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
        "import sys; from variational.pipeline.orchestration import prefect_env; prefect_env(sys.argv[1])\n"
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
    check_api(health_server)
    check_api(None)  # no URL: the temporary server, nothing to check


def test_an_unhealthy_or_dead_prefect_api_is_one_clear_error(health_server: str) -> None:
    with pytest.raises(ServerUnreachable, match=r"HTTP 404"):
        check_api(health_server + "/wrong")
    dead = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(ServerUnreachable, match=rf"PREFECT_API_URL={dead} .*unset PREFECT_API_URL"):
        check_api(dead)
