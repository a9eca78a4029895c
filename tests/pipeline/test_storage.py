"""variational/pipeline/storage.py: a local data root follows no symlink, reads only regular files (a FIFO or a
device never blocks), writes whole files through fresh temp files, and locks only regular files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from variational.pipeline.storage import (
    LocalRoot,
    LockHeld,
    UnsafePath,
    absolute_root,
    check_relative,
    is_url,
    open_root,
)


@pytest.mark.parametrize(
    "bad",
    [
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a//b",
        "./a",
        "",
        ".lock",
        "a/.hidden",
        "a\\b",
        "a b",
        "x\x00y",
        "~",
    ],
)
def test_recorded_paths_must_stay_plain_and_below(bad: str) -> None:
    with pytest.raises(UnsafePath):
        check_relative(bad)


def test_what_the_store_writes_passes() -> None:
    for good in ("part-00000.parquet", "rejects.parquet", "model/config.json", "tiny/q_phi/6f6dfd04120d239e"):
        assert check_relative(good) == good


def test_symlinks_below_the_root_are_refused(tmp_path: Path, victim: Path) -> None:
    root = LocalRoot(tmp_path / "data")
    (tmp_path / "data" / "run").mkdir(parents=True)
    (tmp_path / "data" / "run" / "stage").symlink_to(victim.parent)  # a folder on the way
    (tmp_path / "data" / "run" / "link.parquet").symlink_to(victim)  # the file itself
    for rel in ("run/stage/victim.txt", "run/link.parquet"):
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.read_bytes(rel)
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.file_size(rel)
    with pytest.raises(UnsafePath, match="not a folder"):
        root.makedirs("run/stage/sub")
    assert root.listdir("run") == {"stage": "other", "link.parquet": "other"}
    assert victim.read_text() == "precious"


def test_special_files_are_refused_at_once(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    os.mkfifo(tmp_path / "part-00000.parquet")  # opening a FIFO for reading would block without a writer
    t0 = time.monotonic()
    with pytest.raises(UnsafePath, match="not a regular file"):
        root.sha256("part-00000.parquet")
    with pytest.raises(UnsafePath, match="not a regular file"):
        root.file_size("part-00000.parquet")
    assert time.monotonic() - t0 < 5
    assert root.file_size("missing.parquet") is None


def test_write_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path, victim: Path) -> None:
    root = LocalRoot(tmp_path / "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "run.json").symlink_to(victim)
    root.write("run.json", lambda fh: fh.write(b"{}"))
    assert victim.read_text() == "precious"
    assert root.read_bytes("run.json") == b"{}" and not (tmp_path / "data" / "run.json").is_symlink()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["run.json"]  # no temp file left


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)

    def fail(fh: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        root.write("a/part-00000.parquet", fail)
    assert list((tmp_path / "a").iterdir()) == []


def test_lock_refuses_a_symlink_or_a_special_file_and_touches_no_target(tmp_path: Path, victim: Path) -> None:
    root = LocalRoot(tmp_path / "data")
    (tmp_path / "data" / "s").mkdir(parents=True)
    (tmp_path / "data" / "s" / ".lock").symlink_to(victim)
    with pytest.raises(UnsafePath, match="symbolic link"), root.lock("s/.lock", "me"):
        pass
    assert victim.read_text() == "precious"
    os.mkfifo(tmp_path / "data" / "fifo")
    with pytest.raises(UnsafePath, match="not a regular file"), root.lock("fifo", "me"):
        pass


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    root = LocalRoot(tmp_path)
    with root.lock("s/.lock", "pid 1 on host"):
        # flock belongs to an open file description: a second open, even in this process, is refused
        with pytest.raises(LockHeld) as held, LocalRoot(tmp_path).lock("s/.lock", "pid 2 on host"):
            pass
        assert held.value.holder == "pid 1 on host"
    with root.lock("s/.lock", "again"):  # released when its descriptor closed
        assert (tmp_path / "s" / ".lock").read_text() == "again"


def test_open_root_picks_the_storage_by_the_root_s_form(tmp_path: Path) -> None:
    assert isinstance(open_root(tmp_path), LocalRoot) and open_root(tmp_path).local
    assert open_root(f"file://{tmp_path}").full("a") == tmp_path / "a"  # file:// is a local path
    assert is_url("s3://b/p") and not is_url("data") and not is_url(tmp_path)
    assert absolute_root("s3://b/p/") == "s3://b/p" and absolute_root(f"file://{tmp_path}/") == str(tmp_path)
    assert absolute_root("data") == str(Path("data").resolve())
