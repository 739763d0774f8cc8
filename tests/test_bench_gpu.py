"""bench/gpu.py's CPU-checkable parts, so that the GPU run does not break on first contact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu
from lrsweep.config import ModelConfig, TrainConfig
from lrsweep.models import ByteTokenizer, load_base_model


ROOT = Path(__file__).resolve().parents[1]


def test_shapes_are_the_real_models() -> None:
    assert gpu.param_counts(gpu.llama8b_config(smoke=False)) == (8_030_261_248, 7_504_924_672)
    assert gpu.param_counts(gpu.smollm_config(smoke=False))[0] == 134_515_008


def test_random_checkpoint_loads_like_a_saved_model(tmp_path: Path) -> None:
    config = gpu.llama8b_config(smoke=True)
    gpu.write_random_model(config, tmp_path / "m", "cpu", shard_gib=50e-6)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "m" / s).is_file() for s in shards)
    base = load_base_model(ModelConfig(path=str(tmp_path / "m")), TrainConfig(device="cpu"))
    assert isinstance(base.tokenizer, ByteTokenizer)
    assert sum(p.numel() for p in base.model.parameters()) == gpu.param_counts(config)[0]
    norm = base.model.model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    assert 0.01 < base.model.lm_head.weight.std().item() < 0.03


def test_markdown_of_partial_results() -> None:
    results = {
        "env": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "versions": {}},
        "llama8b": {
            "quantization": "4bit",
            "seq_len": 2048,
            "micro_batch_1": {
                "step_s": 0.5,
                "tokens_per_s": 4096.0,
                "peak_reserved_gib": 9.1,
                "mfu_6n": 0.2,
                "attempt": {"micro_batch_size": 1},
            },
        },
        "overhead": {"error": "RuntimeError: boom"},
        "workers": "skipped: 10 s left, needs ~100 s",
    }
    text = gpu.markdown(results)
    assert "| 8B-shaped 4bit LoRA r=16, seq 2048, micro-batch 1 (1) | 0.5 s/step" in text
    assert "RuntimeError: boom" in text and "skipped" in text
    assert gpu.peak_flops("NVIDIA H200", None) == 989e12 and gpu.peak_flops("x", 100) == 1e14


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU line")
def test_without_a_gpu_it_says_so_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == [
        "bench/gpu.py: no CUDA GPU here, nothing measured (--cpu-smoke for a dry run)"
    ]


@pytest.mark.slow
def test_cpu_smoke_sections_run_without_an_error(tmp_path: Path) -> None:
    """The GPU run's code paths at toy sizes on the CPU, so that an lrsweep change that
    bench/gpu.py missed fails here, not in the GPU's few minutes (a renamed Attempt method and
    a study key that probe mode refuses both did)."""
    sections = ["llama8b", "overhead", "llama8b_cli"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu-smoke", "--out", str(tmp_path)]
        + ["--only", ",".join(sections)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    for section in sections:
        assert isinstance(results[section], dict), results[section]  # not "skipped: ..."
        assert "error" not in results[section], results[section].get("traceback")
    assert results["llama8b"]["oom_path"]["retries"], "the out-of-memory path was not taken"
    assert results["llama8b_cli"]["sweep"]["exit_code"] == 0, results["llama8b_cli"]["sweep"]
