"""Devices: the ``--devices`` spelling of the worker layout, and the memory a run needs
against what its device has.

``--devices`` is a comma-separated list of ``cpu``, ``mps``, ``cuda`` or ``cuda:N``; an entry
may carry a repeat count, ``cuda:0x4`` (or ``cuda:0*4``, quoted in a shell) for four workers on
one GPU. ``cuda:0x2,cuda:1x2`` puts two workers on each of two GPUs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import torch

from lrsweep.errors import ConfigError


if TYPE_CHECKING:
    from lrsweep.config import LoraSettings, TrainConfig
    from lrsweep.context import Context
    from lrsweep.models import BaseModel
    from lrsweep.oom import Attempt


_ENTRY = re.compile(r"^(cpu|mps|cuda(?::(\d+))?)(?:[x*](\d+))?$")
GIB = 2**30


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(
    text: str, workers: int | None = None, *, cuda_devices: int | None = None
) -> list[str]:
    """One device per worker from a ``--devices`` value.

    With ``workers`` None there is one worker per listed entry (repeats expanded); otherwise
    the entries are dealt out round robin to ``workers`` workers, and listing more entries than
    workers is an error. CUDA indices are checked against ``cuda_devices`` (default: what torch
    sees here). Raises :class:`ConfigError` ("--devices ...: ...") on anything else.
    """
    count = _cuda_count() if cuda_devices is None else cuda_devices
    devices: list[str] = []
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or not all(entries):
        raise ConfigError(
            f"--devices {text}: give a comma-separated list such as cuda:0,cuda:1 or cuda:0x4"
        )
    for entry in entries:
        match = _ENTRY.match(entry.lower())
        if match is None:
            raise ConfigError(
                f"--devices {entry}: not a device; use cpu, mps, cuda or cuda:N, "
                "optionally repeated as cuda:0x4"
            )
        name, index, repeat = match.groups()
        times = int(repeat) if repeat is not None else 1
        if times < 1:
            raise ConfigError(f"--devices {entry}: the repeat count must be at least 1")
        if name.startswith("cuda"):
            if count == 0:
                raise ConfigError(f"--devices {entry}: CUDA is not available on this machine")
            if index is not None and int(index) >= count:
                raise ConfigError(
                    f"--devices {entry}: this machine has {count} CUDA device"
                    f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})"
                )
        if name == "mps" and cuda_devices is None and not torch.backends.mps.is_available():
            raise ConfigError(f"--devices {entry}: MPS is not available on this machine")
        devices += [name] * times
    if workers is None:
        return devices
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    if len(devices) > workers:
        raise ConfigError(
            f"--devices {text}: {len(devices)} devices for {workers} worker"
            f"{'s' if workers > 1 else ''}; give --workers {len(devices)} or fewer devices"
        )
    return [devices[i % len(devices)] for i in range(workers)]


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
    usable = use.total * use.fraction
    share = use.peak_reserved / usable
    cap = f", capped at {use.fraction:.0%}" if use.fraction < 1 else ""
    line = (
        f"peak memory {use.peak_reserved / GIB:.1f} GiB "
        f"({use.peak_allocated / GIB:.1f} GiB in tensors) of {usable / GIB:.1f} GiB on "
        f"{use.device}{f' ({use.name}{cap})' if use.name else cap}: {share:.0%}"
        f"; {use.free / GIB:.1f} GiB free on the device now"  # type: ignore[operator]
    )
    if share > 0.9:
        line += "; close to the limit: an out-of-memory error halves the micro-batch"
    return line


def measure_first_steps(
    base: BaseModel,
    lora: LoraSettings,
    train_cfg: TrainConfig,
    blocks: torch.Tensor,
    *,
    seed: int = 0,
    steps: int = 2,
) -> tuple[MemoryUse, Attempt]:
    """The peak memory of ``steps`` optimizer steps on a throwaway adapter, with the
    out-of-memory retry, before a range test or a sweep starts: what every later step of the
    same shape will need, and the shape that fits (print ``memory_line`` of the first, use
    ``.train`` of the second). On a device that cannot tell its memory nothing runs. The base
    comes back clean, the torch RNG state as it was."""
    from lrsweep.data import batches
    from lrsweep.models import attach_lora, detach_lora
    from lrsweep.oom import Attempt, free_memory, run_with_retry
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
