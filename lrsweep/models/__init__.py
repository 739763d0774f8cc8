"""Base models and LoRA adapters.

One base model is loaded per process and shared by every trial (:func:`load_base_model`); the
modules of this package each do one part of it:

- ``sources``: where the weights come from (tiny, the bundled GGUF and its cache, GGUF files,
  folders, Hub IDs);
- ``tokenizers``: the :class:`Tokenizer` protocol and its two kinds;
- ``frozen``: freezing, activation checkpointing and the attention implementation;
- ``quantized``: 4-bit and 8-bit bases through bitsandbytes;
- ``lora``: attaching and detaching the per-trial adapters.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lrsweep.config import ModelConfig, TrainConfig
from lrsweep.errors import ModelError
from lrsweep.models.frozen import is_checkpointing, prepare, set_attention
from lrsweep.models.lora import attach_lora, detach_lora, load_trainable_state, trainable_state
from lrsweep.models.quantized import load_quantized
from lrsweep.models.sources import (
    BUNDLED_NAME,
    cache_root,
    gguf_cache_dir,
    hub_snapshot,
    load_source,
    write_cache,
)
from lrsweep.models.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer


__all__ = [
    "BUNDLED_NAME",
    "BaseModel",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "attach_lora",
    "cache_root",
    "check_model_settings",
    "detach_lora",
    "gguf_cache_dir",
    "hub_snapshot",
    "is_checkpointing",
    "load_base_model",
    "load_trainable_state",
    "resolve_device",
    "resolve_dtype",
    "trainable_state",
    "write_cache",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: Tokenizer
    name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"  # model.quantization: none, 4bit or 8bit


def resolve_device(train: TrainConfig) -> torch.device:
    want = train.device
    if want == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"train.device = {want} but CUDA is not available; use auto or cpu")
        index, count = torch.device(want).index, torch.cuda.device_count()
        if index is not None and index >= count:
            raise ModelError(f"train.device = {want} but this machine has {count} CUDA devices")
    if want == "mps" and not torch.backends.mps.is_available():
        raise ModelError("train.device = mps but MPS is not available; use auto or cpu")
    return torch.device(want)


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    if train.dtype == "auto":
        if device.type == "cuda":
            supported = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if supported else torch.float16
        return torch.float32
    dtype = _DTYPES[train.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise ModelError("train.dtype = float16 needs CUDA (GradScaler); use float32 or bfloat16")
    return dtype


def _weight_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Frozen base weights are stored in the compute dtype for CUDA bf16 and for fp16 (halving
    their memory); otherwise (CPU/MPS bf16 included) they stay fp32 and bf16 is autocast's job."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and device.type == "cuda"):
        return dtype
    return torch.float32


def check_model_settings(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """What can be told about ``model.quantization`` and ``model.attention`` before any weight
    loads: one :class:`ModelError` line naming the setting and what to do."""
    if model.quantization != "none":
        key = f"model.quantization = {model.quantization}"
        if device.type != "cuda":
            raise ModelError(
                f"{key} needs a CUDA GPU (bitsandbytes) and this run is on {device.type}; "
                "use model.quantization = none here"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(f"{key} needs bitsandbytes: pip install 'lrsweep[gpu]'")
    if model.attention == "flash_attention_2":
        key = "model.attention = flash_attention_2"
        if device.type != "cuda":
            raise ModelError(f"{key} needs a CUDA GPU and this run is on {device.type}; use sdpa")
        if dtype == torch.float32:
            raise ModelError(f"{key} runs in float16 or bfloat16 only; set train.dtype = auto")
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelError(
                f"{key} needs the flash-attn package (pip install flash-attn); or use sdpa"
            )


def load_base_model(model: ModelConfig, train: TrainConfig, seed: int = 0) -> BaseModel:
    """The frozen base model on its device; ``seed`` only matters for ``tiny``."""
    device = resolve_device(train)
    dtype = resolve_dtype(train, device)
    check_model_settings(model, device, dtype)
    start = time.perf_counter()
    if model.quantization != "none":
        net, tokenizer, name = load_quantized(model, dtype, device, seed)
    else:
        net, tokenizer, name = load_source(model.path, seed)
        prepare(net, _weight_dtype(dtype, device), device, model.gradient_checkpointing)
        set_attention(net, model.attention)
    logger.info(
        "loaded %s in %.1f s on %s (%s%s)",
        name,
        time.perf_counter() - start,
        device,
        dtype,
        "" if model.quantization == "none" else f", {model.quantization} base",
    )
    return BaseModel(
        model=net,
        tokenizer=tokenizer,
        name=name,
        device=device,
        dtype=dtype,
        quantization=model.quantization,
    )
