"""variational/verifiers/sandbox.py: hostile programs are blocked or killed, and none of their processes survive;
isolation never degrades silently (no namespaces: verification stops; no isolation only when set).

Each program runs through the real path (apps_check.judge -> sandbox -> harness), about 1 s each.
The strongest checks need mode "root" (we are root here and in CI); others run in every namespace mode.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from variational.config import ConfigError, load_config
from variational.verifiers import sandbox
from variational.verifiers.answers import check_code
from variational.verifiers.apps_check import judge

ROOT_MODE = sandbox.probe("root") is None if os.geteuid() == 0 else False
JAIL_MODES = [m for m in ("root", "userns") if (m != "root" or ROOT_MODE) and sandbox.probe(m) is None]
needs_root = pytest.mark.skipif(not ROOT_MODE, reason="needs root with mount/PID/net namespaces")
REPO = Path(__file__).resolve().parents[2]
PROJECT_FILE = REPO / "pyproject.toml"


def run(code: str, expected: str = "blocked", mode: str = "root", timeout_s: float = 3.0, **kw):
    tests = json.dumps({"inputs": [""], "outputs": [expected]})
    return judge(f"```python\n{code}\n```", tests, timeout_s=timeout_s, memory_mb=512, mode=mode, **kw)


def jailed_pids() -> list[int]:
    """Live processes running as one of the uids this test process hands to its jails."""
    first = sandbox.UID_BASE + (os.getpid() % 4_000_000) * 256
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            uid_line = next(x for x in (entry / "status").read_text().splitlines() if x.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if first <= int(uid_line.split()[1]) < first + 256:
            pids.append(int(entry.name))
    return pids


def test_auto_is_the_strongest_jail() -> None:
    assert sandbox.resolve_mode("auto") in ("root", "userns")  # never "none"
    if os.geteuid() == 0 and ROOT_MODE:
        assert sandbox.resolve_mode("auto") == "root"


@needs_root
def test_fork_loop_is_capped_and_killed() -> None:
    # 200 children that would sleep 30 s: RLIMIT_NPROC refuses most, the rest die with the verdict
    code = (
        "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    n += 1\nprint('blocked' if n < 200 else n)"
    )
    assert run(code).status == "ok"
    assert jailed_pids() == []


@needs_root
def test_fork_bomb_is_a_violation() -> None:
    v = run("import os\nwhile True:\n    os.fork()")
    assert v.status == "sandbox_violation" and not v.correct
    assert jailed_pids() == []


@needs_root
def test_setsid_daemon_dies_with_an_ok_verdict(tmp_path: Path) -> None:
    marker = tmp_path / "daemon-was-here"
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(3)\n"
        f"        open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\nprint('blocked')"
    )
    assert run(code).status == "ok"  # killed although the program passed, not only on a timeout
    assert jailed_pids() == []
    time.sleep(4)
    assert not marker.exists()


@pytest.mark.parametrize("mode", JAIL_MODES)
def test_no_network(mode: str) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        caught = (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\nexcept OSError:\n    print('blocked')"
        )
        assert run(caught, mode=mode).status == "ok"
        uncaught = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('x')"
        assert run(uncaught, mode=mode).status == "sandbox_violation"
    finally:
        srv.close()


@pytest.mark.parametrize("mode", JAIL_MODES)
def test_four_gigabytes_is_refused(mode: str) -> None:
    v = run("x = bytearray(4 * 1024**3)\nprint('blocked')", mode=mode)
    assert v.status == "sandbox_violation" and not v.correct


@pytest.mark.parametrize("mode", JAIL_MODES)
def test_writes_only_in_its_temp_dir(mode: str, tmp_path: Path) -> None:
    targets = ["/etc/evil", "/usr/evil", "/evil", "/root/evil", str(tmp_path / "evil")]
    code = (
        f"import os\nok = []\nfor p in {targets!r}:\n    try:\n        open(p, 'w').write('x')\n"
        "        ok.append(p)\n    except OSError:\n        pass\n"
        "open(os.path.join(os.environ['HOME'], 'mine'), 'w').write('x')  # its own dir works\n"
        "print('blocked' if not ok else ok)"
    )
    v = run(code, mode=mode)
    assert v.status == "ok", v.detail
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("mode", JAIL_MODES)
def test_cannot_read_the_host(mode: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o644)  # readable by anyone on the host: hidden, not merely protected
    caches = [
        p
        for p in (Path.home() / ".cache", Path(os.environ.get("VARIATIONAL_HOME", "/nonexistent")))
        if p.exists()
    ]
    paths = [str(p) for p in ("/etc/passwd", PROJECT_FILE, secret, *caches)]
    assert PROJECT_FILE.exists() and Path("/etc/passwd").exists()
    code = (
        f"import os\nseen = []\nfor p in {paths!r}:\n    try:\n"
        "        (os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(1))\n        seen.append(p)\n"
        "    except OSError:\n        pass\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()] if os.path.isdir('/proc') else []\n"
        "print('blocked' if not seen and len(pids) < 10 else (seen, pids))"  # no host PIDs either
    )
    v = run(code, mode=mode)
    assert v.status == "ok", v.detail


@needs_root
def test_runs_as_its_own_unprivileged_uid() -> None:
    v = run(
        "import os\nprint('blocked' if os.getuid() >= 1_900_000_000 and os.getgroups() == [] else os.getuid())"
    )
    assert v.status == "ok", v.detail


@pytest.mark.parametrize("mode", JAIL_MODES)
def test_print_flood_is_cut(mode: str) -> None:
    v = run("while True:\n    print('x' * 10**6)", mode=mode)  # RLIMIT_FSIZE: SIGXFSZ at 64 MB
    assert v.status in {"sandbox_violation", "timeout"}, v.detail


# ---------------------------------------------------------------- never unsandboxed by accident
CHECK = """
import json, sys
import polars as pl
from variational.verifiers.answers import check_code
df = pl.DataFrame({"text": ["```python\\nprint(3)\\n```"], "tests": [json.dumps({"inputs": ["1 2"], "outputs": ["3"]})]})
try:
    out = check_code(df, **json.loads(sys.argv[1]))
except Exception as e:
    print(f"{type(e).__name__}: {e}")
    sys.exit(2)
print(out["verifier"][0], out["status"][0])
"""


def check_with_path(path: Path, **kw) -> subprocess.CompletedProcess:
    """check_code on one row in a fresh process whose PATH is only `path`."""
    env = {**os.environ, "PATH": str(path), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", CHECK, json.dumps(kw)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture
def no_namespaces(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """(a PATH, what the stop names): no `unshare` at all, or one the kernel refuses, as where user
    namespaces are disabled (the message is util-linux's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if request.param == "refused":
        fake = bin_dir / "unshare"
        fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
        fake.chmod(0o755)
        return bin_dir, "unshare failed: Operation not permitted"
    return bin_dir, "unshare (util-linux) is not on PATH"


@pytest.mark.parametrize("no_namespaces", ["missing", "refused"], indirect=True)
def test_without_namespaces_code_verification_stops(no_namespaces: tuple[Path, str]) -> None:
    # the old sandbox fell back to no isolation with one warning line and judged the row anyway
    path, why = no_namespaces
    proc = check_with_path(path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stdout.splitlines()  # one line: what is missing and how to run without it
    assert line.startswith("SandboxUnavailable: code sandbox unavailable (root: ")
    assert why in line and "verify.sandbox: none" in line
    for setting in ("root", "userns"):  # a jail asked for by name stops the same way
        assert check_with_path(path, sandbox=setting).returncode == 2


@pytest.mark.parametrize("no_namespaces", ["refused"], indirect=True)
def test_no_isolation_runs_only_when_set_and_says_so(no_namespaces: tuple[Path, str]) -> None:
    proc = check_with_path(no_namespaces[0], sandbox="none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["code_tests_unsandboxed", "ok"]
    assert "candidate programs run WITHOUT isolation" in proc.stderr


def test_unknown_settings_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="verify.sandbox: must be one of"):
        load_config("tiny", ["verify.sandbox=chroot"])
    rows = pl.DataFrame(
        {"text": ["```python\nprint(3)\n```"], "tests": ['{"inputs": [""], "outputs": ["3"]}']}
    )
    with pytest.raises(ConfigError, match="verify.sandbox 'chroot' is unknown"):  # before any row runs
        check_code(rows, sandbox="chroot")
    with pytest.raises(ValueError, match="sandbox mode 'auto'"):  # a jail is a mode, never a setting
        sandbox.Jail("print(1)", b"", sandbox.Limits(), "auto")
    # the old override turned every verdict into `error` when unknown; it is refused now, whatever its value
    monkeypatch.setenv("VARIATIONAL_SANDBOX", "none")
    with pytest.raises(ConfigError, match="VARIATIONAL_SANDBOX is no longer read"):
        check_code(rows)


def test_explicit_none_still_judges() -> None:
    # mode "none" (no namespaces): only rlimits and the process group; benign programs are judged the same
    assert run("print(sum(map(int, '1 2'.split())))", expected="3", mode="none").status == "ok"
    assert run("while True:\n    pass", mode="none", timeout_s=1).status == "timeout"
