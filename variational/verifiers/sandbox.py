"""A jail for untrusted Python: the code verifier runs every candidate program through `start_python`.

In:  Python source (the harness, variational/verifiers/harness.py), bytes for its stdin, limits, and the
     setting `verify.sandbox` (auto | root | userns | none; `resolve_mode` turns it into a mode).
Out: a `Jail` whose stdout lines are read one at a time under a deadline, in linear time and bounded
     (`read_line`); `close()` kills everything that ran inside.

What it enforces (mode "root": we are root, as here and in CI; measured to work with util-linux 2.38):
- its own namespaces: network (only a downed loopback), mount, PID, IPC, UTS (`unshare`);
- a private root filesystem: a read-only tmpfs holding read-only binds of /usr, the Python installation
  and the venv, /etc/ld.so.cache, five /dev nodes and a fresh /proc. The project tree, /root, /home, the
  user's caches, /etc/passwd and the host /tmp are simply not there;
- one writable place: /sandbox, a size-capped tmpfs owned by the program's uid (its HOME, TMPDIR, cwd);
- an unprivileged identity: a dedicated uid/gid per concurrent jail (setpriv: no groups, no capabilities,
  no_new_privs), so RLIMIT_NPROC counts only this jail's processes;
- rlimits (prlimit): processes, address space, file size, open files, CPU, no core dumps;
- nothing outlives the verdict: the harness is PID 1 of the namespace and kills every other process after
  each test; when PID 1 exits the kernel kills the rest; `close()` kills PID 1 from outside.
Mode "userns" (not root, unprivileged user namespaces allowed): the same jail as a mapped root without
capabilities, but no dedicated uid, so no RLIMIT_NPROC. Setting "auto" takes root, else userns (logged),
and never less: where neither starts, `resolve_mode` raises SandboxUnavailable, one line naming what
failed and how to go on. Mode "none" is no isolation at all, only when set explicitly: rlimits and a
process group (plus a dedicated uid when root), with the host's files (the data root's expected outputs
included) and network visible, and a setsid() daemon outliving the verdict; it is logged as a warning.
It is not a VM: programs share the host kernel, so a kernel exploit escapes it. For hostile code at scale,
run the verifier inside gVisor / a VM as well.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from variational.config import ConfigError
from variational.registry import CODE_SANDBOXES
from variational.verifiers.records import LineReader

MODES = ("root", "userns", "none")  # what a jail is; the settings (CODE_SANDBOXES) add "auto"
UID_BASE = 1_900_000_000  # far above login users and the usual /etc/subuid ranges
_DEV_NODES = ("null", "zero", "full", "random", "urandom")
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/sandbox",
    "TMPDIR": "/sandbox",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    # one BLAS thread: threads count against RLIMIT_NPROC and a 2-core verifier runs many jails at once
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def log() -> logging.Logger:
    return logging.getLogger("variational")


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 1024  # address space of each process
    max_processes: int = 64  # processes + threads of the jail's uid
    max_output_mb: int = 64  # largest file a program may write (its stdout is a file)
    cpu_s: int = 600  # CPU seconds of any one process (the harness sets tighter ones per test)
    disk_mb: int = 256  # the /sandbox tmpfs
    open_files: int = 256


# ================================================================ uids: one per concurrent jail
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


@contextlib.contextmanager
def _dedicated_uid() -> Iterator[int]:
    """A uid no other jail of this machine uses right now (pid-derived block of 256, then a free slot)."""
    base = UID_BASE + (os.getpid() % 4_000_000) * 256
    with _uid_lock:
        uid = next(u for u in itertools.count(base) if u not in _uids_in_use)
        _uids_in_use.add(uid)
    try:
        yield uid
    finally:
        with _uid_lock:
            _uids_in_use.discard(uid)


# ================================================================ the jail's root filesystem
def _python_roots() -> list[str]:
    """Folders the interpreter needs, outside /usr: its installation and the venv (numpy for the prelude)."""
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, Path(sys.executable).parent.parent)}
    roots |= {os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    kept = sorted(r for r in roots if not r.startswith("/usr/") and r not in ("/", "/usr"))
    return [r for r in kept if not any(r != o and r.startswith(o + "/") for o in kept)]


def _setup_script(mode: str, root: str, uid: int, limits: Limits) -> str:
    """Shell run as (mapped) root inside the new namespaces: build the root, then drop into the harness."""
    q = shlex.quote
    r = q(root)
    lines = ["set -e", f"mount -t tmpfs -o size=16m,mode=0755 sandbox-root {r}"]

    def bind(src: str, is_dir: bool = True) -> None:
        dst = q(root + src)
        lines.append(f"mkdir -p {dst}" if is_dir else f"mkdir -p {q(os.path.dirname(root + src))}; : > {dst}")
        lines.append(f"mount --bind {q(src)} {dst}")
        lines.append(f"mount -o remount,bind,ro,nosuid,nodev {dst}")

    bind("/usr")
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr links, or real folders
        if os.path.islink(f"/{top}"):
            lines.append(f"ln -s {q(os.readlink(f'/{top}'))} {q(f'{root}/{top}')}")
        elif os.path.isdir(f"/{top}"):
            bind(f"/{top}")
    for folder in _python_roots():
        bind(folder)
    if os.path.exists("/etc/ld.so.cache"):
        bind("/etc/ld.so.cache", is_dir=False)
    for node in _DEV_NODES:
        lines.append(f"mkdir -p {r}/dev; : > {r}/dev/{node}; mount --bind /dev/{node} {r}/dev/{node}")
    # a fresh /proc shows only the jail's processes; a user namespace may be refused it (masked /proc)
    proc = f"mkdir -p {r}/proc; mount -t proc -o nosuid,nodev,noexec proc {r}/proc"
    lines.append(proc if mode == "root" else f"{proc} || true")
    owner = f"uid={uid},gid={uid}," if mode == "root" else ""
    lines.append(
        f"mkdir -p {r}/sandbox; mount -t tmpfs -o size={limits.disk_mb}m,nr_inodes=4096,mode=0700,"
        f"{owner}nosuid,nodev sandbox {r}/sandbox"
    )
    lines.append(f"mount -o remount,ro {r}")
    rl = (f"--nproc={limits.max_processes} " if mode == "root" else "") + (
        f"--as={limits.memory_mb * 2**20} --fsize={limits.max_output_mb * 2**20} "
        f"--nofile={limits.open_files} --cpu={limits.cpu_s} --core=0"
    )
    ident = f"--reuid={uid} --regid={uid} --clear-groups " if mode == "root" else ""
    drop = f"{ident}--no-new-privs --inh-caps=-all --bounding-set=-all"
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "chroot"
    lines.append(f'exec {chroot} {r} /usr/bin/prlimit {rl} -- /usr/bin/setpriv {drop} -- "$@"')
    return "\n".join(lines)


def _unshare_cmd(mode: str) -> list[str]:
    user = ["--user", "--map-root-user"] if mode == "userns" else []
    ns = ["--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--propagation", "private"]
    unshare = shutil.which("unshare")
    if unshare is None:  # looked up on our PATH, not the jail's: where the caller hid it, there is none
        raise FileNotFoundError("unshare (util-linux) is not on PATH")
    return [unshare, *user, *ns]


# ================================================================ running
class Jail:
    """One harness process in the sandbox. Read `read_line(deadline)`; always `close()` (or use `with`)."""

    def __init__(self, source: str, stdin: bytes, limits: Limits, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"sandbox mode {mode!r}: use one of {MODES}")
        self.mode, self.limits = mode, limits
        self._stack = contextlib.ExitStack()
        # "none" as root: drop to a uid of its own too, when that uid can reach the interpreter
        own_uid = mode == "root" or (mode == "none" and os.geteuid() == 0 and _others_can_run_python())
        self.uid = self._stack.enter_context(_dedicated_uid()) if own_uid else None
        python = [sys.executable, "-I", "-c", source]
        self._stderr = self._stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (the stack closes it)
        if mode == "none":
            self._root = None
            workdir = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="variational-sandbox-"))
            if self.uid is not None:
                os.chown(workdir, self.uid, self.uid)
            cmd, env = python, {**_ENV, "HOME": workdir, "TMPDIR": workdir}
            preexec = functools.partial(_plain_limits, limits, self.uid)
        else:
            self._root = tempfile.mkdtemp(prefix="variational-jail-")  # a mount point, empty outside
            self._stack.callback(_remove_empty_dir, self._root)
            script = _setup_script(mode, self._root, self.uid or 0, limits)
            cmd, env, preexec, workdir = (
                [*_unshare_cmd(mode), "sh", "-c", script, "jail", *python],
                _ENV,
                None,
                "/",
            )
        try:
            self.proc = self._popen(cmd, env, workdir, preexec)
        except BaseException:
            self._stack.close()  # give the uid back
            raise
        self._reader = LineReader(self.proc.stdout.fileno())
        threading.Thread(target=self._feed, args=(stdin,), daemon=True).start()

    def _popen(self, cmd: list[str], env: dict, workdir: str, preexec) -> subprocess.Popen:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=workdir,
            start_new_session=True,
            preexec_fn=preexec,
        )

    def _feed(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the harness may die before reading: close() reports it
            self.proc.stdin.write(data)
            self.proc.stdin.close()

    def read_line(self, deadline: float) -> bytes | None:
        """The harness's next stdout line; None when it closed its stdout, or `deadline` (time.monotonic)
        passed first (then `timed_out`). A line past records.MAX_RECORD_BYTES comes back cut, and ends."""
        return self._reader.next(deadline)

    @property
    def timed_out(self) -> bool:
        return self._reader.timed_out

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode("utf-8", errors="replace")

    def close(self) -> None:
        """Kill the jail (PID 1 of its namespace takes every process in it along) and wait for it."""
        if self.proc.poll() is None and self.mode != "none":
            # kill PID 1 only: `unshare` reaps it, and the kernel lets PID 1 finish dying only once every
            # other process of its namespace is gone, so `unshare` exiting means the whole jail is gone
            for pid in _children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self._stack.close()

    def __enter__(self) -> Jail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_empty_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


@functools.cache
def _others_can_run_python() -> bool:
    """Whether any user may traverse to the interpreter and its libraries (/root is usually 0700)."""
    for root in [*_python_roots(), os.path.realpath(sys.executable)]:
        parents = [Path(root), *Path(root).parents]
        if not all(p.stat().st_mode & 0o001 for p in parents if p.is_dir()):
            return False
    return True


def _plain_limits(limits: Limits, uid: int | None) -> None:
    # preexec_fn (mode "none"): between fork and exec, only system calls (no imports, no locks)
    if uid is not None:  # root without namespaces: at least an unprivileged identity of its own
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    for res, value in (
        (resource.RLIMIT_AS, limits.memory_mb * 2**20),
        (resource.RLIMIT_FSIZE, limits.max_output_mb * 2**20),
        (resource.RLIMIT_CPU, limits.cpu_s),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(res, (value, value))


def start_python(source: str, stdin: bytes, limits: Limits, mode: str | None = None) -> Jail:
    """Run `python -I -c source` in the jail `mode` (a setting of CODE_SANDBOXES; None: auto)."""
    return Jail(source, stdin, limits, resolve_mode(mode or "auto"))


# ================================================================ which mode works here
_PROBE = "import os, sys; print(os.getuid(), os.getpid(), os.path.exists('/etc/passwd'), sys.stdin.read())"


class SandboxUnavailable(ConfigError):
    """The isolation asked for cannot be set up here: code verification stops (one line: what failed, and
    the explicit setting that runs programs without isolation)."""


@functools.cache
def probe(mode: str) -> str | None:
    """None when a jail of `mode` runs here and looks as it should, else why not (one line)."""
    try:
        with Jail(_PROBE, b"ok", Limits(memory_mb=512), mode) as jail:
            lines, deadline = [], time.monotonic() + 30
            while (line := jail.read_line(deadline)) is not None:
                lines.append(line)
            out = b"\n".join(lines).decode(errors="replace").split()
            err = " ".join(jail.stderr().split())
    except OSError as e:
        return str(e)
    if len(out) != 4 or out[3] != "ok" or (mode != "none" and (out[1] != "1" or out[2] != "False")):
        return f"the probe printed {out}; stderr: {err[-300:]}"
    if mode == "root" and out[0] != str(jail.uid):
        return f"the probe ran as uid {out[0]}, not {jail.uid}"
    return None


def resolve_mode(setting: str) -> str:
    """The jail mode for a `verify.sandbox` setting: "auto" is root (when we are root), else userns, and
    never none; "root" / "userns" must start; "none" only when asked for. Raises SandboxUnavailable when
    the isolation cannot be set up, ConfigError for an unknown setting."""
    if "VARIATIONAL_SANDBOX" in os.environ:  # read until issue 17: refuse it rather than ignore it
        raise ConfigError(
            "VARIATIONAL_SANDBOX is no longer read; unset it and set verify.sandbox "
            f"({' | '.join(CODE_SANDBOXES)}) in the config"
        )
    if setting not in CODE_SANDBOXES:
        raise ConfigError(f"verify.sandbox {setting!r} is unknown: use one of {', '.join(CODE_SANDBOXES)}")
    if setting == "none":
        _warn_unsandboxed()
        return "none"
    wanted = [setting] if setting != "auto" else ["root", "userns"] if os.geteuid() == 0 else ["userns"]
    failures = []
    for mode in wanted:
        why = probe(mode)
        if why is None:
            if failures:
                _log_fallback(mode, "; ".join(failures))
            return mode
        failures.append(f"{mode}: {why}")
    raise SandboxUnavailable(
        f"code sandbox unavailable ({'; '.join(failures)}): run as root or allow unprivileged user "
        "namespaces (with unshare from util-linux on PATH), or set verify.sandbox: none to run candidate "
        "programs WITHOUT isolation (they see this machine's files and network)"
    )


@functools.cache
def _log_fallback(mode: str, why: str) -> None:
    log().warning("sandbox: using mode %s (%s)", mode, why)


@functools.cache
def _warn_unsandboxed() -> None:
    log().warning(
        "sandbox: verify.sandbox is none: candidate programs run WITHOUT isolation (rlimits only; they see "
        "this machine's files and network)"
    )
