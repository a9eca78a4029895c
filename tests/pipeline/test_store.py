"""variational/pipeline/store.py: atomic shards under SIGKILL, manifests, run.json."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from variational.pipeline.runs import record_stage, run_stages
from variational.pipeline.store import StageStore, read_stage, write_parquet_atomic

ROWS = 2_000_000  # ~35 MB of parquet: the temp file exists for about a second on this machine
WRITER = textwrap.dedent(
    """
    import sys
    import polars as pl
    from variational.pipeline.store import StageStore
    n = int(sys.argv[2])
    df = pl.select(i=pl.int_range(n), s=pl.int_range(n).hash(7).cast(pl.String))
    StageStore(sys.argv[1], "run", "rollouts", "fp").write_shard(0, df)
    """
)


def start_writer(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(ROWS)])


def temp_files(store: StageStore) -> list[Path]:
    return list(store.dir.glob(".part-*")) if store.dir.exists() else []


def test_writer_killed_mid_write_leaves_no_shard_and_rerun_completes(tmp_path: Path) -> None:
    store = StageStore(tmp_path, "run", "rollouts", "fp")
    proc = start_writer(tmp_path)
    deadline = time.time() + 120
    while not temp_files(store):
        assert proc.poll() is None, "writer exited before its temp file was seen"
        assert time.time() < deadline, "writer never created its temp file"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # mid-write: the temp file is still growing
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not store.has_shard(0), "a killed writer must never leave a part file"
    assert store.shard_files() == [] and not store.is_complete()
    assert [p.name.split("-")[1] for p in store.dir.iterdir()] == ["00000.parquet.tmp"]  # only the temp file
    with pytest.raises(FileNotFoundError, match="rerun"):
        store.read()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_stage(tmp_path, {"stage": "rollouts", "path": "run/rollouts/fp"})

    rerun = start_writer(tmp_path)
    assert rerun.wait(timeout=120) == 0
    assert [p.name for p in store.shard_files()] == ["part-00000.parquet"]
    manifest = store.finish(round_=1)
    # the stale temp file is not read
    assert manifest["rows"] == ROWS == read_stage(tmp_path, manifest).height


def test_failed_write_cleans_its_temp_file(tmp_path: Path) -> None:
    bad = pl.DataFrame({"o": pl.Series([object()], dtype=pl.Object)})  # Object columns cannot be written
    with pytest.raises(Exception):  # noqa: B017 (polars raises its own error type for this)
        write_parquet_atomic(bad, tmp_path / "part-00000.parquet")
    assert list(tmp_path.iterdir()) == []


def test_manifest_fields_and_run_json(tmp_path: Path) -> None:
    store = StageStore(tmp_path, "run", "verdicts", "abc123")
    store.write_shard(0, pl.DataFrame({"prompt_idx": [0, 1], "correct": [True, False]}))
    store.write_shard(1, pl.DataFrame({"prompt_idx": [2], "correct": [True]}))
    assert not store.is_complete()
    m = store.finish(rows_in=3, round_=1)
    assert store.is_complete() and store.manifest() == json.loads(json.dumps(m, default=str))
    assert {
        "stage",
        "run",
        "fingerprint",
        "path",
        "rows",
        "shards",
        "schema",
        "libraries",
        "wall_time_s",
    } <= set(m)
    assert (m["stage"], m["run"], m["fingerprint"], m["rows"], m["shards"]) == (
        "verdicts",
        "run",
        "abc123",
        3,
        2,
    )
    assert m["schema"] == {"prompt_idx": "Int64", "correct": "Boolean"}
    assert m["rows_in"] == 3 and "polars" in m["libraries"]
    assert m["path"] == "run/verdicts/abc123"  # relative to the data root
    assert [f["rows"] for f in m["files"]] == [2, 1]
    assert read_stage(tmp_path, m)["prompt_idx"].to_list() == [0, 1, 2]

    record_stage(tmp_path, "run", m, computed=True)
    record_stage(tmp_path, "run", {**m, "fingerprint": "def456", "round": 2}, computed=False)
    stages = run_stages(tmp_path, "run")
    assert (
        stages["verdicts"]["1"]["fingerprint"] == "abc123"
        and stages["verdicts"]["2"]["fingerprint"] == "def456"
    )
    assert stages["verdicts"]["1"]["rows"] == 3
    with pytest.raises(FileNotFoundError, match="no run 'other'"):
        run_stages(tmp_path, "other")


# ---------------------------------------------------------------- issue 17: nothing a data root records is trusted
def test_a_run_named_dot_dot_writes_nothing_outside_the_root(tmp_path: Path) -> None:
    """Old code: StageStore(root, '..', ...) and run.json of run '..' landed in the data root's parent."""
    root = tmp_path / "data"
    from variational.pipeline.runs import begin_run
    from variational.pipeline.store import UnsafePath

    for run in ("..", ".", "a/b", ".hidden"):
        with pytest.raises(UnsafePath, match="run name .* is not one plain name"):
            StageStore(root, run, "problems", "fp").write_shard(0, pl.DataFrame({"x": [1]}))
        with pytest.raises(UnsafePath, match="not one plain name"):
            begin_run(root, run, {})
    assert sorted(p.name for p in tmp_path.rglob("*")) == []
    with pytest.raises(UnsafePath, match="fingerprint name"):
        StageStore(root, "r", "problems", "../../x")
