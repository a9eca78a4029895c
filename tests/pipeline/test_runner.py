"""The stage runner and store on toy stages (no engine, no Prefect server): reuse recomputes nothing, a
deleted or damaged stage is recomputed, a resumed sharded stage redoes only its missing shards, a second
process cannot compute a stage another one holds, a data root can be moved, and a stage can read only
the config fields it declares."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from variational.config import parse_config
from variational.pipeline import runner, runs, store
from variational.pipeline.runner import run_stage
from variational.pipeline.stage import Engine, Inputs, Output, Stage

CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


def _numbers(i: Inputs) -> Output:
    _count("numbers")
    n = i.conf.K
    return Output(pl.DataFrame({"x": list(range(n))}), side={"rejects": pl.DataFrame({"row_index": [7]})})


def _plan(i: Inputs) -> pl.DataFrame:
    return i.table("numbers")


class Doubler:
    def __init__(self, i: Inputs):
        _count("engine")
        self.factor = 2

    def close(self) -> None:
        _count("engine_closed")


def _shard(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
    _count("shard")
    return part.with_columns(y=pl.col("x") * engine.get().factor)


NUMBERS = Stage(name="problems", fields=("K",), core=_numbers, per_round=False)
DOUBLED = Stage(
    name="rollouts",
    inputs=("numbers",),
    fields=("M",),
    uses=("verify.shard_size",),
    plan=_plan,
    shard=_shard,
    shard_size="verify.shard_size",
    engine=Doubler,
    summary=lambda i, t: f"{t.height} rows",
)


def _cfg(root: Path, **over) -> dict:
    base = {"name": "toy", "data_root": str(root), "base_model": "embedded:smollm2-135m", "K": 10, "M": 2}
    base["verify"] = {"shard_size": 3}
    return parse_config(base | over).model_dump(mode="json")


def _pipeline(cfg: dict) -> tuple[dict, dict]:
    numbers = run_stage(NUMBERS, cfg, {})
    return numbers, run_stage(DOUBLED, cfg, {"numbers": numbers})


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.parquet")} | {
        str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("manifest.json")
    }


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


def test_compute_then_reuse_recomputes_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    runs.begin_run(tmp_path, "toy", cfg)
    numbers, doubled = _pipeline(cfg)
    assert CALLS == {"numbers": 1, "shard": 4, "engine": 1, "engine_closed": 1}  # 10 rows / 3 per shard
    assert doubled["rows"] == 10 and doubled["shards"] == 4 and doubled["summary"] == "10 rows"
    assert not Path(doubled["path"]).is_absolute()  # relative to the data root (relocatable)
    before = _mtimes(tmp_path)
    CALLS.clear()
    _pipeline(cfg)
    assert CALLS == {}, "a second run must compute nothing and open no engine"
    assert _mtimes(tmp_path) == before
    stages = runs.run_stages(tmp_path, "toy")
    assert stages["rollouts"]["1"]["computed"] is False
    table = store.read_stage(tmp_path, doubled)
    assert table["y"].to_list() == [2 * x for x in range(10)]


def test_deleted_stage_is_recomputed(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _, doubled = _pipeline(cfg)
    shutil.rmtree(tmp_path / doubled["path"])
    CALLS.clear()
    _pipeline(cfg)
    assert CALLS["shard"] == 4
    (tmp_path / doubled["path"] / "manifest.json").unlink()
    CALLS.clear()
    _pipeline(cfg)
    assert CALLS.get("shard", 0) == 0, (
        "shards without a manifest are complete files: only the manifest is redone"
    )


def test_truncated_shard_is_set_aside_and_only_it_recomputed(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _, doubled = _pipeline(cfg)
    folder = tmp_path / doubled["path"]
    bad = folder / "part-00002.parquet"
    bad.write_bytes(bad.read_bytes()[:20])
    good = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet") if p != bad}
    CALLS.clear()
    _, again = _pipeline(cfg)
    assert CALLS["shard"] == 1
    assert list((folder / store.QUARANTINE).iterdir())[0].name.startswith("part-00002.parquet.")
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet") if p != bad} == good
    assert store.read_stage(tmp_path, again)["y"].to_list() == [2 * x for x in range(10)]


def test_foreign_shard_of_same_size_is_caught_by_the_hash(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _, doubled = _pipeline(cfg)
    folder = tmp_path / doubled["path"]
    data = bytearray((folder / "part-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    (folder / "part-00001.parquet").write_bytes(bytes(data))
    st = store.StageStore(tmp_path, "toy", "rollouts", doubled["fingerprint"])
    assert st.is_complete()  # the cheap check cannot see it ...
    assert st.problems(deep=True) == ["part-00001.parquet: content differs from the manifest's sha256"]
    # ... the check before training / selection does, and sets it aside
    with pytest.raises(store.DamagedStage, match="part-00001.parquet"):
        runner.check_inputs(parse_config(cfg), {"doubled": doubled}, Stage(name="t", inputs=("doubled",)))
    assert not st.is_complete()
    CALLS.clear()
    _pipeline(cfg)
    assert CALLS["shard"] == 1


def test_unlisted_shard_is_never_read(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _, doubled = _pipeline(cfg)
    pl.DataFrame({"x": [99], "y": [99]}).write_parquet(tmp_path / doubled["path"] / "part-00009.parquet")
    assert 99 not in store.read_stage(tmp_path, doubled)["x"].to_list()


def test_resume_redoes_only_missing_shards(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _, doubled = _pipeline(cfg)
    folder = tmp_path / doubled["path"]
    (folder / "manifest.json").unlink()
    (folder / "part-00003.parquet").unlink()  # as if killed before the last shard
    CALLS.clear()
    _pipeline(cfg)
    assert CALLS == {"shard": 1, "engine": 1, "engine_closed": 1}


def test_a_missing_shard_after_the_workers_is_an_error_not_a_short_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers that return without writing a shard (another folder, a lost node) must not let the flow
    finish the stage over the shards that are there."""
    cfg = _cfg(tmp_path)
    numbers = run_stage(NUMBERS, cfg, {})
    real = runner.compute_shards
    monkeypatch.setattr(runner, "compute_shards", lambda *a, **k: real(*a[:6], [i for i in a[6] if i != 2]))
    with pytest.raises(RuntimeError, match=r"rollouts: shards \[2\] of 4 are missing"):
        run_stage(DOUBLED, cfg, {"numbers": numbers})
    assert not list(tmp_path.rglob("rollouts/*/manifest.json"))
    monkeypatch.undo()
    doubled = run_stage(DOUBLED, cfg, {"numbers": numbers})  # the rerun writes only shard 2
    assert CALLS["shard"] == 3 + 1 and doubled["rows"] == 10


def test_changed_field_recomputes_only_what_reads_it(tmp_path: Path) -> None:
    _pipeline(_cfg(tmp_path))
    CALLS.clear()
    _pipeline(_cfg(tmp_path, M=3))  # only `rollouts` declares M
    assert "numbers" not in CALLS and CALLS["shard"] == 4
    CALLS.clear()
    _pipeline(_cfg(tmp_path, rollout_sampling={"max_tokens": 7}))  # read by neither
    assert CALLS == {}


def test_undeclared_config_field_is_refused(tmp_path: Path) -> None:
    sneaky = Stage(name="weights", fields=("K",), core=lambda i: pl.DataFrame({"m": [i.conf.M]}))
    with pytest.raises(AttributeError, match="'M' is not declared"):
        run_stage(sneaky, _cfg(tmp_path), {})
    nested = Stage(
        name="train",
        fields=("weights.estimator",),
        core=lambda i: pl.DataFrame({"m": [i.conf.weights.max_think_tokens]}),
    )
    with pytest.raises(AttributeError, match="weights.max_think_tokens"):
        run_stage(nested, _cfg(tmp_path), {})


def test_moved_data_root_reuses_everything(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    cfg = _cfg(old)
    runs.begin_run(old, "toy", cfg)
    _pipeline(cfg)
    shutil.copytree(old, new)
    os.chmod(old, 0)  # the original is unreadable: nothing may be read from there
    try:
        CALLS.clear()
        _, doubled = _pipeline(_cfg(new))
        assert CALLS == {}
        assert store.read_stage(new, doubled)["y"].sum() == 90
        assert all(not Path(e["1"]["path"]).is_absolute() for e in runs.run_stages(new, "toy").values())
    finally:
        os.chmod(old, 0o755)


def test_second_process_cannot_compute_a_held_stage(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    fp = runner.stage_fingerprint(NUMBERS, parse_config(cfg), {}, 1)
    holder = textwrap.dedent(
        f"""
        import sys, time
        from variational.pipeline.store import StageStore
        with StageStore({str(tmp_path)!r}, "toy", "problems", {fp!r}).lock():
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(store.StageLocked, match=rf"pid {proc.pid} on .*wait for that run"):
            run_stage(NUMBERS, cfg, {})
    finally:
        proc.kill()
        proc.wait()
    run_stage(NUMBERS, cfg, {})  # a killed holder leaves no stale lock
    assert CALLS["numbers"] == 1


def test_manifest_lists_every_file_with_size_and_hash(tmp_path: Path) -> None:
    numbers, _ = _pipeline(_cfg(tmp_path))
    manifest = json.loads((tmp_path / numbers["path"] / "manifest.json").read_text())
    names = [f["file"] for f in manifest["files"]]
    assert names == ["part-00000.parquet", "rejects.parquet", "shard_stats.parquet"]
    for f in manifest["files"]:
        path = tmp_path / numbers["path"] / f["file"]
        assert f["bytes"] == path.stat().st_size and f["sha256"] == store.file_sha256(path)


def test_verify_store_names_and_sets_aside_a_damaged_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from variational.cli import main

    cfg = _cfg(tmp_path)
    runs.begin_run(tmp_path, "toy", cfg)
    _, doubled = _pipeline(cfg)
    assert main(["verify-store", "toy", "--data-root", str(tmp_path)]) == 0
    assert "rollouts           round 1: ok" in capsys.readouterr().out
    shard = tmp_path / doubled["path"] / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    assert main(["verify-store", "toy", "--data-root", str(tmp_path), "--dry-run"]) == 1
    assert shard.exists()  # a dry run moves nothing
    assert main(["verify-store", "toy", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED: part-00001.parquet: content differs" in out and "were set aside" in out
    assert not shard.exists() and not (tmp_path / doubled["path"] / "manifest.json").exists()
    CALLS.clear()
    _pipeline(cfg)
    assert CALLS["shard"] == 1  # only the damaged shard is recomputed


# ---------------------------------------------------------------- issue 17: confinement, damage, read-only roots
def test_reuse_check_never_moves_a_file_outside_the_stage(tmp_path: Path, victim: Path) -> None:
    """Old code: the manifest entry `../../../../outside/victim.txt` (wrong size) was set aside, i.e. the
    file outside the data root was moved into the stage's .quarantine/."""
    root = tmp_path / "data"
    cfg = _cfg(root)
    _, doubled = _pipeline(cfg)
    path = root / doubled["path"] / "manifest.json"
    forged = json.loads(path.read_text())
    forged["files"].append({"file": "../../../../outside/victim.txt", "bytes": 1, "sha256": "0" * 64})
    path.write_text(json.dumps(forged))
    with pytest.raises(
        store.UnsafePath, match=r"manifest.json: entry '\.\./\.\./\.\./\.\./outside/victim.txt'"
    ):
        _pipeline(cfg)
    assert victim.read_text() == "precious" and not list(root.rglob(".quarantine"))


def test_a_planted_lock_symlink_is_never_written_through(tmp_path: Path, victim: Path) -> None:
    """Old code: reusing the stage opened `.lock` (a symlink to the victim) for writing, truncated the
    victim and wrote the holder's pid into it."""
    root = tmp_path / "data"
    cfg = _cfg(root)
    numbers, _ = _pipeline(cfg)
    lock = root / numbers["path"] / ".lock"
    lock.unlink()
    lock.symlink_to(victim)
    CALLS.clear()
    _pipeline(cfg)  # a reuse opens no lock
    assert CALLS == {} and victim.read_text() == "precious"
    (root / numbers["path"] / "manifest.json").unlink()  # now it must be computed: the lock is refused
    with pytest.raises(store.UnsafePath, match=r"\.lock is a symbolic link"):
        _pipeline(cfg)
    assert victim.read_text() == "precious"


def test_a_truncated_manifest_is_set_aside_and_the_stage_refinished(tmp_path: Path) -> None:
    """Old code: json.loads raised JSONDecodeError from the reuse check: the run died with a traceback."""
    cfg = _cfg(tmp_path)
    _, doubled = _pipeline(cfg)
    path = tmp_path / doubled["path"] / "manifest.json"
    path.write_text(path.read_text()[:30])
    CALLS.clear()
    _, again = _pipeline(cfg)
    assert CALLS.get("shard", 0) == 0 and again["rows"] == 10  # the shards were whole: only the manifest
    assert [p.name[:13] for p in (path.parent / store.QUARANTINE).iterdir()] == ["manifest.json"]


def test_a_truncated_run_json_is_rewritten_by_the_next_flow_run(tmp_path: Path) -> None:
    """What a rerun does with a damaged run.json: start_run writes a new one (nothing is read from the old)
    and every finished stage is reused."""
    cfg = _cfg(tmp_path)
    runner.start_run(cfg)
    _pipeline(cfg)
    run_json = tmp_path / "toy" / "run.json"
    run_json.write_text(run_json.read_text()[:25])
    with pytest.raises(store.CorruptRecord, match="run.json is damaged .* rerun the flow"):
        runs.run_stages(tmp_path, "toy")
    CALLS.clear()
    runner.start_run(cfg)
    _pipeline(cfg)
    assert CALLS == {} and {e["1"]["computed"] for e in runs.run_stages(tmp_path, "toy").values()} == {False}


READ_ONLY_CHECKS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    sys.path[:0] = [sys.argv[2]]
    import test_runner as toy
    from variational.cli import main
    from variational.pipeline import runner
    root = sys.argv[1]
    out = {}
    cfg = toy._cfg(__import__("pathlib").Path(root))
    runner.start_run(cfg)
    toy._pipeline(cfg)
    out["calls"] = toy.CALLS
    for name, argv in {
        "runs": ["runs"],
        "sql": ["sql", "toy", "select sum(y) as s from rollouts"],
        "report": ["report", "toy"],
        "report_out": ["report", "toy", "--out", sys.argv[3]],
        "verify": ["verify-store", "toy", "--dry-run"],
    }.items():
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main([*argv, "--data-root", root])
        out[name] = [rc, stdout.getvalue(), stderr.getvalue()]
    try:
        toy._pipeline(toy._cfg(__import__("pathlib").Path(root), K=11))  # a stage to compute
    except Exception as err:
        out["compute"] = [type(err).__name__, str(err)]
    print(json.dumps(out))
    """
)


def test_a_finished_root_on_a_read_only_mount_is_reused_and_read(tmp_path: Path) -> None:
    """Issue 17 item 7. Old code: the reuse opened each stage's .lock for writing -> EROFS."""
    from conftest import read_only_view

    root, home = tmp_path / "data", tmp_path / "home"
    cfg = _cfg(root)
    runner.start_run(cfg)
    _pipeline(cfg)
    before = {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}
    env = {**os.environ, "VARIATIONAL_HOME": str(home)}
    cmd = [
        *read_only_view(root),
        sys.executable,
        "-c",
        READ_ONLY_CHECKS,
        str(root),
        str(Path(__file__).parent),
    ]
    proc = subprocess.run([*cmd, str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["calls"] == {}, "a fully cached rerun computes nothing"
    assert out["runs"][0] == 0 and "rollouts" in out["runs"][1] and "complete" in out["runs"][1]
    assert out["sql"][0] == 0 and "90" in out["sql"][1]
    assert out["report"][0] == 0, out["report"]
    assert out["report"][1].strip() == str(home / "reports" / "toy" / "report.md")
    assert out["report_out"][0] == 0 and (tmp_path / "out" / "report.md").exists()
    assert (home / "reports" / "toy" / "report.md").exists()
    assert out["verify"][0] == 0 and "rollouts           round 1: ok" in out["verify"][1]
    assert out["compute"][0] == "ReadOnlyRoot" and "must be computed" in out["compute"][1]
    assert "\n" not in out["compute"][1]
    assert {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} == before
