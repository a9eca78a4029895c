"""What a fine-tune cost the hardware: the device, peak memory and model FLOP utilisation (issue 21).

In:  the training model, its `distributed.Runtime` and the measured tokens/s (trainers/sft.py metrics).
Out: extra fields of `train_metrics.json`: device (cpu or the GPU's name), processes, precision, params,
     peak_memory_gib (CUDA: the most memory torch allocated on process 0's GPU since the run began; CPU:
     the peak resident set of the process, which includes what it held before training), flops_per_token
     and mfu, the share of the devices' peak dense bf16 rate the training reached (None where that peak is
     unknown: CPUs, fp32 on GPUs, GPUs not in PEAK_BF16_FLOPS).

FLOPs per trained token: 6 x parameters (forward 2, backward 4); attention and the recomputed forward of
gradient checkpointing are left out, so this is the usual MFU, not the hardware utilisation.
"""

from __future__ import annotations

import resource
from typing import Any

import torch

# Dense bf16 tensor-core peak per GPU (vendor data sheets, without sparsity), matched in the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops(name: str, precision: str) -> float | None:
    """A device's peak dense rate for this precision, when known."""
    if precision != "bf16":
        return None
    return next((rate for key, rate in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float | None, params: int, name: str, precision: str, processes: int) -> float | None:
    """6 x params x tokens/s over the peak of all the processes' devices; None when unknown."""
    peak = peak_flops(name, precision)
    if not tokens_per_s or peak is None:
        return None
    return 6 * params * tokens_per_s / (peak * processes)


def training_stats(model: torch.nn.Module, runtime: Any, tokens_per_s: float | None) -> dict[str, Any]:
    """The metrics fields this module adds (see the module docstring)."""
    params = sum(p.numel() for p in model.parameters())  # global sizes, also for FSDP2 DTensors
    name = device_name(runtime.device)
    return {
        "device": name,
        "processes": runtime.world,
        "precision": runtime.precision,
        "params": params,
        "peak_memory_gib": round(peak_memory_gib(runtime.device), 3),
        "flops_per_token": 6 * params,
        "mfu": mfu(tokens_per_s, params, name, runtime.precision, runtime.world),
    }
