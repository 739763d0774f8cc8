"""A base model made ready for adapters: frozen, in eval mode, without a KV cache, with
non-reentrant activation checkpointing and the attention implementation asked for."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from lrsweep.errors import ModelError, first_line


def prepare(net: PreTrainedModel, dtype: torch.dtype, device: torch.device, ckpt: bool) -> None:
    cast(nn.Module, net).to(device=device, dtype=dtype)  # transformers' to() stub takes no self
    freeze(net, ckpt)


def freeze(net: PreTrainedModel, ckpt: bool) -> None:
    net.requires_grad_(False)
    net.eval()
    net.config.use_cache = False  # a KV cache is useless in training and costs memory
    if ckpt:
        _enable_checkpointing(net)


def _enable_checkpointing(net: PreTrainedModel) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(kwargs)
    else:  # transformers before activation_checkpointing_enable (5.17 has only this name)
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Frozen embeddings give inputs without grad; checkpointed blocks then drop the LoRA grads.
    if not getattr(net, "_require_grads_hooks", None):
        net.enable_input_require_grads()


def is_checkpointing(net: nn.Module) -> bool:
    """Whether activation checkpointing is on (any transformers 5 version)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in net.modules())


def set_attention(net: PreTrainedModel, attention: str) -> None:
    if attention == "auto":
        return
    try:
        net.set_attn_implementation(attention)
    except (ImportError, ValueError) as err:
        raise ModelError(f"model.attention = {attention}: {first_line(err)}") from None
