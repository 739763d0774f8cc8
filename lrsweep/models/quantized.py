"""Quantised bases (``model.quantization = "4bit"`` or ``"8bit"``, bitsandbytes on CUDA): loaded
with transformers' ``BitsAndBytesConfig`` and prepared once with peft's
``prepare_model_for_kbit_training``. Per-trial adapters attach and detach the same way as on
any base (peft's bitsandbytes LoRA layers; ``unload`` puts the quantised Linear layers back as
they were, nothing is merged or dequantised)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from lrsweep.config import ModelConfig
from lrsweep.errors import ModelError, first_line
from lrsweep.models.frozen import freeze
from lrsweep.models.sources import (
    BUNDLED_NAME,
    OFFLINE,
    bundled_gguf,
    check_folder,
    gguf_cache_dir,
    gguf_file,
    load_gguf,
    load_tokenizer,
    model_folder,
    tiny_model,
    write_cache,
)
from lrsweep.models.tokenizers import ByteTokenizer, Tokenizer


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's recipe for ``4bit`` (NF4, double quantisation, compute in the training dtype),
    LLM.int8 for ``8bit``."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"no bitsandbytes config for quantization {quantization!r}")


def load_quantized(
    model: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[PreTrainedModel, Tokenizer, str]:
    """Quantise while loading, as transformers does it: from a saved folder. A model that only
    exists in memory (tiny, a GGUF without its cache) is saved to a temporary folder first."""
    path = model.path
    with tempfile.TemporaryDirectory(prefix="lrsweep-kbit-") as tmp:
        folder: Path | None = None
        if path == "bundled" or path.endswith(".gguf"):
            file = bundled_gguf() if path == "bundled" else gguf_file(path)
            name = BUNDLED_NAME if path == "bundled" else path
            folder = gguf_cache_dir(file)
            if not folder.is_dir():
                net, tokenizer = load_gguf(file)  # converts and writes the cache
                if not folder.is_dir():
                    folder = Path(tmp) / "model"
                    write_cache(net, tokenizer, folder)
                del net
        elif path == "tiny":
            folder, name = Path(tmp) / "model", "tiny"
            write_cache(tiny_model(seed), ByteTokenizer(), folder)
        else:
            folder, name = model_folder(path), path
        check_folder(folder)
        net = _from_pretrained_kbit(folder, model, dtype, device)
        tokenizer = load_tokenizer(folder)
    prepare_kbit(net, model.gradient_checkpointing)
    return net, tokenizer, name


def _from_pretrained_kbit(
    folder: Path, model: ModelConfig, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    place: int | str = device.type
    if device.type == "cuda":
        place = device.index if device.index is not None else torch.cuda.current_device()
    kwargs: dict[str, Any] = {
        "quantization_config": bnb_config(model.quantization, dtype),
        "dtype": dtype,  # of the weights that stay unquantised (embeddings, norms, lm_head)
        "device_map": {"": place},
        **OFFLINE,
    }
    if model.attention != "auto":
        kwargs["attn_implementation"] = model.attention
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise ModelError(
            f"model.quantization = {model.quantization}: cannot load {folder} ({first_line(err)})"
        ) from None


def prepare_kbit(net: PreTrainedModel, ckpt: bool) -> None:
    """peft's ``prepare_model_for_kbit_training`` (freezes everything, casts the unquantised
    float16/bfloat16 weights to float32), once per loaded base, never per trial; then the same
    non-reentrant checkpointing as an unquantised base."""
    prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    freeze(net, ckpt)
