"""Per-trial LoRA adapters on the shared base: :func:`attach_lora` wraps it in a fresh, seeded
adapter, :func:`detach_lora` unwraps it again, leaving the frozen base weights untouched."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from lrsweep.config import ALL_LINEAR, LoraSettings
from lrsweep.errors import ModelError
from lrsweep.models.frozen import is_checkpointing


if TYPE_CHECKING:
    from lrsweep.models import BaseModel


def attach_lora(base: BaseModel, lora: LoraSettings, seed: int) -> PeftModel:
    """Wrap the shared base in a fresh, seeded adapter (only its parameters are trainable)."""
    net = base.model
    if hasattr(net, "peft_config"):
        raise RuntimeError("the base model still carries an adapter; call detach_lora first")
    all_linear = lora.target_modules == [ALL_LINEAR]
    if not all_linear:
        _check_targets(net, lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=ALL_LINEAR if all_linear else list(lora.target_modules),
        use_rslora=lora.rslora,
        task_type=TaskType.CAUSAL_LM,
    )
    checkpointing = is_checkpointing(net)
    if checkpointing:
        # peft registers the input-grad hook again on every wrap; without this one more hook
        # would pile up on the embeddings per trial.
        net.disable_input_require_grads()
    devices = [base.device.index or 0] if base.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # peft still reads the deprecated is_gradient_checkpointing property
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(net, config)
        except ValueError as err:
            if "is not supported" not in str(err):
                raise
            # A module that is there but is no layer peft can adapt (a whole MLP block).
            raise ModelError(
                f"lora.target_modules: {', '.join(lora.target_modules)} are not all layers "
                f"peft can adapt (Linear, Embedding, Conv); the model's Linear modules are "
                f"{_linear_names(net)}"
            ) from None
    if checkpointing and not getattr(net, "_require_grads_hooks", None):
        net.enable_input_require_grads()
    return peft_model


def _check_targets(net: nn.Module, targets: list[str]) -> None:
    modules = dict(net.named_modules())
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise ModelError(
            f"lora.target_modules: no module named {', '.join(repr(t) for t in missing)} in the "
            f"model; its Linear modules are {_linear_names(net)}"
        )


def _linear_names(net: nn.Module) -> str:
    names = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    return ", ".join(sorted(names)[:10])


def detach_lora(model: PeftModel) -> PreTrainedModel:
    """Put the original Linear layers back and return the bare base model. The caller must drop
    its own references to the PeftModel (and its optimizer) for the adapter to be freed."""
    base = model.unload()
    if hasattr(base, "peft_config"):  # peft 0.21 drops it itself; older versions did not
        del base.peft_config
    base.requires_grad_(False)
    return base


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
        raise ValueError(
            f"state mismatch: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
