"""Tests for lrsweep.devices: the --devices spelling and the memory line (pure, no GPU)."""

from __future__ import annotations

import pytest
import torch

from lrsweep.devices import parse_devices
from lrsweep.errors import ConfigError, LrsweepError
from lrsweep.memory import GIB, MemoryUse, measure_memory, memory_line


def test_lists_and_repeats() -> None:
    assert parse_devices("cuda:0,cuda:1", cuda_devices=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:0x4", cuda_devices=1) == ["cuda:0"] * 4
    assert parse_devices("cuda:0*2, cuda:1x2", cuda_devices=2) == [
        "cuda:0",
        "cuda:0",
        "cuda:1",
        "cuda:1",
    ]
    assert parse_devices("CUDA:1", cuda_devices=2) == ["cuda:1"]
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cpux3") == ["cpu"] * 3
    assert parse_devices("cuda", cuda_devices=1) == ["cuda"]


def test_dealt_to_workers() -> None:
    assert parse_devices("cuda:0", 4, cuda_devices=1) == ["cuda:0"] * 4
    assert parse_devices("cuda:0,cuda:1", 4, cuda_devices=2) == ["cuda:0", "cuda:1"] * 2
    assert parse_devices("cuda:0x2", 2, cuda_devices=1) == ["cuda:0", "cuda:0"]
    with pytest.raises(ConfigError, match=r"^--devices cuda:0x4: 4 devices for 2 workers"):
        parse_devices("cuda:0x4", 2, cuda_devices=1)
    with pytest.raises(ConfigError, match="--workers 0"):
        parse_devices("cpu", 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo", r"^--devices foo: not a device; use cpu, mps, cuda or cuda:N"),
        ("cuda:0,gpu1", r"^--devices gpu1: not a device"),
        ("cuda:-1", r"^--devices cuda:-1: not a device"),
        ("cuda:0x", r"^--devices cuda:0x: not a device"),
        ("cuda:0x0", r"^--devices cuda:0x0: the repeat count must be at least 1"),
        ("", r"^--devices : give a comma-separated list"),
        ("cuda:0,,cuda:1", r"give a comma-separated list"),
        ("cuda:2", r"^--devices cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"),
    ],
)
def test_bad_spellings(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_devices(text, cuda_devices=2)
    assert isinstance(info.value, LrsweepError) and "\n" not in str(info.value)


def test_cuda_without_cuda() -> None:
    with pytest.raises(ConfigError, match="^--devices cuda:0: CUDA is not available"):
        parse_devices("cuda:0", cuda_devices=0)
    if not torch.cuda.is_available():  # what torch tells about this machine
        with pytest.raises(ConfigError, match="CUDA is not available"):
            parse_devices("cuda:0x2", 2)


def test_memory_line() -> None:
    cpu = MemoryUse("cpu", None, None, None, None, rss=3 * GIB // 2)
    assert memory_line(cpu) == "peak memory: n/a on cpu (process RSS 1.5 GiB)"
    gpu = MemoryUse(
        "cuda:0",
        peak_allocated=9 * GIB,
        peak_reserved=10 * GIB,
        total=80 * GIB,
        free=60 * GIB,
        fraction=0.3,
        name="NVIDIA H100",
    )
    line = memory_line(gpu)
    assert line == (
        "peak memory 10.0 GiB (9.0 GiB in tensors) of 24.0 GiB on cuda:0 (NVIDIA H100, capped "
        "at 30%): 42%; 60.0 GiB free on the device now"
    )
    full = memory_line(MemoryUse("cuda:0", 70 * GIB, 75 * GIB, 80 * GIB, 4 * GIB))
    assert "94%" in full and "close to the limit" in full and "\n" not in full


def test_measure_memory_here() -> None:
    use = measure_memory("cpu")
    assert use.rss > 0 and use.total is None
    assert memory_line(use).startswith("peak memory: n/a on cpu")


def test_measure_first_steps_on_cpu_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrsweep import training
    from lrsweep.config import LoraSettings, ModelConfig, TrainConfig
    from lrsweep.memory import measure_first_steps
    from lrsweep.models import load_base_model

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing to measure on the CPU")

    monkeypatch.setattr(training, "train", no_training)
    train_cfg = TrainConfig(device="cpu", batch_size=4)
    base = load_base_model(ModelConfig(path="tiny"), train_cfg)
    use, attempt = measure_first_steps(base, LoraSettings(), train_cfg, torch.zeros(8, 16))
    assert memory_line(use).startswith("peak memory: n/a on cpu")
    assert attempt.train == train_cfg and attempt.retries == 0


def test_a_cuda_index_past_the_machine_s_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.device = cuda:7 on a machine with 2 GPUs (faked: this one has none)."""
    from lrsweep.config import TrainConfig
    from lrsweep.errors import ModelError
    from lrsweep.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ModelError, match="cuda:7 but this machine has 2 CUDA devices"):
        resolve_device(TrainConfig(device="cuda:7"))
    assert resolve_device(TrainConfig(device="cuda:1")) == torch.device("cuda:1")
