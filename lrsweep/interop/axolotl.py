"""Axolotl's YAML config (``axolotl train config.yml``).

Its cosine with ``cosine_min_lr_ratio`` is transformers' cosine_with_min_lr formula (Axolotl's
own ``get_cosine_schedule_with_min_lr``). Its ``warmup_ratio`` rounds down (int(ratio x total)),
where lrsweep's trials round up, so a run of known length gets the exact ``warmup_steps``;
the two keys exclude each other in its schema.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lrsweep.config import ALL_LINEAR
from lrsweep.errors import ConfigError
from lrsweep.interop import (
    ADAMW_KEYS,
    IGNORED,
    Planned,
    UserRun,
    length,
    map_keys,
    optimizer,
    set_dtype,
    tool_defaults,
)


# The epochs key and its default (the run length when max_steps is not set).
EPOCHS = ("num_epochs", 1.0)
# Axolotl's defaults for the keys a config leaves out, from its schema and config reference
# (docs/config-reference.qmd; src/axolotl/utils/schemas/{training,config,peft}.py):
# micro_batch_size 1, gradient_accumulation_steps 1, sequence_len 512, lora_dropout 0.0.
# lora_r and lora_alpha have none (None, which peft refuses), so lrsweep's stay.
DEFAULTS = {
    "train.batch_size": 1,
    "train.grad_accum": 1,
    "train.seq_len": 512,
    "lora.dropout": 0.0,
}


HANDLED = (
    "learning_rate",
    "lr_scheduler",
    "lr_scheduler_kwargs",
    "cosine_min_lr_ratio",
    "warmup_ratio",
    "warmup_steps",
    "max_steps",
    "num_epochs",
    "optimizer",
    "bf16",
    "fp16",
    "adapter",
    "load_in_4bit",
    "load_in_8bit",
    "lora_target_modules",
    "lora_target_linear",
    "datasets",
    "chat_template",
    "train_on_inputs",
    "flash_attention",
    "sdp_attention",
    "batch_size",
)
MAPPING: dict[str, Any] = {
    **ADAMW_KEYS,
    "base_model": "model.path",
    "gradient_checkpointing": ("model.gradient_checkpointing", lambda v: bool(v)),
    "sequence_len": "train.seq_len",
    "sample_packing": "data.packing",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "peft_use_rslora": "lora.rslora",
    "loraplus_lr_ratio": "train.loraplus_lr_ratio",
    "tokenizer_type": ("", lambda v: None),
    "model_type": ("", lambda v: None),
    "base_model_config": ("", lambda v: None),
    "strict": ("", lambda v: None),
    "dataset_prepared_path": ("", lambda v: None),
    "pad_to_sequence_len": ("", lambda v: None),
    "lora_modules_to_save": ("", lambda v: None),
    "lora_fan_in_fan_out": ("", lambda v: None),
    "xformers_attention": ("", lambda v: None),
}
# The dataset types lrsweep reads, and the format they are.
DATASET_TYPES = {"alpaca": "prompt_completion", "chat_template": "chat", "completion": "text"}


def read(raw: dict[str, Any], folder: Path, run: UserRun) -> None:
    map_keys(raw, run, MAPPING, IGNORED, HANDLED)
    _batch(raw, run)
    tool_defaults(run, DEFAULTS)
    length(run, raw.get("max_steps"), raw.get(*EPOCHS))
    set_dtype(run, raw)
    if raw.get("load_in_4bit") or raw.get("adapter") == "qlora":
        run.values["model.quantization"] = "4bit"
    elif raw.get("load_in_8bit"):
        run.values["model.quantization"] = "8bit"
    if raw.get("adapter") not in (None, "lora", "qlora"):
        run.notes.append(f"adapter: {raw['adapter']} is not LoRA; lrsweep measures LoRA")
    if raw.get("lora_target_linear"):
        run.values["lora.target_modules"] = [ALL_LINEAR]
    elif isinstance(targets := raw.get("lora_target_modules"), (list, str)):
        run.values["lora.target_modules"] = [targets] if isinstance(targets, str) else targets
    if raw.get("flash_attention"):
        run.values["model.attention"] = "flash_attention_2"
    elif raw.get("sdp_attention"):
        run.values["model.attention"] = "sdpa"
    if raw.get("train_on_inputs"):
        run.values["data.train_on"] = "all"
    template = raw.get("chat_template")
    if template not in (None, "tokenizer_default"):
        run.notes.append(
            f"chat_template: {template} is Axolotl's own template; lrsweep uses the tokenizer's "
            "(or data.chat_template)"
        )
    optimizer(run, "optimizer", raw.get("optimizer"))
    _dataset(raw.get("datasets"), folder, run)


def _batch(raw: dict[str, Any], run: UserRun) -> None:
    """Axolotl wants two of micro_batch_size, gradient_accumulation_steps and batch_size (the
    total); the third is derived from them on one GPU (its normalize_config:
    gradient_accumulation_steps = batch_size // micro_batch_size)."""
    total, micro, accum = (
        raw.get(k) for k in ("batch_size", "micro_batch_size", "gradient_accumulation_steps")
    )
    if not isinstance(total, int) or total < 1:
        return
    if isinstance(micro, int) and micro > 0 and not accum:
        run.values["train.grad_accum"] = max(1, total // micro)
    elif isinstance(accum, int) and accum > 0 and not micro:
        run.values["train.batch_size"] = max(1, total // accum)


def _dataset(datasets: Any, folder: Path, run: UserRun) -> None:
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise ConfigError("datasets: Axolotl's config needs a list of {path, type} entries")
    first = datasets[0]
    if len(datasets) > 1:
        run.notes.append(f"datasets: lrsweep measures on the first of {len(datasets)} ({first})")
    path = str(first.get("path", ""))
    local = folder / path
    run.values["data.path"] = str(local) if path and local.exists() else path
    kind = first.get("type", "alpaca")
    if not isinstance(kind, str) or kind not in DATASET_TYPES:
        # A mapping is Axolotl's custom prompt format ({field_instruction: ..., format: ...}).
        what = "a custom format (a mapping)" if isinstance(kind, dict) else kind
        raise ConfigError(
            f"datasets[0].type: {what} is not one lrsweep reads "
            f"({', '.join(DATASET_TYPES)}); convert the rows to one of them"
        )
    run.values["data.format"] = DATASET_TYPES[kind]
    if kind == "completion":
        run.values["data.text_field"] = first.get("field", "text")


def schedule_keys(planned: Planned) -> tuple[dict[str, Any], tuple[str, ...]]:
    schedulers = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if planned.family not in schedulers:
        raise ConfigError(
            f"Axolotl has no {planned.family} schedule with lrsweep's parameters; export the "
            "sweep with --format json for a Trainer instead"
        )
    values: dict[str, Any] = {
        "learning_rate": planned.peak_lr,
        "lr_scheduler": schedulers[planned.family],
    }
    if planned.family == "cosine":
        values["cosine_min_lr_ratio"] = planned.min_lr_ratio
    if planned.loraplus_lr_ratio is not None:
        values["loraplus_lr_ratio"] = planned.loraplus_lr_ratio
    if planned.max_steps:
        values["warmup_steps"] = math.ceil(planned.warmup_fraction * planned.max_steps)
        values["max_steps"] = planned.max_steps
        return values, ("warmup_ratio",)
    values["warmup_ratio"] = planned.warmup_fraction
    values["num_epochs"] = planned.epochs
    return values, ("warmup_steps", "max_steps")
