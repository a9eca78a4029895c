"""variational/pipeline/modelfiles.py: a local root hands its model folders as they are; an S3 root's model is
uploaded after training and read from a local cache keyed by fingerprint, checked against the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from variational.pipeline import modelfiles
from variational.pipeline.storage import LocalRoot, StoreError, open_root


def _model(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden": 8}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 100)
    (folder / "checkpoints").mkdir()  # gone when training ends; never uploaded


def _ref(root: object, rel: str, fp: str) -> dict:
    files = [
        {"file": f"model/{n}", "bytes": root.file_size(f"{rel}/{n}"), "sha256": root.sha256(f"{rel}/{n}")}  # type: ignore[attr-defined]
        for n in ("config.json", "model.safetensors")
    ]
    return {"stage": "pi_theta0", "fingerprint": fp, "model_dir": rel, "files": files}


def test_a_local_root_hands_the_stage_folder_itself(tmp_path: Path) -> None:
    _model(tmp_path / "r" / "pi_theta0" / "fp" / "model")
    ref = _ref(LocalRoot(tmp_path), "r/pi_theta0/fp/model", "fp")
    assert modelfiles.model_folder(tmp_path, ref) == str(tmp_path / "r" / "pi_theta0" / "fp" / "model")
    assert modelfiles.model_folder(tmp_path, {"model_dir": "/models/base"}) == "/models/base"  # a base model


def test_an_s3_model_is_uploaded_then_read_from_the_cache(s3_root: str, tmp_path: Path) -> None:
    root = open_root(s3_root)
    staging = tmp_path / "staging"
    _model(staging)
    modelfiles.upload(root, staging, "r/pi_theta0/fp1/model")
    assert root.listdir("r/pi_theta0/fp1/model") == {"config.json": "file", "model.safetensors": "file"}
    ref = _ref(root, "r/pi_theta0/fp1/model", "fp1")
    folder = Path(modelfiles.model_folder(s3_root, ref))
    assert folder == modelfiles.cache_dir("fp1")
    assert (folder / "model.safetensors").read_bytes() == (staging / "model.safetensors").read_bytes()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["fp1"]  # no temp folder left
    root.remove("r/pi_theta0/fp1/model/model.safetensors")  # cached: the store is not asked again
    assert modelfiles.model_folder(s3_root, ref) == str(folder)


def test_a_model_that_differs_from_its_manifest_is_refused_and_not_cached(
    s3_root: str, tmp_path: Path
) -> None:
    root = open_root(s3_root)
    _model(tmp_path / "staging")
    modelfiles.upload(root, tmp_path / "staging", "r/m/fp2/model")
    ref = _ref(root, "r/m/fp2/model", "fp2")
    data = bytearray(root.read_bytes("r/m/fp2/model/model.safetensors"))
    data[7] ^= 0xFF  # same size, other bytes
    root.write("r/m/fp2/model/model.safetensors", lambda fh: fh.write(bytes(data)))
    with pytest.raises(StoreError, match="model.safetensors differs from its manifest"):
        modelfiles.model_folder(s3_root, ref)
    assert not modelfiles.cache_dir("fp2").exists()


def test_a_cache_entry_of_other_bytes_is_replaced(s3_root: str, tmp_path: Path) -> None:
    """Two data roots can hold the same fingerprint trained twice: the cache follows the manifest's hashes."""
    root = open_root(s3_root)
    _model(tmp_path / "staging")
    modelfiles.upload(root, tmp_path / "staging", "r/m/fp3/model")
    ref = _ref(root, "r/m/fp3/model", "fp3")
    stale = modelfiles.cache_dir("fp3")
    _model(stale)
    (stale / "model.safetensors").write_bytes(b"x" * 25600)  # same size, other content
    (stale / modelfiles.MARKER).write_text(json.dumps({"config.json": "?", "model.safetensors": "?"}))
    folder = Path(modelfiles.model_folder(s3_root, ref))
    assert (folder / "model.safetensors").read_bytes() == bytes(range(256)) * 100


def test_adopt_makes_the_trained_folder_the_cache_entry(s3_root: str, tmp_path: Path) -> None:
    root = open_root(s3_root)
    staging = modelfiles.staging_dir("r", "pi_theta0", "fp4")
    _model(staging)
    modelfiles.upload(root, staging, "r/pi_theta0/fp4/model")
    ref = _ref(root, "r/pi_theta0/fp4/model", "fp4")
    modelfiles.adopt(staging, ref)
    assert not staging.exists() and not (modelfiles.cache_dir("fp4") / "checkpoints").exists()
    root.remove("r/pi_theta0/fp4/model/model.safetensors")
    assert modelfiles.model_folder(s3_root, ref) == str(modelfiles.cache_dir("fp4"))  # no download
