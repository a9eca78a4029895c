"""variational/pipeline/objectstore.py against a real S3 server on the loopback (moto, tests/conftest.py):
the root's operations, leases (If-None-Match / If-Match), and the one-line refusals of open_object_root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from variational.analysis import sql as sqlview
from variational.config import parse_config
from variational.pipeline import objectstore, runner, runs, store
from variational.pipeline.objectstore import Lease, open_object_root, stale
from variational.pipeline.stage import Engine, Inputs, Stage
from variational.pipeline.storage import LockHeld, StoreError, UnsafePath, open_root


def test_an_s3_root_reads_writes_lists_and_moves(s3_root: str) -> None:
    root = open_root(s3_root)
    assert not root.local and root.writable() and root.full("r/x") == f"{s3_root}/r/x"
    root.write("r/s/fp/part-00000.parquet", lambda fh: fh.write(b"abc"))
    assert (
        root.read_bytes("r/s/fp/part-00000.parquet") == b"abc"
        and root.file_size("r/s/fp/part-00000.parquet") == 3
    )
    assert root.file_size("r/s/fp/missing") is None and not root.exists("r/s/fp/missing")
    assert root.listdir("r") == {"s": "dir"} and root.listdir("r/s/fp") == {"part-00000.parquet": "file"}
    assert root.is_dir("r/s") and not root.is_dir("r/s/fp/part-00000.parquet")
    with pytest.raises(UnsafePath, match="not a file"):
        root.file_size("r/s")
    root.move("r/s/fp/part-00000.parquet", "r/s/fp/.quarantine/part-00000.parquet.1")
    assert root.listdir("r/s/fp") == {".quarantine": "dir"}
    root.remove("r/s/fp/.quarantine/part-00000.parquet.1")
    assert root.listdir("r") == {}
    for bad in ("../x", "/x", "a/../../b"):
        with pytest.raises(UnsafePath):
            root.write(bad, lambda fh: fh.write(b"x"))


def test_a_failed_upload_leaves_no_object(s3_root: str) -> None:
    root = open_root(s3_root)

    def fail(fh: object) -> None:
        fh.write(b"half")  # type: ignore[attr-defined]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        root.write("r/part-00000.parquet", fail)
    assert not root.exists("r/part-00000.parquet")


# ---------------------------------------------------------------- leases
def test_a_lease_is_exclusive_names_its_holder_and_is_released(s3_root: str) -> None:
    root = open_root(s3_root)
    with root.lock("r/s/fp/.lock", "pid 1 on here") as lease:
        body = json.loads(root.read_bytes("r/s/fp/.lock"))
        assert (
            body["holder"] == "pid 1 on here"
            and body["pid"] == os.getpid()
            and body["expires_at"] > time.time()
        )
        assert lease.lost is None
        with pytest.raises(LockHeld, match="pid 1 on here"), root.lock("r/s/fp/.lock", "pid 2"):
            pass
    assert not root.exists("r/s/fp/.lock")  # released: the next run creates it again
    with root.lock("r/s/fp/.lock", "pid 3"):
        pass


def _plant(root: object, rel: str, **fields: object) -> None:
    lease = {"holder": "pid 99 on elsewhere", "host": "elsewhere", "pid": 99, "pid_start": "1"} | fields
    root.write(rel, lambda fh: fh.write(json.dumps(lease).encode()))  # type: ignore[attr-defined]


def test_a_live_lease_elsewhere_holds_until_it_expires(s3_root: str) -> None:
    root = open_root(s3_root)
    _plant(root, "r/.lock", expires_at=time.time() + 2)
    with pytest.raises(LockHeld, match="pid 99 on elsewhere"), root.lock("r/.lock", "me"):
        pass
    time.sleep(2.5)  # its holder never renewed: expired
    with root.lock("r/.lock", "me"):
        assert json.loads(root.read_bytes("r/.lock"))["holder"] == "me"


def test_a_dead_holder_on_this_host_is_taken_over_at_once(s3_root: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is gone
    root = open_root(s3_root)
    _plant(root, "r/.lock", host=os.uname().nodename, pid=proc.pid, expires_at=time.time() + 600)
    assert stale(json.loads(root.read_bytes("r/.lock")))
    with root.lock("r/.lock", "me"):
        assert json.loads(root.read_bytes("r/.lock"))["holder"] == "me"
    alive = {
        "host": os.uname().nodename,
        "pid": os.getpid(),
        "pid_start": objectstore._process_start(os.getpid()),
    }
    assert not stale({**alive, "expires_at": time.time() + 60}) and stale({"garbage": 1})


def test_a_held_lease_is_renewed_and_notices_a_takeover(s3_root: str) -> None:
    root = open_root(s3_root)
    lease = Lease(root, "r/.lock", "me", ttl_s=0.9)  # renewed every 0.3 s
    lease.acquire()
    try:
        time.sleep(2)  # well past one ttl: still ours, never stale
        assert lease.lost is None and not stale(json.loads(root.read_bytes("r/.lock")))
        _plant(root, "r/.lock", expires_at=time.time() + 600)  # someone overwrote it
        time.sleep(1)
        assert lease.lost and "lost" in lease.lost
    finally:
        lease.release()
    assert json.loads(root.read_bytes("r/.lock"))["holder"] == "pid 99 on elsewhere"  # not ours to delete


# ---------------------------------------------------------------- one-line refusals
def test_unknown_schemes_missing_buckets_and_credentials_are_one_line(
    s3_root: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(StoreError, match="unknown URL scheme 'nope'") as err:
        open_object_root("nope://bucket/x")
    assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' cannot be listed at http://127.0.0.1"):
        open_object_root("s3://no-such-bucket/x")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
        open_object_root(s3_root + "-other")  # a new root: checked afresh


def test_s3_without_the_extra_names_it(s3_root: str) -> None:
    code = "import sys; sys.modules['s3fs'] = None; from variational.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "runs", "--data-root", s3_root], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "s3:// needs the `s3` extra: pip install 'variational[s3]'" in proc.stderr


def test_a_url_never_becomes_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old code: Path('s3://b/p') is the local folder `s3:/b/p`; a whole tiny run landed there (and `runs`
    listed that folder's runs)."""
    from variational.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in (["runs", "--data-root", "s4://bucket/x"], ["run", "tiny", "--data-root", "s4://bucket/x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown URL scheme 's4'" in err
    with pytest.raises(StoreError, match="looks like a URL"):
        open_root(Path("s3://bucket/prefix"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the runner on toy stages, over S3
CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


def _numbers(i: Inputs) -> pl.DataFrame:
    _count("numbers")
    return pl.DataFrame({"x": list(range(i.conf.K))})


def _double(i: Inputs, engine: Engine, part: pl.DataFrame) -> pl.DataFrame:
    _count("shard")
    return part.with_columns(y=pl.col("x") * 2)


def _train(i: Inputs, examples: pl.DataFrame, out_dir: Path) -> dict:
    _count("train")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"rows": examples.height}))
    (out_dir / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return {"summary": "trained"}


def _files_of_model(i: Inputs) -> pl.DataFrame:
    _count("use_model")
    folder = Path(i.model_dir("pi_theta0"))
    return pl.DataFrame({"file": sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))})


NUMBERS = Stage(name="problems", fields=("K",), core=_numbers, per_round=False)
DOUBLED = Stage(
    name="rollouts", inputs=("problems",), plan=lambda i: i.table("problems"), shard=_double, shard_size=3
)
MODEL = Stage(name="pi_theta0", inputs=("problems",), examples=lambda i: i.table("problems"), train=_train)
USES_MODEL = Stage(name="eval", inputs=("pi_theta0",), core=_files_of_model)


def toy_cfg(root: str) -> dict:
    conf = {"name": "toy", "data_root": root, "base_model": "embedded:smollm2-135m", "K": 10}
    return parse_config(conf).model_dump(mode="json")


def toy_flow(root: str) -> dict[str, dict]:
    cfg = runner.start_run(toy_cfg(root))
    numbers = runner.run_stage(NUMBERS, cfg, {})
    model = runner.run_stage(MODEL, cfg, {"problems": numbers})
    return {
        "problems": numbers,
        "rollouts": runner.run_stage(DOUBLED, cfg, {"problems": numbers}),
        "pi_theta0": model,
        "eval": runner.run_stage(USES_MODEL, cfg, {"pi_theta0": model}),
    }


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def test_the_toy_flow_on_s3_computes_then_reuses_everything(
    s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    refs = toy_flow(s3_root)
    assert CALLS == {"numbers": 1, "train": 1, "shard": 4, "use_model": 1}
    root = open_root(s3_root)
    assert set(root.listdir(f"toy/rollouts/{refs['rollouts']['fingerprint']}")) == {
        *(f"part-0000{i}.parquet" for i in range(4)),
        "manifest.json",
        "shard_stats.parquet",
        "stats",  # each shard's stats record (variational/pipeline/shardstats.py)
    }  # the lease was released, nothing else was left
    model_rel = f"toy/pi_theta0/{refs['pi_theta0']['fingerprint']}/model"
    assert root.listdir(model_rel) == {"config.json": "file", "weights.bin": "file"}
    assert store.read_stage(s3_root, refs["eval"])["file"].to_list() == ["config.json", "weights.bin"]
    assert store.read_stage(s3_root, refs["rollouts"])["y"].sum() == 90
    CALLS.clear()
    toy_flow(s3_root)
    assert CALLS == {}, "a rerun on the same prefix computes nothing"
    assert {e["1"]["computed"] for e in runs.run_stages(s3_root, "toy").values()} == {False}
    assert sorted(p.name for p in cwd.iterdir()) == [], "nothing local (no folder named `s3:`)"


def test_cli_runs_sql_report_and_verify_store_on_s3(
    s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from variational.cli import main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    refs = toy_flow(s3_root)
    capsys.readouterr()
    root = ["--data-root", s3_root]
    assert main(["runs", *root]) == 0 and "rollouts" in capsys.readouterr().out
    assert main(["sql", "toy", "select sum(y) as s from rollouts", *root]) == 0
    assert "│ 90 " in capsys.readouterr().out
    bucket = s3_root.split("/")[2]
    open_root(f"s3://{bucket}/other").write("x.csv", lambda fh: fh.write(b"a\n1\n"))
    for outside in (f"s3://{bucket}/other/x.csv", f"{s3_root}/toy/../../other/x.csv", "/etc/passwd"):
        assert main(["sql", "toy", f"select * from read_csv('{outside}')", *root]) == 1
        assert "Permission Error" in capsys.readouterr().err
    con = sqlview.connect(s3_root, "toy")  # read through our fsspec filesystem: nothing may be fetched
    settings = "current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')"
    assert con.execute(f"select {settings}").fetchone() == (False, False)
    assert con.execute("select count(*) from rollouts").fetchone() == (10,)
    assert main(["report", "toy", *root]) == 0
    assert capsys.readouterr().out.strip() == f"{s3_root}/toy/report/report.md"
    assert b"# Run report: toy" in open_root(s3_root).read_bytes("toy/report/report.md")
    assert main(["verify-store", "toy", *root]) == 0
    assert "rollouts           round 1: ok" in capsys.readouterr().out
    shard = f"toy/rollouts/{refs['rollouts']['fingerprint']}/part-00001.parquet"
    data = bytearray(open_root(s3_root).read_bytes(shard))
    data[len(data) // 2] ^= 0xFF  # same size: only the hash sees it
    open_root(s3_root).write(shard, lambda fh: fh.write(bytes(data)))
    assert main(["verify-store", "toy", *root]) == 1
    assert "DAMAGED: part-00001.parquet: content differs" in capsys.readouterr().out
    CALLS.clear()
    toy_flow(s3_root)
    assert CALLS == {"shard": 1}, "only the damaged shard is recomputed"
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_a_truncated_shard_on_s3_is_set_aside_and_only_it_recomputed(s3_root: str) -> None:
    refs = toy_flow(s3_root)
    root = open_root(s3_root)
    folder = f"toy/rollouts/{refs['rollouts']['fingerprint']}"
    root.write(f"{folder}/part-00002.parquet", lambda fh: fh.write(b"PAR1"))
    CALLS.clear()
    again = toy_flow(s3_root)
    assert CALLS == {"shard": 1}
    assert [n.startswith("part-00002.parquet.") for n in root.listdir(f"{folder}/.quarantine")] == [True]
    assert store.read_stage(s3_root, again["rollouts"])["y"].to_list() == [2 * x for x in range(10)]


def test_a_prefix_copied_object_for_object_is_reused_whole(
    s3_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = toy_flow(s3_root)
    fs = open_root(s3_root).fs  # type: ignore[attr-defined]
    copy = s3_root + "-copy"
    fs.copy(s3_root.removeprefix("s3://"), copy.removeprefix("s3://"), recursive=True)
    fs.rm(s3_root.removeprefix("s3://"), recursive=True)  # the original is gone: nothing may come from it
    home = Path(os.environ["VARIATIONAL_HOME"])
    shutil.rmtree(home / "model-cache")  # another machine: no model cached
    CALLS.clear()
    toy_flow(copy)
    assert CALLS == {}
    open_root(copy).remove(f"toy/eval/{refs['eval']['fingerprint']}/manifest.json")  # needs the model again
    toy_flow(copy)
    assert CALLS == {"use_model": 1}
    cached = home / "model-cache" / refs["pi_theta0"]["fingerprint"]
    assert (cached / "weights.bin").read_bytes() == bytes(range(256)) * 64


def test_a_second_run_stops_while_the_first_holds_the_lease(s3_root: str, tmp_path: Path) -> None:
    cfg = toy_cfg(s3_root)
    fp = runner.stage_fingerprint(NUMBERS, parse_config(cfg), {}, 1)
    holder = (
        "import time\nfrom variational.pipeline.store import StageStore\n"
        f"with StageStore({s3_root!r}, 'toy', 'problems', {fp!r}).lock():\n"
        "    print('locked', flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(store.StageLocked, match=rf"pid {proc.pid} on .*lease until .*wait for that run"):
            runner.run_stage(NUMBERS, cfg, {})
    finally:
        proc.kill()
        proc.wait()
    runner.run_stage(NUMBERS, cfg, {})  # the killed holder's lease is taken over at once (same host)
    assert CALLS == {"numbers": 1}


KILLABLE = """
import sys
sys.path.insert(0, sys.argv[2])
import raytoy
from variational import shutdown
from variational.analysis import sql as sqlview
from variational.config import parse_config
from variational.pipeline.runner import run_stage
shutdown.install()
cfg = parse_config({**raytoy.config(sys.argv[1]), "executor": {"kind": "local"}}).model_dump(mode="json")
try:
    numbers = run_stage(raytoy.NUMBERS, cfg, {})
    run_stage(raytoy.MULTIPLIED, cfg, {"numbers": numbers})
except shutdown.StopRequested as stop:
    sys.exit(stop.exit_code)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_stop_mid_shard_then_the_rerun_redoes_only_that_shard(
    s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: str
) -> None:
    """SIGKILL: no cleanup, the dead holder's lease stays and is taken over at once (same host). SIGTERM: a
    clean stop, exit 143, the lease released. Either way no partial shard exists and only it is redone."""
    import signal

    import raytoy

    monkeypatch.setenv("RAYTOY_PID_DIR", str(tmp_path))
    monkeypatch.setenv("RAYTOY_VICTIM_ITEM", "15")  # the last of 6 shards: 0..4 are written before it
    monkeypatch.setenv("VARIATIONAL_STOP_GRACE_S", "1")  # the victim sleeps: the watchdog interrupts it
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, s3_root, str(Path(raytoy.__file__).parent)])
    deadline = time.monotonic() + 180
    while not (tmp_path / "victim.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the victim shard never started"
        time.sleep(0.1)
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=120) == (-signal.SIGKILL if sig == "SIGKILL" else 143)
    root = open_root(s3_root)
    names = {n for fp in root.listdir("raytoy/rollouts") for n in root.listdir(f"raytoy/rollouts/{fp}")}
    lease = {".lock"} if sig == "SIGKILL" else set()
    assert names == {f"part-0000{i}.parquet" for i in range(5)} | lease | {"stats"}, names
    cfg = parse_config({**raytoy.config(s3_root), "executor": {"kind": "local"}}).model_dump(mode="json")
    numbers = runner.run_stage(raytoy.NUMBERS, cfg, {})
    out = runner.run_stage(raytoy.MULTIPLIED, cfg, {"numbers": numbers})
    table = store.read_stage(s3_root, out)
    assert table.height == 18 and (table["y"] == table["x"] * 3).all()
    by_pid = table.group_by("pid").len().sort("len")["len"].to_list()
    assert by_pid == [3, 15], "only the stopped shard (3 items) was computed again, by this process"


def test_another_fsspec_scheme_is_read_and_refuses_to_compute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`memory://` stands for the fsspec schemes other than s3 (gs://, az://): runs, sql, verify-store and a
    fully cached rerun read them; a stage to compute stops in one line (leases need conditional writes)."""
    import fsspec

    from variational.cli import main

    monkeypatch.setenv("VARIATIONAL_HOME", str(tmp_path / "home"))
    local = tmp_path / "data"
    toy_flow(str(local))
    fs = fsspec.filesystem("memory")
    url = f"memory://vr{os.getpid()}/root"
    for path in local.rglob("*"):
        if path.is_file() and path.name != ".lock":
            fs.pipe_file(f"{url}/{path.relative_to(local)}", path.read_bytes())
    capsys.readouterr()
    CALLS.clear()
    toy_flow(url)
    assert CALLS == {}
    assert main(["runs", "--data-root", url]) == 0 and "rollouts" in capsys.readouterr().out
    assert main(["sql", "toy", "select sum(y) as s from rollouts", "--data-root", url]) == 0
    assert "│ 90 " in capsys.readouterr().out
    assert main(["verify-store", "toy", "--dry-run", "--data-root", url]) == 0
    fs.rm_file(f"{url}/toy/eval/{runs.run_stages(url, 'toy')['eval']['1']['fingerprint']}/manifest.json")
    with pytest.raises(store.ReadOnlyRoot, match="memory:// data roots are read here") as err:
        toy_flow(url)
    assert "\n" not in str(err.value)
