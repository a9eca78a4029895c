"""The training loop's view of its processes: 1 in-process, or N under torchrun (FSDP2 over NCCL or gloo).

In:  the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK; none for a plain process) and a TrainConfig.
Out: a `Runtime`: rank, world size, device, the chosen precision (and why), the few collectives the loop
     needs (`sum`, `any`, `barrier`); `shard` wraps a model in FSDP2 `fully_shard` when world > 1.

Precision (`mixed_precision`): weights and optimizer state stay fp32; bf16 means autocast of the forward.
`auto` is bf16 on CUDA and, on CPU, only where the CPU computes bf16 natively (AVX512-BF16 or AMX):
measured on an AVX2-only AMD EPYC, a bf16 matmul runs at 0.4 GFLOP/s against 12 GFLOP/s in fp32 (issue 11
item 2), while on a CPU with AMX bf16 was 1.6x faster per step. An explicit `bf16` is honoured everywhere,
with a warning where the CPU lacks it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

SLOW_BF16_WARNING = "bf16 on a CPU without AVX512-BF16/AMX is emulated: about 30x slower than fp32"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles, as torch's cpuinfo sees them (get_cpu_capability() only says AVX2/AVX512)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def choose_precision(setting: str, cuda: bool, native_bf16: bool) -> tuple[str, str]:
    """(`bf16` | `fp32`, the reason) for `mixed_precision: setting` on this device.

    `native_bf16`: the device computes bf16 at full speed (CUDA: torch.cuda.is_bf16_supported())."""
    device = "CUDA" if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    has = "has" if native_bf16 else "lacks"
    if setting == "no":
        return "fp32", "mixed_precision: no"
    if setting == "bf16":
        if native_bf16:
            return "bf16", f"mixed_precision: bf16; {device} {has} native bf16"
        return "bf16", f"mixed_precision: bf16 forced; {device} {has} native bf16 -> {SLOW_BF16_WARNING}"
    if setting != "auto":
        raise ValueError(f"mixed_precision {setting!r}: use auto, bf16 or no")
    if native_bf16:
        return "bf16", f"mixed_precision: auto; {device} {has} native bf16"
    return "fp32", f"mixed_precision: auto; {device} {has} native bf16, and emulated bf16 is ~30x slower"


def resolve_processes(setting: int | str) -> int:
    """`num_processes: auto` = one per visible GPU on CUDA, 1 on CPU (gloo processes would split 2 cores)."""
    if setting == "auto":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return int(setting)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    precision: str  # "bf16" | "fp32"
    reason: str  # why that precision, for the log

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64, so token counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one: decisions that start collectives must agree."""
        return self.sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def start(mixed_precision: str) -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU), pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    native = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    precision, reason = choose_precision(mixed_precision, cuda, native)
    return Runtime(rank, world, device, precision, reason)


def close() -> None:
    """Leave the process group (torchrun children call this before exiting)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """FSDP2: each decoder layer (the model's `_no_split_modules` classes) is one shard group, the rest
    (embeddings, tied lm-head, final norm) the root group. Parameters become DTensors; the module keeps
    its class, so the loop calls it as before. A no-op for one process."""
    if runtime.world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def gradient_sync(model: torch.nn.Module, runtime: Runtime, last_micro_batch: bool) -> None:
    """Reduce-scatter gradients on the step's last backward only (the others accumulate locally)."""
    if runtime.world > 1:
        model.set_requires_gradient_sync(last_micro_batch)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to the global gradient norm; returns it. Under FSDP2 each process holds a shard of every
    gradient, so the per-shard norm is a partial DTensor: its full_tensor() is the norm over all of them."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
