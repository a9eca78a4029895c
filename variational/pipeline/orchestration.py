"""The one home of Prefect: every call into Prefect (and prefect-ray) outside the flow file is here.

In: plain functions and names. Out: those functions as Prefect task runs inside a flow run (plain calls
outside one, so unit tests and scripts need no server), the run logger, markdown artifacts, the flow's task
runner (threads or Ray), the temporary API server shielded from our signals, and `serve` for deployments.
The runner (variational/pipeline/runner.py) and the CLI ask this module; nothing else imports prefect
(tests/test_structure.py checks it).

Prefect's result cache is deliberately not used (NO_CACHE, no persisted results): a cache hit skips the task
body, so it cannot notice a deleted or damaged stage (issue #11); the runner's own check is the cache.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from variational import shutdown
from variational.config import ExecutorConfig

# Prefect's temporary server migrates its SQLite database on first use; its default 20 s wait failed in 3 of
# 3 fresh homes on a loaded 2-core machine, while 120 s started 4 of 4 (issue 11 item 1).
EPHEMERAL_STARTUP_TIMEOUT_S = 180
API_HEALTH_TIMEOUT_S = 5.0

log = logging.getLogger("variational")


class ServerUnreachable(RuntimeError):
    """A Prefect API server is configured but does not answer, or the temporary one did not start."""


# ---------------------------------------------------------------- inside a flow run
def in_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task, the plain `variational` logger elsewhere (tests, CLI)."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return log


def as_task(fn: Callable, name: str, run_name: str | Callable[[], str] | None = None) -> Callable:
    """`fn` as a Prefect task (task name `name`, run name `run_name`, no cache, no persisted result)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(fn, name=name, task_run_name=run_name or name, cache_policy=NO_CACHE, persist_result=False)


def task_in_run(fn: Callable, run_name: str) -> Callable:
    """`fn` as a task run named `run_name` (`<stage>[i/n]`) inside a flow run; outside one, `fn` itself."""
    return as_task(fn, run_name.split("[")[0], run_name) if in_run() else fn


def task_parameter(name: str, default: Any = None) -> Any:
    """A parameter of the current task run (for run names computed from the call)."""
    from prefect.runtime import task_run

    return task_run.parameters.get(name, default)


def publish_markdown(key: str, markdown: str, description: str) -> str | None:
    """A markdown artifact (inside a flow run only: outside, publishing would start a throwaway server)."""
    if not in_run():
        return None
    from prefect.artifacts import create_markdown_artifact

    with contextlib.suppress(Exception):  # no Prefect API reachable: the files on disk are the record
        return str(create_markdown_artifact(key=key, markdown=markdown, description=description))
    return None


def publish_progress(key: str, percent: float, description: str, artifact_id: Any = None) -> Any:
    """A progress artifact (0-100 %, inside a flow run only): created when `artifact_id` is None, else
    updated. Returns the artifact's id (None outside a flow run or without a reachable API)."""
    if not in_run():
        return None
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    with contextlib.suppress(Exception):  # progress is for watching: never a reason to fail a stage
        if artifact_id is None:
            return create_progress_artifact(progress=percent, key=key, description=description)
        update_progress_artifact(artifact_id, progress=percent, description=description)
        return artifact_id
    return artifact_id


# ---------------------------------------------------------------- task runners
def task_runner(executor: ExecutorConfig) -> Any:
    """The flow's task runner: ThreadPoolTaskRunner for `local`, RayTaskRunner for `ray` (Ray starts when the
    flow starts and stops with it when the flow started it)."""
    if executor.kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats prompt or upload
    from prefect_ray import RayTaskRunner

    from variational.pipeline.executor import ray_init_kwargs

    return RayTaskRunner(init_kwargs=ray_init_kwargs(executor))


@contextlib.contextmanager
def ray_remote_options(**options: Any) -> Iterator[None]:
    """Ray resources (num_gpus, num_cpus, max_retries, ...) for the tasks submitted inside this block."""
    from prefect_ray.context import remote_options

    with remote_options(**options):
        yield


# ---------------------------------------------------------------- the API server
def prefect_env(data_root: str) -> None:
    """Defaults for a run's Prefect: no analytics, time for a first database migration, results (unused by
    our tasks) beside the tables. A variable the user set wins."""
    from variational.pipeline.storage import home, is_url, open_root

    # beside the tables when they are a writable folder; else (object storage, a read-only mount) local
    local = not is_url(data_root) and open_root(data_root).writable()
    results = Path(data_root).resolve() / ".prefect" / "results" if local else home() / "prefect" / "results"
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(results))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; avoids log noise
    # our engine lines and vLLM's own (those of its engine processes go to the run's log file only)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "variational,vllm")
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S)
    )


def api_url() -> str | None:
    """The Prefect server the flow will talk to: $PREFECT_API_URL, else the active Prefect profile's;
    None means a temporary server started for this run."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def check_api(url: str | None, timeout_s: float = API_HEALTH_TIMEOUT_S) -> None:
    """Fail fast, in one line, when a configured Prefect server does not answer its health check (otherwise
    the flow dies later in a 38-frame traceback)."""
    if not url:
        return
    health = url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        problem = str(getattr(err, "reason", err))
    raise ServerUnreachable(
        f"no Prefect server answers at PREFECT_API_URL={url} ({health}: {problem}); start it with "
        "`prefect server start`, or unset PREFECT_API_URL to run on a temporary server"
    )


def ensure_api() -> str:
    """The configured server, checked; or, when none is configured, a temporary one of our own."""
    url = api_url() or start_shielded_server()
    check_api(url)
    return url or ""


def _die_with_parent() -> None:
    # preexec_fn (between fork and exec): the server gets SIGTERM when this process dies, even by SIGKILL
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _wait_healthy(server: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise ServerUnreachable(f"the temporary Prefect server exited with code {server.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            _stop_server(server)
            raise ServerUnreachable(
                f"the temporary Prefect server did not answer within {timeout_s:.0f}s; "
                "start one (`prefect server start`) and set PREFECT_API_URL"
            )
        time.sleep(0.2)


def start_shielded_server(startup_timeout_s: float | None = None) -> str | None:
    """Without PREFECT_API_URL, Prefect starts a temporary API server as a child in our process group, so
    the SIGTERM / SIGINT a scheduler or Ctrl-C sends to the group kills it first, and the stopping flow
    then retries its state updates for minutes (measured: 140 s). This starts the same server (uvicorn on
    Prefect's app, as Prefect does) in its own session, so only we stop it: at interpreter exit, after
    Prefect's own exit handlers have flushed their logs and events; it dies with us if we are killed.
    Returns the API URL, or None when PREFECT_API_URL was set already."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise ServerUnreachable("prefect is not installed; run scripts/setup.sh")
    with socket.socket() as sock:  # a free port: the kernel picks one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app_dir = os.path.dirname(os.path.dirname(spec.origin))
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory"]
    cmd += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "error", "--lifespan", "on"]
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    server = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    if startup_timeout_s is None:  # Prefect's own setting (prefect_env defaults it: a first start migrates)
        startup_timeout_s = float(
            os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)
        )
    _wait_healthy(server, url, startup_timeout_s)
    atexit.register(_stop_server, server)  # registered before Prefect's handlers, so it runs after them
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # Prefect read its settings at import: make it read them again
        sys.modules["prefect.context"].refresh_global_settings_context()
    log.info("temporary Prefect server on %s (its own session: signals to our group do not reach it)", url)
    return url


# ---------------------------------------------------------------- flows and deployments
def run_flow(flow: Any, executor: ExecutorConfig, **parameters: Any) -> Any:
    """Call the flow under the executor's task runner (local threads, or Ray)."""
    return flow.with_options(task_runner=task_runner(executor))(**parameters)


def deployment(flow: Any, executor: ExecutorConfig, name: str, parameters: dict, description: str) -> Any:
    return flow.with_options(task_runner=task_runner(executor)).to_deployment(
        name=name, parameters=parameters, description=description, tags=["variational", name]
    )


def serve(deployments: list, limit: int | None = None) -> int:
    """`prefect.serve(*deployments)` that stops cleanly: on SIGTERM the runner cancels its in-flight flow
    runs (each gets SIGTERM, stops at a safe point and is marked Cancelled) and returns 143 within seconds.
    Prefect's own handler stops the runner from inside the signal handler on another event loop and then
    exits 0 (measured: still running 8 s after SIGTERM). A second SIGTERM exits at once. Returns the exit
    code: 0 when the runner stopped by itself, 143 / 130 after a signal."""
    from prefect.runner import Runner

    class StoppableRunner(Runner):
        async def start(self, *args: object, **kwargs: object) -> None:
            self._signal_loop = asyncio.get_running_loop()
            self._stopping_task: asyncio.Task | None = None
            await super().start(*args, **kwargs)

        def handle_sigterm(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
            if shutdown.request("SIGTERM") is not None or not self.started:  # a second signal, or too early
                raise shutdown.StopRequested(shutdown.requested_signal() or "SIGTERM")
            log.warning("SIGTERM received: cancelling the flow runs in progress, then exiting")
            loop = self._signal_loop  # the handler runs in the main thread, inside the runner's loop
            loop.call_soon_threadsafe(lambda: setattr(self, "_stopping_task", loop.create_task(self.astop())))

    runner = StoppableRunner(pause_on_shutdown=True, limit=limit)
    for item in deployments:
        runner.add_deployment(item)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    print(f"serving {names}; stop with SIGTERM or Ctrl-C", flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, shutdown.StopRequested) as err:
        if isinstance(err, KeyboardInterrupt):
            return shutdown.EXIT_CODES["SIGINT"]
    return shutdown.exit_code() if shutdown.requested_signal() else 0
