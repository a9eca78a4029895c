"""variational/pipeline/runs.py: verify-store over a run's recorded stages never follows what a manifest says
(paths outside the stage, devices), and a damaged manifest is named while the other stages are still checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from variational.pipeline.runs import record_stage
from variational.pipeline.store import StageStore


def finished_run(root: Path) -> dict:
    """Run `r` with two finished stages recorded in run.json; returns the `verdicts` manifest."""
    for stage, df in (
        ("problems", pl.DataFrame({"prompt_idx": [0, 1]})),
        ("verdicts", pl.DataFrame({"c": [1]})),
    ):
        st = StageStore(root, "r", stage, f"fp-{stage}")
        st.write_shard(0, df)
        manifest = st.finish(round_=1)
        record_stage(root, "r", manifest, computed=True)
    return manifest


def add_entry(root: Path, manifest: dict, entry: str, size: int) -> Path:
    path = root / manifest["path"] / "manifest.json"
    forged = json.loads(path.read_text())
    forged["files"].append({"file": entry, "bytes": size, "sha256": "0" * 64})
    path.write_text(json.dumps(forged))
    return path


def verify_store(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "variational.cli", "verify-store", "r", "--data-root", str(root), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_verify_store_never_moves_or_reads_a_file_outside_the_stage(tmp_path: Path, how: str) -> None:
    """Old code: the entry was 'set aside', i.e. the file outside the data root was moved into .quarantine."""
    root, victim = tmp_path / "data", tmp_path / "outside" / "victim.parquet"
    victim.parent.mkdir()
    victim.write_bytes(b"not yours")
    manifest = finished_run(root)
    entry = "../../../../outside/victim.parquet" if how == "relative" else str(victim)
    add_entry(root, manifest, entry, size=1)  # the wrong size: the old check set it aside
    for args in ((), ("--dry-run",)):
        proc = verify_store(root, *args)
        assert proc.returncode == 1, proc.stderr
        line = next(x for x in proc.stdout.splitlines() if x.startswith("verdicts"))
        assert "DAMAGED" in line and "verdicts/fp-verdicts/manifest.json" in line and repr(entry) in line
        assert "nothing was read or moved" in line
        assert next(x for x in proc.stdout.splitlines() if x.startswith("problems")).endswith("ok")
    assert victim.read_bytes() == b"not yours"
    assert not list(root.rglob(".quarantine")) and (root / manifest["path"] / "manifest.json").exists()


def test_verify_store_does_not_hash_a_device(tmp_path: Path) -> None:
    """Old code: a manifest entry `/dev/zero` of 0 bytes passed the size check and was hashed forever."""
    root = tmp_path / "data"
    add_entry(root, finished_run(root), "/dev/zero", size=0)
    proc = verify_store(root, "--dry-run", timeout=60)
    assert proc.returncode == 1 and "'/dev/zero'" in proc.stdout and "absolute path" in proc.stdout


def test_a_damaged_manifest_is_reported_and_the_other_stages_still_checked(tmp_path: Path) -> None:
    """Old code: JSONDecodeError, a traceback, no stage checked."""
    root = tmp_path / "data"
    manifest = finished_run(root)
    path = root / manifest["path"] / "manifest.json"
    path.write_text(path.read_text()[:40])
    proc = verify_store(root, "--dry-run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "problems           round 1: ok" in proc.stdout
    assert "verdicts           round 1: DAMAGED: manifest.json: damaged (not valid JSON" in proc.stdout
    assert verify_store(root).returncode == 1  # sets the damaged manifest aside: the rerun re-finishes
    assert not path.exists() and [p.name[:13] for p in (path.parent / ".quarantine").iterdir()] == [
        "manifest.json"
    ]
