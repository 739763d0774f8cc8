"""transformers' TrainingArguments, TRL's SFTConfig, and the YAML/JSON file of TRL's CLI
(``trl sft --config``: SFTConfig with TRL's ModelConfig and ScriptArguments keys).

The schedule out is transformers 5's: ``cosine_with_min_lr`` with ``min_lr_rate``, and the
warmup as a fraction in ``warmup_steps`` (transformers 5 reads a value below 1 as
ceil(fraction x total steps) and has no ``warmup_ratio``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lrsweep.config import ALL_LINEAR
from lrsweep.errors import ConfigError
from lrsweep.interop import (
    ADAMW_KEYS,
    IGNORED,
    Planned,
    UserRun,
    batch_defaults,
    length,
    map_keys,
    optimizer,
    set_dtype,
    tool_defaults,
)
from lrsweep.schedules import FAMILIES


# The epochs key and its default (the run length when max_steps is not set).
EPOCHS = ("num_train_epochs", 3.0)


# Keys that read() handles itself or that the export decides (the schedule, the length).
HANDLED = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "max_steps",
    "num_train_epochs",
    "optim",
    "bf16",
    "fp16",
    "load_in_4bit",
    "load_in_8bit",
    "use_peft",
    "completion_only_loss",
    "assistant_only_loss",
)


def _targets(value: Any) -> list[str] | None:
    if value == ALL_LINEAR or value == [ALL_LINEAR]:
        return [ALL_LINEAR]
    return list(value) if isinstance(value, (list, tuple)) else None


MAPPING: dict[str, Any] = {
    **ADAMW_KEYS,
    "model_name_or_path": "model.path",
    "attn_implementation": "model.attention",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "dataset_name": "data.path",
    "dataset_text_field": "data.text_field",
    "chat_template_path": "data.chat_template",
    "packing": "data.packing",
    "max_length": "train.seq_len",
    "max_seq_length": "train.seq_len",  # TRL before 0.20
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": ("lora.target_modules", _targets),
    "use_rslora": "lora.rslora",
    # Read for what they are, nothing to set: the dtype follows bf16 / fp16, the split is train.
    "dtype": ("", lambda v: None),
    "torch_dtype": ("", lambda v: None),
    "dataset_train_split": ("", lambda v: None),
    "gradient_checkpointing_kwargs": ("", lambda v: None),
    "model_init_kwargs": ("", lambda v: None),
    "lora_task_type": ("", lambda v: None),
    "bnb_4bit_quant_type": ("", lambda v: None),
    "use_bnb_nested_quant": ("", lambda v: None),
    "shuffle_dataset": ("", lambda v: None),
    "truncation_mode": ("", lambda v: None),
    "dataset_kwargs": ("", lambda v: None),
}


def read(raw: dict[str, Any], folder: Path, run: UserRun) -> None:
    map_keys(raw, run, MAPPING, IGNORED, HANDLED)
    length(run, raw.get("max_steps"), raw.get(*EPOCHS))
    set_dtype(run, raw)
    if raw.get("load_in_4bit") or raw.get("load_in_8bit"):
        run.values["model.quantization"] = "4bit" if raw.get("load_in_4bit") else "8bit"
    optimizer(run, "optim", raw.get("optim"))
    path = run.values.get("data.path")
    if isinstance(path, str) and not Path(path).is_absolute() and (folder / path).exists():
        run.values["data.path"] = str(folder / path)
    trl = _is_trl(raw)
    tool_defaults(run, _defaults(run, trl))
    if trl:
        _loss_mask(raw, run)


def _is_trl(raw: dict[str, Any]) -> bool:
    """Whether the file is for TRL (SFTConfig, or its CLI's file): it names a key read here that
    TRL has and TrainingArguments has not. A file of TrainingArguments keys alone is for the
    user's own Trainer code, whose sequence length, LoRA and loss mask it does not say."""
    from transformers import TrainingArguments

    loss = ("completion_only_loss", "assistant_only_loss")
    trl_keys = {*MAPPING, *loss, "use_peft", "load_in_4bit", "load_in_8bit"}
    return bool((trl_keys - set(TrainingArguments.__dataclass_fields__)) & raw.keys())


def _defaults(run: UserRun, trl: bool) -> dict[str, Any]:
    """What the tool runs for the keys the file leaves out, read from the installed classes:
    the Trainer's batch shape, and for a TRL file SFTConfig's (with its max_length) and the
    LoRA of TRL's CLI (ModelConfig: lora_r, lora_alpha, lora_dropout)."""
    from transformers import TrainingArguments

    if not trl:
        return batch_defaults(TrainingArguments)
    try:
        from trl import ModelConfig, SFTConfig
    except ImportError:
        keys = {
            "max_length": "train.seq_len",
            "lora_r": "lora.r",
            "lora_alpha": "lora.alpha",
            "lora_dropout": "lora.dropout",
        }
        if missing := [key for key, name in keys.items() if name not in run.values]:
            run.notes.append(
                f"{', '.join(missing)}: not in the file, and TRL is not installed here to read "
                "its defaults; lrsweep measures with the study's (pip install 'lrsweep[trl]')"
            )
        return batch_defaults(TrainingArguments)
    values = batch_defaults(SFTConfig)
    # None: TRL does not truncate, and the study's seq_len stays.
    values["train.seq_len"] = SFTConfig.__dataclass_fields__["max_length"].default
    cli = ModelConfig.__dataclass_fields__
    for key in ("r", "alpha", "dropout"):
        values[f"lora.{key}"] = cli[f"lora_{key}"].default
    return {k: v for k, v in values.items() if v is not None}


def _loss_mask(raw: dict[str, Any], run: UserRun) -> None:
    """data.train_on as SFTTrainer masks the loss (trl 1.16, SFTTrainer.__init__ and its
    tokenize_fn): assistant_only_loss true trains on the answers of either format;
    completion_only_loss false (without it) on every token; by default, prompt-completion
    rows on their completion and messages rows on every token (``completions``)."""
    if raw.get("assistant_only_loss") is True:
        run.values["data.train_on"] = "answers"
    elif raw.get("completion_only_loss") is False:
        run.values["data.train_on"] = "all"
    else:
        run.values["data.train_on"] = "completions"


def scheduler_keys(planned: Planned) -> dict[str, Any]:
    """The peak and transformers' scheduler with its kwargs (where the family has any):
    the keys TrainingArguments and LLaMA-Factory share."""
    values: dict[str, Any] = {
        "learning_rate": planned.peak_lr,
        "lr_scheduler_type": FAMILIES[planned.family],
    }
    if planned.family == "wsd":
        if not planned.max_steps:
            raise ConfigError(
                "warmup_stable_decay counts its decay in steps: give the planned run as "
                "--max-steps, not --epochs"
            )
        values["lr_scheduler_kwargs"] = planned.schedule().scheduler_kwargs()
    elif planned.family == "cosine":
        values["lr_scheduler_kwargs"] = {"min_lr_rate": planned.min_lr_ratio}
    return values


def schedule_keys(planned: Planned) -> tuple[dict[str, Any], tuple[str, ...]]:
    values = scheduler_keys(planned)
    values.setdefault("lr_scheduler_kwargs", {})
    values["warmup_steps"] = planned.warmup_fraction
    if planned.max_steps:
        values["max_steps"] = planned.max_steps
    else:
        values["num_train_epochs"] = planned.epochs
        values["max_steps"] = -1  # a max_steps above 0 would override the epochs
    return values, ("warmup_ratio",)
