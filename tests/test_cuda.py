"""CUDA-only tests: a real 4-bit base, a real out-of-memory error under a memory cap. They skip
without CUDA (CI has none); bench/gpu.py runs them on a GPU machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lrsweep.config import LoraSettings, ModelConfig, TrainConfig
from lrsweep.data import batches
from lrsweep.devices import parse_devices
from lrsweep.memory import free_memory, measure_memory, memory_line, reset_peak_memory
from lrsweep.models import BaseModel, attach_lora, detach_lora, load_base_model
from lrsweep.oom import Attempt, run_with_retry
from lrsweep.training import Loop, Precision, TrainResult, make_optimizer, train


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
CUDA = TrainConfig(device="cuda", seq_len=64)


def _train(base: BaseModel, blocks: torch.Tensor, attempt: Attempt, steps: int) -> TrainResult:
    torch.manual_seed(0)
    peft = attach_lora(base, LoraSettings(r=8, dropout=0.0), seed=0)
    try:
        return train(
            peft,
            make_optimizer(peft, attempt.train),
            attempt.batches(batches(blocks, attempt.original_batch_size, seed=0)),
            [1e-3] * steps,
            Loop(Precision(base.device, base.dtype), attempt.train.grad_accum, 1.0),
            progress=False,
        )
    finally:
        detach_lora(peft)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install 'lrsweep[gpu]')")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_kbit_tiny_trains_on_cuda(quantization: str) -> None:
    cfg = ModelConfig(path="tiny", quantization=quantization, gradient_checkpointing=True)
    base = load_base_model(cfg, CUDA)
    assert base.quantization == quantization and base.model.is_quantized
    assert base.device.type == "cuda"
    blocks = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    curves = []
    for _ in range(2):  # two trials on one base, prepared once
        result = _train(base, blocks, Attempt(TrainConfig(batch_size=4)), steps=4)
        losses = [r.loss for r in result.records]
        assert result.stop_reason is None and all(torch.isfinite(torch.tensor(losses)))
        curves.append(losses)
    assert curves[1] == pytest.approx(curves[0], rel=1e-3), "the base came back unchanged"
    assert not hasattr(base.model, "peft_config")


def test_real_oom_under_a_memory_cap_is_recovered() -> None:
    base = load_base_model(ModelConfig(path="tiny"), TrainConfig(device="cuda", seq_len=512))
    device = base.device
    blocks = torch.randint(0, 256, (1024, 512), generator=torch.Generator().manual_seed(0))
    free_memory(device)
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_reserved(device) + 128 * 2**20
    retries: list[Attempt] = []
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        result, used = run_with_retry(
            lambda a: _train(base, blocks, a, steps=2),
            TrainConfig(batch_size=512, grad_accum=1),
            device=device,
            on_retry=retries.append,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert retries and used.retries == len(retries) and used.train.batch_size < 512
    assert used.train.batch_size * used.train.grad_accum == 512
    assert "out of memory" in (used.reason or "").lower()
    fresh = _train(base, blocks, Attempt(used.train, parts=used.parts), steps=2)
    assert [r.loss for r in result.records] == pytest.approx(
        [r.loss for r in fresh.records], rel=1e-3
    )


def test_memory_line_on_cuda() -> None:
    device = torch.device("cuda")
    reset_peak_memory(device)
    x = torch.ones(2**20, device=device)
    use = measure_memory(device)
    assert use.total and use.peak_allocated and use.peak_allocated >= x.numel() * 4
    line = memory_line(use)
    assert line.startswith("peak memory ") and "GiB on cuda" in line and "\n" not in line


def test_parse_devices_sees_the_gpus() -> None:
    count = torch.cuda.device_count()
    assert parse_devices("cuda:0x4") == ["cuda:0"] * 4
    assert parse_devices(f"cuda:{count - 1}", 2) == [f"cuda:{count - 1}"] * 2


def test_measure_first_steps_on_cuda() -> None:
    from lrsweep.memory import measure_first_steps

    train_cfg = TrainConfig(device="cuda", seq_len=128, batch_size=4)
    base = load_base_model(ModelConfig(path="tiny"), train_cfg)
    blocks = torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    use, attempt = measure_first_steps(base, LoraSettings(r=4), train_cfg, blocks)
    assert torch.equal(rng, torch.get_rng_state())
    assert use.peak_reserved and use.peak_reserved > 0 and attempt.train == train_cfg
    assert "GiB on cuda" in memory_line(use) and not hasattr(base.model, "peft_config")
