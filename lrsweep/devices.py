"""Devices: the ``--devices`` spelling of the worker layout (memory is ``lrsweep.memory``).

``--devices`` is a comma-separated list of ``cpu``, ``mps``, ``cuda`` or ``cuda:N``; an entry
may carry a repeat count, ``cuda:0x4`` (or ``cuda:0*4``, quoted in a shell) for four workers on
one GPU. ``cuda:0x2,cuda:1x2`` puts two workers on each of two GPUs.
"""

from __future__ import annotations

import re

import torch

from lrsweep.errors import ConfigError


_ENTRY = re.compile(r"^(cpu|mps|cuda(?::(\d+))?)(?:[x*](\d+))?$")


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
