"""Checkpoints of the training loop, and the final HF folder, for 1 or N processes alike.

In:  the (possibly FSDP2-sharded) model, its optimizer, the tokenizer, `out_dir`, the number of completed
     optimizer steps and the step log.
Out: `out_dir/checkpoints/step-XXXXX/`: a torch.distributed.checkpoint (DCP) folder with the model and
     optimizer state (each process writes its shards; DCP reshards on load, so a run killed with 8
     processes resumes with 4), the model config, the tokenizer and `trainer_state.json` ({step, log}),
     written to a temp folder and renamed; only the newest complete one is kept. `save_final` gathers the
     full weights on process 0 and writes an HF folder (safetensors + tokenizer) that transformers and vLLM
     load.

No RNG state is saved: the data order is a pure function of (seed, epoch) and the lr of the step, and the
loop draws no random numbers (dropout is 0 in the model families trained here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from trainers.distributed import Runtime

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if (p / STATE).exists()) if root.exists() else []


def save(
    runtime: Runtime,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    out_dir: Path,
    step: int,
    log: list[dict],
) -> Path:
    """Write checkpoint `step` (all processes call this); returns its folder."""
    final = Path(out_dir) / CHECKPOINTS / f"step-{step:05d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=runtime.world == 1)
    if runtime.is_main:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STATE).write_text(json.dumps({"step": step, "log": log}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out_dir)[:-1]:  # keep only the newest complete one
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> tuple[int, list[dict]]:
    """Restore model and optimizer from `folder` in place; returns (completed steps, step log)."""
    model_state, optim_state = get_state_dict(model, optimizer)  # the shapes to load into
    state = {"model": model_state, "optim": optim_state}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved = json.loads((Path(folder) / STATE).read_text())
    return saved["step"], saved["log"]


def save_final(
    runtime: Runtime, model: torch.nn.Module, tokenizer, out_dir: Path, dtype: torch.dtype
) -> None:
    """Gather the full weights on process 0 and write the HF folder there (all processes call this)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # a collective under FSDP2; {} off process 0
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tied = tied_aliases(model)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k not in tied}
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    runtime.barrier()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another name's parameter (a tied lm-head). The gathered FSDP2 state
    holds a separate copy under each name, which HF would save twice; the model ties them again on load."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    return aliases
