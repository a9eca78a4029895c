"""What a fine-tune cost the hardware: the device, peak memory and model FLOP utilisation (issue 21).

In:  the finished output folder of trainers.sft (its train_metrics.json and weights), the processes and
     precision it ran with, and the peak memory the launcher measured (trainers/launch.py).
Out: the same train_metrics.json with these fields added (once: a reused folder keeps its first numbers):
     device (cpu or the GPU's name), processes, precision, params, step_time_s, peak_memory_gib,
     flops_per_token and mfu, the share of the devices' peak dense bf16 rate the training reached (None
     where that peak is unknown: CPUs, fp32 on GPUs, GPUs not in PEAK_BF16_FLOPS).

Peak memory: CUDA, the most memory torch allocated on a GPU (the largest over the processes); CPU, the peak
resident set of the training process (in-process training: the flow's process, so what it held before
counts too). Under torchrun each child runs `python -m trainers.perf` (trainers.sft.main, then its peak
written to $VARIATIONAL_PEAK_DIR), since only the process itself can read its CUDA peak.

FLOPs per trained token: 6 x parameters (forward 2, backward 4); attention and the recomputed forward of
gradient checkpointing are left out, so this is the usual MFU, not the hardware utilisation.
This module sits outside the fine-tune stages' code (their fingerprints): measuring changes no weights.
"""

from __future__ import annotations

import json
import os
import resource
import struct
from pathlib import Path
from typing import Any

import torch

PEAK_DIR_ENV = "VARIATIONAL_PEAK_DIR"
# Dense bf16 tensor-core peak per GPU (vendor data sheets, without sparsity), matched in the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
FIELDS = ("device", "processes", "precision", "params", "step_time_s", "peak_memory_gib", "mfu")


def training_device() -> torch.device:
    """The device a trainer process uses (trainers/distributed.py `start`)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device, children: bool = False) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20  # KiB on Linux


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


def saved_params(model_dir: Path) -> int:
    """Parameters in a saved HF folder, from the safetensors headers (a tied lm-head is stored once)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += int(torch.tensor(tensor["shape"]).prod()) if tensor["shape"] else 1
    return total


def complete(
    out_dir: Path, metrics: dict[str, Any], processes: int, precision: str, peak: float | None
) -> dict:
    """`metrics` and the folder's train_metrics.json with the FIELDS added, unless it has them already (a
    reused or resumed-and-finished folder keeps the numbers of the run that trained it)."""
    if all(k in metrics for k in FIELDS) or metrics.get("stopped"):
        return metrics
    name = device_name(training_device())
    params = saved_params(out_dir)
    steps = len(metrics.get("loss_curve") or []) or metrics.get("steps") or 1
    tokens_per_s = metrics.get("tokens_per_s")
    extra = {
        "device": name,
        "processes": processes,
        "precision": precision,
        "params": params,
        "step_time_s": metrics["tokens"] / tokens_per_s / steps if tokens_per_s else None,
        "peak_memory_gib": round(peak, 3) if peak is not None else None,
        "flops_per_token": 6 * params,
        "mfu": mfu(tokens_per_s, params, name, precision, processes),
    }
    metrics = {**metrics, **extra}
    path = Path(out_dir) / "train_metrics.json"
    if path.exists():  # the completion marker, extended in place (temp file, then rename)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=1))
        os.replace(tmp, path)
    return metrics


def children_peak(folder: Path) -> float | None:
    """The largest peak the torchrun children wrote (see `main`)."""
    peaks = [json.loads(p.read_text())["peak_memory_gib"] for p in Path(folder).glob("peak-*.json")]
    return max(peaks) if peaks else None


def main() -> None:
    """`python -m trainers.perf SFT-ARGS` (what torchrun runs): trainers.sft.main, then this process's peak
    memory written to $VARIATIONAL_PEAK_DIR/peak-<rank>.json for the launcher."""
    from trainers import sft

    device = training_device()
    try:
        sft.main()
    finally:
        if folder := os.environ.get(PEAK_DIR_ENV):
            rank = os.environ.get("RANK", "0")
            (Path(folder) / f"peak-{rank}.json").write_text(
                json.dumps({"peak_memory_gib": peak_memory_gib(device)})
            )


if __name__ == "__main__":
    main()
