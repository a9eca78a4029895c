"""variational/analysis/export.py and `variational export`: a small finished run on disk (tests/exportrun.py,
written through the store, `train` from the real select core) -> folders that `datasets` (offline, in a
child process) and transformers load, with their cards; the push against a fake Hub on the loopback
(tests/hubserver.py) with what arrived checked file by file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import exportrun
import polars as pl
import pytest
import yaml
from hubserver import HubServer

from variational.analysis.export import ExportError, Request, copy_model, export, plain_type
from variational.cli import main
from variational.cli.store import dag_steps
from variational.pipeline.runs import run_stages
from variational.pipeline.store import DamagedStage, read_stage

REPO = Path(__file__).resolve().parents[2]
RUN = exportrun.RUN
LOAD = """
import json, sys, datasets
out = {}
for path in sys.argv[2:]:
    ds = datasets.load_dataset(path, split="train", cache_dir=sys.argv[1])
    out[path] = {"rows": ds.num_rows, "features": {k: str(v) for k, v in ds.features.items()}, "rows_": ds.to_list()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return exportrun.build_run(tmp_path_factory.mktemp("export-run"), tiny_model_dir)


@pytest.fixture(scope="module")
def steps(run_root: Path) -> list:
    return dag_steps(str(run_root), RUN)


@pytest.fixture
def copy_root(run_root: Path, tmp_path: Path) -> Path:
    """A copy of the run to damage (the store keeps relative paths: a copied data root works as is)."""
    return Path(shutil.copytree(run_root, tmp_path / "root"))


def load_offline(cache: Path, *folders: Path) -> dict:
    """`datasets.load_dataset(folder, split="train")` in a child process with the Hub switched off."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(cache / "home"))
    cmd = [sys.executable, "-c", LOAD, str(cache / "datasets"), *map(str, folders)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def front_matter(readme: Path) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", readme.read_text(), re.S).group(1))


def test_train_exports_load_with_datasets_offline(run_root: Path, steps: list, tmp_path: Path) -> None:
    outs = {}
    for fmt in ("messages", "bespoke", "prompt_completion"):
        done = export(Request(run_root, RUN, fmt=fmt, steps=steps), tmp_path / fmt)
        assert (
            done.files == ["data/train-00000-of-00001.parquet", "README.md"] and done.repo_type == "dataset"
        )
        outs[fmt] = done
    assert (outs["messages"].rows, outs["bespoke"].rows, outs["bespoke"].left_out) == (8, 7, 1)
    loaded = load_offline(tmp_path / "cache", *(tmp_path / f for f in outs))
    messages = loaded[str(tmp_path / "messages")]
    assert messages["rows"] == 8
    assert messages["features"]["messages"] == "List({'role': Value('string'), 'content': Value('string')})"
    train = exportrun.train()
    first = messages["rows_"][5]  # question 0's chosen trace, sample 1
    assert (first["origin"], first["sample_idx"], first["source"], first["weight"]) == (
        1,
        1,
        "numina/10",
        1.0,
    )
    assert first["messages"][2]["content"] == "<|begin_of_thought|>\n\n" + train["response"][5]
    bespoke = loaded[str(tmp_path / "bespoke")]
    assert bespoke["rows"] == 7 and bespoke["features"]["system"] == "Value('string')"
    assert bespoke["features"]["conversations"] == "List({'from': Value('string'), 'value': Value('string')})"
    pairs = loaded[str(tmp_path / "prompt_completion")]
    assert [m["role"] for m in pairs["rows_"][0]["prompt"]] == ["system", "user"]
    assert pairs["rows_"][0]["completion"][0]["role"] == "assistant"


def test_the_card_describes_the_run(run_root: Path, steps: list, tmp_path: Path) -> None:
    export(Request(run_root, RUN, steps=steps), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(tmp_path / "out" / "README.md")
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    recorded = {name: rounds["1"]["fingerprint"] for name, rounds in run_stages(run_root, RUN).items()}
    section = card.split("## Where it comes from")[1].split("\n## ")[0]
    lineage = [line for line in section.splitlines() if line.startswith("| ")]
    assert lineage[1] == f"| train | 1 | `{recorded['train']}` | 8 | computed | same |"  # exported first
    named = [line.split(" | ")[0].removeprefix("| ") for line in lineage[1:]]
    assert named == [
        "train",
        "problems",
        "base_model",
        "pi_theta0",
        "q_phi",
        "posterior_samples",
        "logps",
        "rollouts",
        "verdicts",
        "weights",
    ]  # its upstream chain; pi_theta and eval are not in it
    assert f"| problems | 1 | `{recorded['problems']}` | 4 | reused | same |" in card
    assert "| -2 original | 4 | 4.000 |" in card and "| -1 fallback | 1 | 1.000 |" in card
    assert "| numina | 4 | 4.000 |" in card and "| apps | 2 | 2.000 |" in card
    # ESS per question: 1/(.25²+.75²) = 1.6, 1/(.6²+.4²) = 1.923, 1/1² = 1 -> mean 1.508, median 1.6
    assert "| acc | 4 | 3 | 1.508 | 1.600 | 0.783 | 3 |" in card
    assert "| heldout | 3 | avg@2 |" in card  # the eval summary, models side by side
    assert "| `select.mode` | `17k-mix` |" in card and "| `K` | `4` |" in card
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert f"git commit `{commit.stdout.strip()}`" in card
    assert str(run_root) not in card  # the data root is not published


def test_another_table_is_exported_as_stored(run_root: Path, steps: list, tmp_path: Path) -> None:
    done = export(Request(run_root, RUN, stage="weights", steps=steps), tmp_path / "w")
    exported = pl.read_parquet(tmp_path / "w" / done.files[0])
    stored = read_stage(run_root, {"stage": "weights", **run_stages(run_root, RUN)["weights"]["1"]})
    assert exported.equals(stored)
    card = (tmp_path / "w" / "README.md").read_text()
    assert "The `weights` table exported as the pipeline stores it." in card and "| acc | 4 | 3 |" in card
    with pytest.raises(ExportError, match="--format applies to the train table"):
        export(Request(run_root, RUN, stage="weights", fmt="bespoke"), tmp_path / "w2")
    assert not (tmp_path / "w2").exists()


def test_model_export_is_a_transformers_folder(
    run_root: Path, steps: list, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    done = export(Request(run_root, RUN, stage="pi_theta", steps=steps), out)
    assert done.repo_type == "model"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in tiny_model_dir.iterdir()] + ["README.md"]
    )
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(out).chat_template  # the chat template travels with it
    card = (out / "README.md").read_text()
    assert front_matter(out / "README.md")["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "config section `final`" in card and "| final_loss | `0.75` |" in card
    assert "| heldout | 3 | avg@2 |" in card


def test_a_missing_generation_config_is_derived(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(tiny_model_dir, tmp_path / "src"))
    (src / "generation_config.json").unlink()
    (tmp_path / "out").mkdir()
    names = copy_model(src, tmp_path / "out", lambda _: None)
    assert "generation_config.json" in names
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == json.loads((src / "config.json").read_text())["eos_token_id"]


def test_requests_the_run_cannot_satisfy(run_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot export stage 'base_model'"):
        export(Request(run_root, RUN, stage="base_model"), tmp_path / "a")
    with pytest.raises(ExportError, match="has no q_phi round 2; its stages: eval@1, logps@1"):
        export(Request(run_root, RUN, stage="q_phi", round=2), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no run 'nope'"):
        export(Request(run_root, "nope"), tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(Request(run_root, RUN), tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*tmp-*"))


def test_an_unfinished_or_damaged_stage_is_not_exported(copy_root: Path, tmp_path: Path) -> None:
    entry = run_stages(copy_root, RUN)["train"]["1"]
    shard = copy_root / entry["path"] / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedStage, match="does not match its manifest .*sha256.*verify-store"):
        export(Request(copy_root, RUN), tmp_path / "out")
    (copy_root / entry["path"] / "manifest.json").unlink()
    with pytest.raises(ExportError, match="train round 1 of run 'toy' is unfinished"):
        export(Request(copy_root, RUN), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*tmp-*"))


def test_plain_arrow_types_for_datasets() -> None:
    import pyarrow as pa

    nested = pa.large_list(pa.struct([pa.field("role", pa.large_string()), pa.field("n", pa.int64())]))
    assert plain_type(nested) == pa.list_(
        pa.struct([pa.field("role", pa.string()), pa.field("n", pa.int64())])
    )
    assert plain_type(pa.string_view()) == pa.string() and plain_type(pa.float32()) == pa.float32()


# ---------------------------------------------------------------- the command line
def test_cli_export_and_its_one_line_errors(
    copy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    assert main(["export", RUN, "--out", str(out), "--format", "bespoke", "--data-root", str(copy_root)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 7 rows to {out}" in printed and "1 train row(s) left out" in printed
    assert main(["export", RUN, "--out", str(out), "--data-root", str(copy_root)]) == 2
    assert (
        main(
            [
                "export",
                RUN,
                "--out",
                str(tmp_path / "x"),
                "--stage",
                "eval",
                "--format",
                "messages",
                "--data-root",
                str(copy_root),
            ]
        )
        == 2
    )
    assert (
        main(["export", RUN, "--out", str(tmp_path / "x"), "--private", "--data-root", str(copy_root)]) == 2
    )
    errors = capsys.readouterr().err.strip().splitlines()
    assert [e.split(":")[0] for e in errors] == ["error"] * 3, errors
    assert "--private needs --push" in errors[2]
    entry = run_stages(copy_root, RUN)["train"]["1"]
    (copy_root / entry["path"] / "part-00000.parquet").write_bytes(b"PAR1 cut")
    assert main(["export", RUN, "--out", str(tmp_path / "y"), "--data-root", str(copy_root)]) == 3


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`variational export RUN ARGS` as a user runs it (a child process: huggingface_hub reads HF_HOME and
    HF_HUB_OFFLINE once, at import)."""
    cmd = [sys.executable, "-m", "variational.cli", "export", RUN, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


PUSH = """
import sys
from pathlib import Path
from variational.analysis.export import ExportError, push
try:
    print(push(Path(sys.argv[1]), sys.argv[2], sys.argv[3], private=False))
except ExportError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def push_child(
    env: dict[str, str], folder: Path, repo_id: str, repo_type: str
) -> subprocess.CompletedProcess:
    """`push` alone in a child process (no DAG to trace: seconds, not the CLI's tens of seconds)."""
    cmd = [sys.executable, "-c", PUSH, str(folder), repo_id, repo_type]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def hub_env(tmp_path: Path, endpoint: str, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO)}
    return env | ({"HF_TOKEN": token} if token else {})


def test_push_uploads_the_folder_to_the_hub(run_root: Path, tmp_path: Path) -> None:
    with HubServer({"hf_secret"}) as hub:
        env = hub_env(tmp_path, hub.endpoint, "hf_secret")
        out = tmp_path / "push"
        proc = cli(
            env, "--out", str(out), "--push", "me/toy-train", "--private", "--data-root", str(run_root)
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"pushed to {hub.endpoint}/datasets/me/toy-train/commit/" in proc.stdout
        repo = hub.repos[("dataset", "me/toy-train")]
        assert repo.private and len(repo.commits) == 1
        local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert repo.files == local  # every file arrived, byte for byte
        model_out = tmp_path / "model"
        export(Request(run_root, RUN, stage="pi_theta"), model_out)
        proc = push_child(env, model_out, "me/toy-pi", "model")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith(f"{hub.endpoint}/me/toy-pi/commit/")
        model_repo = hub.repos[("model", "me/toy-pi")]
        assert not model_repo.private
        assert model_repo.files == {p.name: p.read_bytes() for p in model_out.iterdir()}


def test_push_without_a_token_or_with_a_refused_one_is_one_line(run_root: Path, tmp_path: Path) -> None:
    with HubServer({"hf_secret"}) as hub:
        args = ("--out", str(tmp_path / "a"), "--push", "me/x", "--data-root", str(run_root))
        proc = cli(hub_env(tmp_path, hub.endpoint, None), *args)
        assert proc.returncode == 2 and proc.stdout == ""
        assert (
            proc.stderr.strip()
            == "error: no Hugging Face token to push me/x: set HF_TOKEN or run `hf auth login`"
        )
        assert hub.requests == [] and not (tmp_path / "a").exists()  # stopped before any work
        export(Request(run_root, RUN, stage="weights"), tmp_path / "b")
        proc = push_child(hub_env(tmp_path, hub.endpoint, "hf_wrong"), tmp_path / "b", "me/x", "dataset")
        assert proc.returncode == 2
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("push to me/x failed (") and "401" in err[0], err
        assert err[0].endswith(f"the export is in {tmp_path / 'b'}")
        assert ("POST", "/api/repos/create") in hub.requests and hub.repos == {}


def test_without_the_dag_the_card_lists_every_recorded_stage(
    copy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_json = copy_root / RUN / "run.json"
    recorded = json.loads(run_json.read_text())
    recorded["config"]["retired_option"] = 1  # a config this release no longer validates
    run_json.write_text(json.dumps(recorded))
    assert main(["export", RUN, "--out", str(tmp_path / "out"), "--data-root", str(copy_root)]) == 0
    assert (
        "note: the DAG of run 'toy' could not be traced (ValidationError: 1 validation error for RunConfig retired_option"
        in capsys.readouterr().err
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "could not be traced: every stage the run recorded is listed" in card
    section = card.split("## Where it comes from")[1].split("\n## ")[0]
    named = [
        line.split(" | ")[0].removeprefix("| ") for line in section.splitlines() if line.startswith("| ")
    ][1:]
    assert named[0] == "train" and sorted(named) == sorted(run_stages(copy_root, RUN))
