"""trainers/checkpoint.py: a DCP checkpoint restores model and optimizer exactly; only the newest is kept;
the final HF folder holds a tied lm-head once and loads."""

from __future__ import annotations

from pathlib import Path

import torch

from trainers import checkpoint, distributed


def model_and_optimizer(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def step(model, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    ids = torch.randint(0, 1000, (1, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_save_load_roundtrip_and_pruning(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    runtime = distributed.start("no")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, optimizer = model_and_optimizer(tiny_model_dir)
    step(model, optimizer, 0)
    checkpoint.save(runtime, model, optimizer, tokenizer, tmp_path, 1, [{"step": 1}])
    step(model, optimizer, 1)
    (tmp_path / checkpoint.CHECKPOINTS / ".step-00003.tmp").mkdir()  # a save killed half-way
    folder = checkpoint.save(runtime, model, optimizer, tokenizer, tmp_path, 2, [{"step": 1}, {"step": 2}])
    assert checkpoint.checkpoints(tmp_path) == [folder] and folder.name == "step-00002"

    fresh, fresh_opt = model_and_optimizer(tiny_model_dir)
    assert checkpoint.load(fresh, fresh_opt, folder) == (2, [{"step": 1}, {"step": 2}])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the optimizer too: one more identical step keeps them identical
    step(model, optimizer, 2)
    step(fresh, fresh_opt, 2)
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"] == 3
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_final_folder_holds_tied_head_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _ = model_and_optimizer(tiny_model_dir)
    assert checkpoint.tied_aliases(model) == {"lm_head.weight"}  # the conftest model ties its embeddings
    out = tmp_path / "final"
    checkpoint.save_final(
        distributed.start("no"), model, AutoTokenizer.from_pretrained(tiny_model_dir), out, torch.float32
    )
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    again = AutoModelForCausalLM.from_pretrained(out)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
