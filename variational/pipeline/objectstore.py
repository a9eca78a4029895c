"""Data roots on object storage (issue 20): `s3://bucket/prefix` (and, read-only, other fsspec URLs).

In: a URL, credentials and endpoint from the standard AWS variables or profile (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE, a web-identity token on EKS; AWS_ENDPOINT_URL for
S3-compatible stores such as MinIO or Ceph). Out: `ObjectRoot`, the same operations as storage.LocalRoot
over fsspec, so the store (variational/pipeline/store.py) works as on disk:
- a write is one PUT (a multipart upload completes atomically): an object is visible only once whole, and
  the store writes the manifest last, so a stage is never seen half-written;
- keys are the checked relative paths below the prefix: nothing can name a key outside it;
- locks are leases (`Lease`): an object created with If-None-Match: * holding holder, host, pid, time and
  expiry, renewed while held with If-Match on its ETag; a second run stops as on disk; a holder that died
  on this host is taken over at once, one elsewhere when its lease expires (VARIATIONAL_LEASE_S, 120 s).
s3fs is imported only here and only for an s3:// root (the `s3` extra); without it, or without
credentials, or with an unknown scheme, `open_object_root` stops with one line. Other fsspec schemes
(gs://, az://, ... with their packages installed) are read: runs, sql, report, verify-store --dry-run and
a fully cached rerun; computing needs conditional writes, which only s3 has here (tested with moto).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from variational.pipeline.storage import LockHeld, ReadOnlyRoot, StoreError, UnsafePath, below, home

LEASE_S = float(os.environ.get("VARIATIONAL_LEASE_S", "120"))
S3_EXTRA = "pip install 'variational[s3]' (s3fs)"


class ObjectRoot:
    """A data root under `scheme://bucket/prefix`, read and written through an fsspec filesystem."""

    local = False

    def __init__(self, url: str, fs: Any):
        self.scheme = url.partition("://")[0]
        self.fs = fs
        self.base = fs._strip_protocol(url).rstrip("/")  # the filesystem's own key of the root
        self.url = self.full("")

    def __str__(self) -> str:
        return self.url

    def key(self, rel: str) -> str:
        return f"{self.base}/{below(rel)}" if rel else self.base

    def full(self, rel: str) -> str:
        """The URL of `rel` as the filesystem writes it (what DuckDB and the allowed prefixes compare)."""
        return self.fs.unstrip_protocol(self.key(rel))

    def display(self, rel: str) -> str:
        return self.full(rel)

    # ------------------------------------------------------------ looking
    def _info(self, rel: str) -> dict | None:
        try:
            return self.fs.info(self.key(rel), refresh=True)
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return self._info(rel) is not None

    def file_size(self, rel: str) -> int | None:
        info = self._info(rel)
        if info is None:
            return None
        if info.get("type") != "file":
            raise UnsafePath(f"{self.full(rel)} is not a file")
        return int(info["size"])

    def is_dir(self, rel: str) -> bool:
        info = self._info(rel)
        return info is not None and info.get("type") == "directory"

    def listdir(self, rel: str) -> dict[str, str]:
        """name -> 'file' | 'dir' under `rel` (a prefix), fresh from the store (no listing cache)."""
        try:
            entries = self.fs.ls(self.key(rel), detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e["name"].rstrip("/") != self.key(rel):
                out[name] = "file" if e.get("type") == "file" else "dir"
        return out

    # ------------------------------------------------------------ reading
    def open_read(self, rel: str) -> BinaryIO:
        if self.file_size(rel) is None:
            raise FileNotFoundError(self.full(rel))
        return self.fs.open(self.key(rel), "rb")

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.key(rel))

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.open_read(rel) as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    def reader(self, rel: str) -> io.BytesIO:
        """The whole object in memory: what polars reads (shards are tens of MB at most)."""
        return io.BytesIO(self.read_bytes(rel))

    def get_file(self, rel: str, local: Path) -> None:
        self.fs.get_file(self.key(rel), str(local))

    # ------------------------------------------------------------ writing
    def writable(self) -> bool:
        """s3 only: leases need conditional writes (If-None-Match / If-Match), untested on other stores."""
        return self.scheme in ("s3", "s3a")

    def _check_writable(self) -> None:
        if not self.writable():
            raise ReadOnlyRoot(
                f"{self.url}: {self.scheme}:// data roots are read here (runs, sql, report, a cached rerun); "
                "computing needs s3:// or a POSIX path"
            )

    def makedirs(self, rel: str) -> None:
        """Object stores have no folders: a key's prefix exists once an object is under it."""

    def write(self, rel: str, fill: Callable[[BinaryIO], None]) -> None:
        """`fill` writes a local temp file, uploaded in one PUT: the object appears whole or not at all."""
        self._check_writable()
        with tempfile.NamedTemporaryFile(prefix=".upload-", dir=scratch()) as tmp:
            fill(tmp)
            tmp.flush()
            self.fs.put_file(tmp.name, self.key(rel))

    def put_file(self, local: Path, rel: str) -> None:
        self._check_writable()
        self.fs.put_file(str(local), self.key(rel))

    def move(self, rel: str, to_rel: str) -> None:
        self._check_writable()
        self.fs.mv(self.key(rel), self.key(to_rel))  # copy, then delete: the copy is whole first

    def remove(self, rel: str) -> None:
        self._check_writable()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(rel))

    # ------------------------------------------------------------ locks and readers
    @contextlib.contextmanager
    def lock(self, rel: str, holder: str) -> Iterator[Lease]:
        self._check_writable()
        lease = Lease(self, rel, holder)
        lease.acquire()
        try:
            yield lease
        finally:
            lease.release()

    def register_duckdb(self, con: Any) -> None:
        """DuckDB reads our keys through this fsspec filesystem: no httpfs extension is loaded or fetched."""
        con.register_filesystem(self.fs)


def scratch() -> Path:
    path = home() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ================================================================ leases
def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (None: no such process): tells a live holder from
    a new process that reuses a dead one's pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Lease:
    """A lock on object storage: the lease object at `rel`. Created with If-None-Match: * (exactly one
    creator wins), renewed every LEASE_S/3 with If-Match on its ETag (a taken-over lease fails the renewal:
    `lost` says so and the store refuses to finish the stage), deleted on release. A lease is stale when it
    expired, or when its holder ran on this host and that process is gone; a stale lease is replaced with
    If-Match on the ETag that was read, so two runs can never both take it over."""

    def __init__(self, root: ObjectRoot, rel: str, holder: str, ttl_s: float | None = None):
        self.root, self.rel, self.holder = root, rel, holder
        self.ttl_s = ttl_s or LEASE_S
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "holder": self.holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()),
                "renewed_at": now,
                "expires_at": now + self.ttl_s,
            }
        ).encode()

    def _put(self, **condition: str) -> None:
        out = self.root.fs.pipe_file(self.root.key(self.rel), self._body(), **condition)
        self.etag = (out or {}).get("ETag") or self.root.fs.info(self.root.key(self.rel), refresh=True)[
            "ETag"
        ]

    def _read(self) -> tuple[dict, str] | None:
        """The current lease and its ETag, read together (s3fs reads with If-Match on the ETag it saw)."""
        try:
            with self.root.fs.open(self.root.key(self.rel), "rb", cache_type="none") as fh:
                etag, raw = fh.details["ETag"], fh.read()
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(raw)
        except ValueError:
            lease = {}
        return (lease if isinstance(lease, dict) else {}), etag

    def acquire(self) -> None:
        for _ in range(3):  # a lease deleted between our create and our read: create again
            try:
                self._put(mode="create")
                break
            except FileExistsError:
                pass
            current = self._read()
            if current is None:
                continue
            lease, etag = current
            if not stale(lease):
                raise LockHeld(describe(lease))
            try:
                self._put(IfMatch=etag)  # replace exactly the stale lease we read
                break
            except (OSError, FileNotFoundError):
                latest = self._read()
                raise LockHeld(describe(latest[0] if latest else {})) from None
        else:
            raise LockHeld("another process (its lease keeps changing)")
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.rel}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._put(IfMatch=self.etag or "")
            except Exception as err:  # taken over (412), or the store unreachable past the expiry
                self.lost = f"lease {self.root.full(self.rel)} lost ({type(err).__name__}: {err})"
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost or self.etag is None:
            return
        bucket, key, _ = self.root.fs.split_path(self.root.key(self.rel))
        with contextlib.suppress(Exception):  # only our own lease: another's ETag differs
            self.root.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)


def stale(lease: dict, now: float | None = None) -> bool:
    """Whether a lease may be taken over: expired, or its holder ran on this host and is gone."""
    now = time.time() if now is None else now
    try:
        if now > float(lease["expires_at"]):
            return True
        if lease.get("host") == socket.gethostname():
            return _process_start(int(lease["pid"])) != lease.get("pid_start")
    except (KeyError, TypeError, ValueError):
        return True  # not a lease we wrote (damaged): nobody holds it
    return False


def describe(lease: dict) -> str:
    until = lease.get("expires_at")
    when = time.strftime("%H:%M:%S", time.localtime(float(until))) if isinstance(until, int | float) else "?"
    return f"{lease.get('holder') or 'another process'} (lease until {when})"


# ================================================================ opening
_ROOTS: dict[str, ObjectRoot] = {}


def open_object_root(url: str) -> ObjectRoot:
    """The root at `url`, checked once per process: a known scheme, its package, credentials, the bucket."""
    url = url.rstrip("/")
    if url not in _ROOTS:
        _ROOTS[url] = _open(url)
    return _ROOTS[url]


def _open(url: str) -> ObjectRoot:
    import fsspec

    scheme = url.partition("://")[0]
    if scheme in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401 (registers nothing; fsspec imports it again by name)
        except ImportError:
            raise StoreError(f"data root {url}: s3:// needs the `s3` extra: {S3_EXTRA}") from None
        _check_aws_credentials(url)
    try:
        fs = fsspec.filesystem(scheme, use_listings_cache=False)
    except ValueError:
        raise StoreError(
            f"data root {url}: unknown URL scheme {scheme!r}; use a local path or s3://bucket/prefix"
        ) from None
    except ImportError as err:
        raise StoreError(
            f"data root {url}: {scheme}:// needs a package that is not installed ({err})"
        ) from None
    root = ObjectRoot(url, fs)
    bucket = root.base.lstrip("/").split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except Exception as err:  # no such bucket, wrong endpoint, access denied: say which, in one line
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint")
        raise StoreError(
            f"data root {url}: bucket {bucket!r} cannot be listed at {endpoint} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120]}); check the bucket, AWS_ENDPOINT_URL and the credentials"
        ) from None
    return root


def _check_aws_credentials(url: str) -> None:
    import botocore.session

    if botocore.session.Session().get_credentials() is None:
        raise StoreError(
            f"data root {url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible store"
        )
