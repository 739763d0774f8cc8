"""Memory: what a run used on its device (peak allocated and reserved on CUDA, the process
RSS on the CPU), handing cached memory back, and the check before a long run that its first
steps fit (the line ``find`` and ``sweep`` print, and the micro-batch that fits).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import torch


if TYPE_CHECKING:
    from lrsweep.config import LoraSettings, TrainConfig
    from lrsweep.context import Context
    from lrsweep.data import Examples
    from lrsweep.models import BaseModel
    from lrsweep.oom import Attempt


GIB = 2**30


@dataclass(frozen=True)
class MemoryUse:
    """Memory of this process on its device, in bytes (None where the device cannot tell)."""

    device: str
    peak_allocated: int | None  # tensors at their peak since reset_peak_memory
    peak_reserved: int | None  # the allocator's cache at its peak: what counts for OOM
    total: int | None  # the device's memory
    free: int | None  # free on the device now (other processes' use shows here)
    fraction: float = 1.0  # set_per_process_memory_fraction's cap
    rss: int = 0  # this process's resident memory (CPU)
    name: str = ""


def reset_peak_memory(device: torch.device | str) -> None:
    """Start measuring a peak (call before the first steps)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats(device)


def measure_memory(device: torch.device | str) -> MemoryUse:
    """What the steps since :func:`reset_peak_memory` needed, and what the device has."""
    device = torch.device(device)
    rss = psutil.Process().memory_info().rss
    if device.type != "cuda" or not torch.cuda.is_available():
        return MemoryUse(str(device), None, None, None, None, rss=rss)
    free, total = torch.cuda.mem_get_info(device)
    fraction = 1.0
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        fraction = float(torch.cuda.get_per_process_memory_fraction(device))
    return MemoryUse(
        device=str(device),
        peak_allocated=torch.cuda.max_memory_allocated(device),
        peak_reserved=torch.cuda.max_memory_reserved(device),
        total=total,
        free=free,
        fraction=fraction,
        rss=rss,
        name=torch.cuda.get_device_name(device),
    )


def memory_line(use: MemoryUse) -> str:
    """One line for ``find`` and ``sweep`` to print before the long part starts."""
    if use.total is None or use.peak_reserved is None:
        return f"peak memory: n/a on {use.device} (process RSS {use.rss / GIB:.1f} GiB)"
    assert use.peak_allocated is not None and use.free is not None  # set with total
    usable = use.total * use.fraction
    share = use.peak_reserved / usable
    cap = f", capped at {use.fraction:.0%}" if use.fraction < 1 else ""
    line = (
        f"peak memory {use.peak_reserved / GIB:.1f} GiB "
        f"({use.peak_allocated / GIB:.1f} GiB in tensors) of {usable / GIB:.1f} GiB on "
        f"{use.device}{f' ({use.name}{cap})' if use.name else cap}: {share:.0%}"
        f"; {use.free / GIB:.1f} GiB free on the device now"
    )
    if share > 0.9:
        line += "; close to the limit: an out-of-memory error halves the micro-batch"
    return line


def measure_first_steps(
    base: BaseModel,
    lora: LoraSettings,
    train_cfg: TrainConfig,
    blocks: torch.Tensor | Examples,
    *,
    seed: int = 0,
    steps: int = 2,
) -> tuple[MemoryUse, Attempt]:
    """The peak memory of ``steps`` optimizer steps on a throwaway adapter, with the
    out-of-memory retry, before a range test or a sweep starts: what every later step of the
    same shape will need, and the shape that fits (print ``memory_line`` of the first, use
    ``.train`` of the second). On a device that cannot tell its memory nothing runs. The base
    comes back clean, the torch RNG state as it was."""
    # Imported here: these run the steps, and oom and training use this module themselves.
    from lrsweep.data import batches
    from lrsweep.models import attach_lora, detach_lora
    from lrsweep.oom import Attempt, run_with_retry
    from lrsweep.training import Loop, Precision, make_optimizer, train

    if base.device.type != "cuda":
        return measure_memory(base.device), Attempt(train_cfg)

    def run(attempt: Attempt) -> MemoryUse:
        model = attach_lora(base, lora, seed)
        try:
            free_memory(base.device)
            reset_peak_memory(base.device)
            train(
                model,
                make_optimizer(model, attempt.train),
                attempt.batches(batches(blocks, train_cfg.batch_size, seed)),
                [0.0] * steps,  # LR 0: the memory of real steps, the adapter unchanged
                Loop(
                    Precision(base.device, base.dtype),
                    attempt.train.grad_accum,
                    train_cfg.max_grad_norm,
                ),
                progress=False,
            )
            return measure_memory(base.device)
        finally:
            detach_lora(model)

    with torch.random.fork_rng(devices=[base.device]):
        use, attempt = run_with_retry(run, train_cfg, device=base.device)
    free_memory(base.device)
    return use, attempt


def check_memory(ctx: Context) -> tuple[str | None, Attempt | None]:
    """On CUDA, before a range test or a sweep: the memory line to print and the shape that
    fits (:func:`measure_first_steps`); (None, None) elsewhere, where nothing is measured."""
    if ctx.base.device.type != "cuda":
        return None, None
    cfg = ctx.config
    use, fits = measure_first_steps(ctx.base, cfg.lora, cfg.train, ctx.blocks.train, seed=cfg.seed)
    return memory_line(use), fits


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since ``reset_peak_memory``, or the process RSS on CPU."""
    use = measure_memory(device)
    return (use.peak_allocated if use.peak_allocated is not None else use.rss) / 2**20


def free_memory(device: torch.device | str) -> None:
    """Collect what the failed attempt left (reference cycles of its frames included) and hand
    the CUDA allocator's cached blocks back."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
