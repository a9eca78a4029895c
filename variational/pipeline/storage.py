"""Where a data root's bytes live: the one place the store (variational/pipeline/store.py) touches them.

Every path below a data root is given relative to it (`run/stage/fp/part-00000.parquet`) and checked
before anything is opened, moved or written (issue 17 item 4: a data root may come from elsewhere, and
nothing it records is taken on trust):
- a recorded path is relative, without `..`, empty or hidden components, in a plain alphabet
  (`check_relative`); anything else is `UnsafePath`;
- walking down from the root, no component is a symbolic link and every folder is a folder (`lstat`);
- a file that is read is a regular file, opened with O_NOFOLLOW | O_NONBLOCK (a FIFO or device never
  blocks, a symlink swapped in after the check is refused by the kernel);
- writes go to a fresh temp file (O_EXCL, random name) in the target folder, renamed over the target;
- a lock file is opened with O_NOFOLLOW and must be a regular file, and only to compute: reading a
  finished root never opens anything for writing, so it works on a read-only mount (issue 17 item 7).
The root itself is the user's choice and may be a symlink.

The seam: `open_root(data_root)` gives a `LocalRoot` for a path (or file://) and an
objectstore.ObjectRoot for an object-store URL (s3://bucket/prefix); both offer the same operations, so
the store never asks which one it has, except where bytes must be local (model folders: `local`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

# a component of a recorded path: what the store itself writes (part-00000.parquet, model/config.json,
# run/stage/fingerprint); no leading dot (., .., .lock, .quarantine are never recorded), no separators
SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]{0,254}$")
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def home() -> Path:
    """$VARIATIONAL_HOME (default ~/.cache/variational): this machine's caches (models, reports, uploads).
    The rule of variational.engines.models.home, which stays where it is (base_model's fingerprint hashes
    that module's code: moving it would recompute every data root)."""
    return Path(os.environ.get("VARIATIONAL_HOME", Path.home() / ".cache" / "variational"))


def is_url(data_root: str | Path) -> bool:
    return isinstance(data_root, str) and URL.match(data_root) is not None


class StoreError(RuntimeError):
    """Something in a data root the store refuses or cannot use; the message is one line saying what to do."""


class UnsafePath(StoreError):
    """A recorded path or a file that would lead outside its folder, through a symlink, or to a special file."""


class CorruptRecord(StoreError):
    """A manifest or run.json that is not what the store writes (truncated, not JSON, wrong shape)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class ReadOnlyRoot(StoreError):
    """A write (a stage to compute) on a data root that cannot be written."""


class LockHeld(RuntimeError):
    """The lock is held by another process; `holder` is what that process wrote into it."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def below(rel: str) -> str:
    """`rel` if it stays below its folder (relative; no `..`, `.` or empty component), else UnsafePath.
    The store's own names (`.lock`, `.quarantine/...`) pass; recorded paths must pass `check_relative`."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise UnsafePath(f"{rel!r} is not a path")
    if rel.startswith("/"):
        raise UnsafePath(f"{rel!r} is an absolute path")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"{rel!r} has a {part or 'empty'!r} component")
    return rel


def check_relative(rel: str) -> str:
    """`rel` if it is a safe recorded path (see the module docstring), else UnsafePath saying why."""
    for part in below(rel).split("/"):
        if not SAFE_COMPONENT.match(part):
            raise UnsafePath(f"{rel!r} has a component with characters the store never writes ({part!r})")
    return rel


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


class LocalRoot:
    """A data root on a local or shared POSIX filesystem (NFS, Lustre)."""

    local = True

    def __init__(self, path: str | Path):
        first = Path(path).parts[0] if Path(path).parts else ""
        if first.endswith(":") and len(first) > 2:  # `s3:/b` is what Path makes of `s3://b`: never a folder
            raise StoreError(f"data root {str(path)!r} looks like a URL, not a folder; write it scheme://...")
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def full(self, rel: str) -> Path:
        """The real path of `rel` (checked syntactically; use `lstat` to check what is there)."""
        return self.path / below(rel) if rel else self.path

    def display(self, rel: str) -> str:
        return str(self.path / rel) if rel else str(self.path)

    # ------------------------------------------------------------ looking
    def lstat(self, rel: str) -> os.stat_result | None:
        """What is at `rel` (None: nothing); UnsafePath when a component below the root is a symlink."""
        cur, parts = self.path, below(rel).split("/")
        st = None
        for i, part in enumerate(parts):
            cur = cur / part
            try:
                st = os.lstat(cur)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{cur} is a symbolic link (the store follows none)")
            if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                return None
        return st

    def file_size(self, rel: str) -> int | None:
        """The size of the regular file at `rel`; None when absent; UnsafePath for anything else there."""
        st = self.lstat(rel)
        if st is None:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{self.path / rel} is not a regular file")
        return st.st_size

    def exists(self, rel: str) -> bool:
        return self.lstat(rel) is not None

    def is_dir(self, rel: str) -> bool:
        if not rel:
            return self.path.is_dir()
        st = self.lstat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def listdir(self, rel: str) -> dict[str, str]:
        """name -> 'file' | 'dir' | 'other' of what `rel` holds (symlinks are 'other'); {} when absent."""
        if rel and not self.is_dir(rel):
            return {}
        try:
            entries = list(os.scandir(self.full(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        out = {}
        for e in entries:
            kind = "other"
            if not e.is_symlink():
                kind = "file" if e.is_file(follow_symlinks=False) else "dir" if e.is_dir() else "other"
            out[e.name] = kind
        return out

    # ------------------------------------------------------------ reading
    def open_read(self, rel: str) -> BinaryIO:
        """`rel` opened for reading: a regular file reached through no symlink, never a FIFO or device."""
        self.lstat(rel)  # the folders on the way
        path = self.full(rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UnsafePath(f"{path} is a symbolic link (the store follows none)") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePath(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as fh:
            return fh.read()

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.open_read(rel) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def reader(self, rel: str) -> str:
        """What polars reads: the path, checked as `open_read` checks it."""
        self.open_read(rel).close()
        return str(self.full(rel))

    def get_file(self, rel: str, local: Path) -> None:
        with self.open_read(rel) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)

    def register_duckdb(self, con: object) -> None:
        """DuckDB reads local files itself."""

    # ------------------------------------------------------------ writing
    def writable(self) -> bool:
        """Whether this process may write here (False on a read-only mount, EROFS, or without permission)."""
        return os.access(self.path, os.W_OK) if self.path.exists() else True

    def makedirs(self, rel: str) -> Path:
        """Create the folders of `rel` below the root (the root too), refusing symlinks on the way."""
        self.path.mkdir(parents=True, exist_ok=True)
        cur = self.path
        for part in below(rel).split("/") if rel else []:
            cur = cur / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(cur)
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{cur} is not a folder (a symbolic link or a file)")
        return cur

    def write(self, rel: str, fill: Callable[[BinaryIO], None]) -> None:
        """Write `rel` whole or not at all: `fill` writes a fresh temp file beside it, renamed over it."""
        folder, name = rel.rpartition("/")[::2]
        where = self.makedirs(folder)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=where)  # O_EXCL: never someone's file
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
            os.replace(tmp, where / name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_file(self, local: Path, rel: str) -> None:
        with open(local, "rb") as src:
            self.write(rel, lambda dst: shutil.copyfileobj(src, dst))

    def move(self, rel: str, to_rel: str) -> None:
        self.lstat(rel)
        self.makedirs(to_rel.rpartition("/")[0])
        os.replace(self.full(rel), self.full(to_rel))

    def remove(self, rel: str) -> None:
        if self.lstat(rel) is not None:
            os.unlink(self.full(rel))

    # ------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(self, rel: str, holder: str) -> Iterator[Held]:
        """Exclusive flock on the regular file `rel`, released when the process ends (even by SIGKILL);
        LockHeld when another process has it. (flock: reliable on local disks; on NFS it depends on the
        mount.) The file is opened only here, to compute: never to reuse."""
        try:
            self.makedirs(rel.rpartition("/")[0])
            fd = os.open(
                self.full(rel), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
            )
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UnsafePath(f"{self.full(rel)} is a symbolic link (the store follows none)") from None
            if err.errno in READ_ONLY_ERRNOS:
                raise ReadOnlyRoot(f"{self.path} cannot be written ({os.strerror(err.errno)})") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePath(f"{self.full(rel)} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockHeld(os.pread(fd, 4096, 0).decode(errors="replace").strip()) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
            yield Held()
        finally:
            os.close(fd)  # closing the descriptor releases the lock


class Root(Protocol):
    """What the store asks of a data root (LocalRoot here, objectstore.ObjectRoot): paths are relative."""

    local: bool

    def full(self, rel: str) -> Path | str: ...
    def display(self, rel: str) -> str: ...
    def exists(self, rel: str) -> bool: ...
    def file_size(self, rel: str) -> int | None: ...
    def is_dir(self, rel: str) -> bool: ...
    def listdir(self, rel: str) -> dict[str, str]: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def sha256(self, rel: str) -> str: ...
    def reader(self, rel: str) -> Any: ...
    def get_file(self, rel: str, local: Path) -> None: ...
    def writable(self) -> bool: ...
    def write(self, rel: str, fill: Callable[[BinaryIO], None]) -> None: ...
    def put_file(self, local: Path, rel: str) -> None: ...
    def move(self, rel: str, to_rel: str) -> None: ...
    def remove(self, rel: str) -> None: ...
    def lock(self, rel: str, holder: str) -> contextlib.AbstractContextManager[Any]: ...
    def register_duckdb(self, con: Any) -> None: ...


class Held:
    """A lock held: `lost` says why it no longer is (a flock is never lost; a lease can be)."""

    lost: str | None = None


def open_root(data_root: str | Path) -> Root:
    """The storage of a data root: LocalRoot for a path or file:// URL, objectstore.ObjectRoot for another
    URL (imported only then: a local run never loads fsspec or s3fs)."""
    if not is_url(data_root):
        return LocalRoot(data_root)
    if str(data_root).startswith("file://"):
        return LocalRoot(str(data_root)[len("file://") :])
    from variational.pipeline.objectstore import open_object_root

    return open_object_root(str(data_root))


def absolute_root(data_root: str | Path) -> str:
    """The data root as workers and run.json take it: an absolute path, or the URL without a trailing /."""
    if is_url(data_root) and not str(data_root).startswith("file://"):
        return str(data_root).rstrip("/")
    return str(Path(str(data_root).removeprefix("file://")).resolve())
