"""Shared fixtures: the embedded model folder and a tiny random-weight model of the same family.

The tiny model is a real LlamaForCausalLM (2 layers, hidden 64) with SmolLM2's tokenizer, built from a
config with a fixed seed, so tests run real forward/backward passes in seconds.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("VARIATIONAL_HOME", str(REPO / ".cache" / "variational"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from variational.engines.models import prepare_embedded

    return prepare_embedded("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def finished_stage(data_root: Path, run: str, name: str, df, fp: str | None = None, **extra) -> dict:
    """A finished upstream stage on disk (shard + manifest), as the runner would leave it; returns its ref."""
    from variational.pipeline.store import StageStore

    st = StageStore(data_root, run, name, fp or f"fp-{name}")
    st.write_shard(0, df)
    return st.finish(round_=1, **extra)


# ---------------------------------------------------------------- Prefect's variables, free ports
PREFECT_VARS = (
    "PREFECT_API_URL",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
)


@pytest.fixture
def clean_prefect_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The Prefect variables unset for the test and restored after it (the CLI sets them in os.environ)."""
    for name in PREFECT_VARS:
        monkeypatch.setenv(name, "placeholder")  # records the original value for the teardown
        monkeypatch.delenv(name)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- a read-only view of a folder
_RO_SCRIPT = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
_NAMESPACES = (
    ["unshare", "--mount", "--propagation", "private"],
    ["unshare", "--user", "--map-root-user", "--mount"],
)


def read_only_view(path: Path) -> list[str]:
    """A command prefix: what follows runs in a private mount namespace where `path` is a read-only bind mount
    of itself (EROFS on every write, root included); the host's mounts are untouched. Root may do this
    directly; others through an unprivileged user namespace. Skips the test where neither works."""
    import subprocess

    for prefix in _NAMESPACES:
        probe = [
            *prefix,
            "sh",
            "-c",
            _RO_SCRIPT,
            str(path),
            "sh",
            "-c",
            f"! touch {str(path)!r}/.probe 2>/dev/null",
        ]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return [*prefix, "sh", "-c", _RO_SCRIPT, str(path)]
    pytest.skip("no mount namespace for a read-only bind mount (needs root or unprivileged user namespaces)")


# ---------------------------------------------------------------- a real S3 server on the loopback (issue 20)
@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """moto's standalone S3 server (the `dev` extra), started for the session on 127.0.0.1: no network."""
    import subprocess
    import sys
    import time

    pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[dev]')")
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install -e '.[s3]')")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_root(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """`s3://<fresh bucket>/root` on the test server, with the AWS variables a user would set (also for
    child processes) and a private VARIATIONAL_HOME (model cache, uploads)."""
    import uuid

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        **S3_ENV,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VARIATIONAL_HOME", str(tmp_path / "home"))
    import s3fs

    bucket = f"b{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/root"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the data root that nothing may read, move or change (issue 17's confinement tests)."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path
