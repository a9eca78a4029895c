"""variational/pipeline/records.py: names, recorded paths, manifests and run.json are checked when read, and
each refusal is one line naming the file, the entry and what to do (issue 17 items 4 and 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from variational.pipeline.records import check_name, read_manifest, read_run, recorded_rel, resolve
from variational.pipeline.storage import CorruptRecord, LocalRoot, UnsafePath


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", ".hidden", "../x", "/abs"])
def test_a_name_is_one_plain_component(name: str) -> None:
    with pytest.raises(UnsafePath, match="not one plain name"):
        check_name(name, "run")


def test_plain_names_pass() -> None:
    assert [check_name(n, "run") for n in ("tiny", "run-1.2", "a_b")] == ["tiny", "run-1.2", "a_b"]


def test_recorded_paths_stay_inside_the_root(tmp_path: Path) -> None:
    assert recorded_rel(tmp_path, "tiny/problems/fp", "x") == "tiny/problems/fp"
    assert (
        recorded_rel(tmp_path, str(tmp_path / "tiny" / "problems"), "x") == "tiny/problems"
    )  # legacy absolute
    for bad in ("/etc", "../other/x", str(tmp_path.parent / "x"), None):
        with pytest.raises(UnsafePath, match="run.json: stage 'v': path .* is outside the data root"):
            recorded_rel(tmp_path, bad, "run.json: stage 'v'")
    assert resolve(tmp_path, "tiny/q/model") == tmp_path / "tiny" / "q" / "model"
    assert resolve(tmp_path, "/models/base") == Path("/models/base")  # a base model a ref carries
    with pytest.raises(UnsafePath):
        resolve(tmp_path, "../../x")


def _manifest(tmp_path: Path, files: list[dict], **extra: object) -> LocalRoot:
    folder = tmp_path / "r" / "s" / "fp"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"files": files, **extra}))
    return LocalRoot(tmp_path)


def test_a_manifest_is_placed_where_it_was_found(tmp_path: Path) -> None:
    rec = {"file": "part-00000.parquet", "bytes": 1, "sha256": "0"}
    root = _manifest(tmp_path, [rec], path="/etc", model_dir="../../elsewhere")
    manifest = read_manifest(root, "r/s/fp")
    assert (manifest["path"], manifest["model_dir"]) == ("r/s/fp", "r/s/fp/model")


@pytest.mark.parametrize("entry", ["../../../outside.parquet", "/dev/zero", "model/../../x", ".lock"])
def test_a_manifest_entry_leaving_its_folder_is_refused(tmp_path: Path, entry: str) -> None:
    root = _manifest(tmp_path, [{"file": entry, "bytes": 0, "sha256": "0"}])
    with pytest.raises(UnsafePath) as err:
        read_manifest(root, "r/s/fp")
    message = str(err.value)
    assert "\n" not in message and "r/s/fp/manifest.json" in message and repr(entry) in message
    assert "nothing was read or moved" in message


def test_a_truncated_manifest_is_named(tmp_path: Path) -> None:
    root = _manifest(tmp_path, [])
    path = tmp_path / "r" / "s" / "fp" / "manifest.json"
    path.write_text(path.read_text()[:5])
    with pytest.raises(CorruptRecord, match=r"manifest.json is damaged \(not valid JSON") as err:
        read_manifest(root, "r/s/fp")
    assert "\n" not in str(err.value) and err.value.reason.startswith("not valid JSON")
    path.write_text(json.dumps({"files": [{"file": "part-00000.parquet"}]}))
    with pytest.raises(CorruptRecord, match="file list is malformed"):
        read_manifest(root, "r/s/fp")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(root, "r/s/fp")


def test_a_truncated_run_json_is_named_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "run.json").write_text('{"run": "tiny", "stag')
    with pytest.raises(CorruptRecord, match=r"tiny/run.json is damaged .*rerun the flow") as err:
        read_run(tmp_path, "tiny")
    assert "\n" not in str(err.value)
    (tmp_path / "tiny" / "run.json").write_text('{"stages": {"problems": [1]}}')
    with pytest.raises(CorruptRecord, match="no `stages` mapping"):
        read_run(tmp_path, "tiny")
    with pytest.raises(UnsafePath, match="not one plain name"):
        read_run(tmp_path, "..")
