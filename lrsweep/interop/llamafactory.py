"""LLaMA-Factory's YAML config (``llamafactory-cli train config.yaml``) and its ``key=value``
overrides.

Its training keys are transformers' own TrainingArguments, so the schedule is
cosine_with_min_lr with ``min_lr_rate``. LLaMA-Factory runs on transformers 4 and 5: a run of
known length gets an integer ``warmup_steps``, which both read the same; a run in epochs gets
``warmup_ratio`` (transformers 4; on 5 it is refused loudly, where a fraction in
``warmup_steps`` would be misread in silence by 4).
"""

from __future__ import annotations

import json
import math
import shlex
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
from lrsweep.interop.edit import yaml_scalar
from lrsweep.interop.transformers import scheduler_keys


# The epochs key and its default (the run length when max_steps is not set).
EPOCHS = ("num_train_epochs", 3.0)
# LLaMA-Factory's defaults for the keys a config leaves out (src/llamafactory/hparams/):
# data_args.py cutoff_len 2048; finetuning_args.py lora_rank 8, lora_dropout 0.0 and
# lora_alpha None, read as lora_rank * 2 (set in read()). Its training keys are transformers'
# Seq2SeqTrainingArguments (training_args.py), whose batch shape is read from transformers.
DEFAULTS = {"train.seq_len": 2048, "lora.r": 8, "lora.dropout": 0.0}


HANDLED = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_ratio",
    "warmup_steps",
    "max_steps",
    "num_train_epochs",
    "optim",
    "bf16",
    "fp16",
    "stage",
    "finetuning_type",
    "lora_target",
    "quantization_bit",
    "dataset",
    "dataset_dir",
    "template",
    "train_on_prompt",
    "flash_attn",
    "do_train",
    "max_samples",
)
MAPPING: dict[str, Any] = {
    **ADAMW_KEYS,
    "model_name_or_path": "model.path",
    "cutoff_len": "train.seq_len",
    "packing": "data.packing",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "use_rslora": "lora.rslora",
    "loraplus_lr_ratio": "train.loraplus_lr_ratio",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "cache_dir": ("", lambda v: None),
    "ddp_timeout": ("", lambda v: None),
}
ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}


def read(raw: dict[str, Any], folder: Path, run: UserRun) -> None:
    map_keys(raw, run, MAPPING, IGNORED, HANDLED)
    from transformers import Seq2SeqTrainingArguments

    tool_defaults(run, {**DEFAULTS, **batch_defaults(Seq2SeqTrainingArguments)})
    length(run, raw.get("max_steps"), raw.get(*EPOCHS))
    set_dtype(run, raw)
    if raw.get("stage", "sft") != "sft":
        run.notes.append(f"stage: {raw['stage']}; lrsweep measures supervised fine-tuning (sft)")
    if raw.get("finetuning_type", "lora") != "lora":
        run.notes.append(f"finetuning_type: {raw['finetuning_type']}; lrsweep measures LoRA")
    rank = run.values["lora.r"]
    if not raw.get("lora_alpha") and isinstance(rank, int):  # its lora_alpha or lora_rank * 2
        run.values["lora.alpha"] = 2 * rank
    target = str(raw.get("lora_target", "all"))
    run.values["lora.target_modules"] = (
        [ALL_LINEAR] if target == "all" else [t.strip() for t in target.split(",") if t.strip()]
    )
    if bits := raw.get("quantization_bit"):
        if bits not in (4, 8):
            raise ConfigError(f"quantization_bit: {bits}; lrsweep quantizes to 4 or 8 bits")
        run.values["model.quantization"] = f"{bits}bit"
    if raw.get("flash_attn") == "fa2":
        run.values["model.attention"] = "flash_attention_2"
    if raw.get("train_on_prompt"):
        run.values["data.train_on"] = "all"
    if raw.get("template") not in (None, "default", "empty"):
        run.notes.append(
            f"template: {raw['template']} is LLaMA-Factory's own chat template; lrsweep uses "
            "the tokenizer's (or data.chat_template)"
        )
    optimizer(run, "optim", raw.get("optim"))
    _dataset(raw, folder, run)


def _dataset(raw: dict[str, Any], folder: Path, run: UserRun) -> None:
    """The first dataset named, looked up in dataset_info.json as LLaMA-Factory does."""
    names = [n.strip() for n in str(raw.get("dataset", "")).split(",") if n.strip()]
    if not names:
        raise ConfigError("dataset: LLaMA-Factory's config names no dataset")
    if len(names) > 1:
        run.notes.append(f"dataset: lrsweep measures on the first of {len(names)} ({names[0]})")
    base = Path(str(raw.get("dataset_dir", "data")))
    dirs = [base] if base.is_absolute() else [Path.cwd() / base, folder / base]
    info_dir = next((d for d in dirs if (d / "dataset_info.json").is_file()), None)
    if info_dir is None:
        raise ConfigError(
            f"dataset_dir: no dataset_info.json in {' or '.join(str(d) for d in dirs)}; run "
            "lrsweep where llamafactory-cli runs, or set dataset_dir"
        )
    info_path = info_dir / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{info_path}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{info_path}: must be a mapping of dataset names")
    entry = info.get(names[0])
    if not isinstance(entry, dict):
        raise ConfigError(f"dataset: {names[0]} is not in {info_dir / 'dataset_info.json'}")
    if "file_name" in entry:
        run.values["data.path"] = str(info_dir / entry["file_name"])
    elif "hf_hub_url" in entry:
        run.values["data.path"] = entry["hf_hub_url"]
    else:
        raise ConfigError(f"dataset: {names[0]} has neither file_name nor hf_hub_url")
    formatting = entry.get("formatting", "alpaca")
    columns = entry.get("columns", {})
    if formatting == "alpaca":
        if any(columns.get(k, v) != v for k, v in ALPACA.items()):
            raise ConfigError(
                f"dataset: {names[0]} renames the alpaca columns ({columns}); lrsweep reads "
                "instruction / input / output"
            )
        run.values["data.format"] = "prompt_completion"
    elif formatting == "sharegpt":
        run.values["data.format"] = "chat"
    else:
        raise ConfigError(f"dataset: {names[0]} is {formatting}; lrsweep reads alpaca, sharegpt")


def schedule_keys(planned: Planned) -> tuple[dict[str, Any], tuple[str, ...]]:
    values = scheduler_keys(planned)
    # Stated for every family: a user's min_lr_rate left under a linear schedule stops
    # transformers' get_scheduler (an unexpected keyword).
    values.setdefault("lr_scheduler_kwargs", {})
    if planned.loraplus_lr_ratio is not None:
        values["loraplus_lr_ratio"] = planned.loraplus_lr_ratio
    if planned.max_steps:
        values["warmup_steps"] = math.ceil(planned.warmup_fraction * planned.max_steps)
        values["max_steps"] = planned.max_steps
        return values, ("warmup_ratio",)
    values["warmup_ratio"] = planned.warmup_fraction
    values["num_train_epochs"] = planned.epochs
    values["max_steps"] = -1
    return values, ("warmup_steps",)


def cli_overrides(planned: Planned, config: str = "config.yaml") -> str:
    """The schedule as ``llamafactory-cli train`` overrides of a config file."""
    values, _ = schedule_keys(planned)
    parts = [
        f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, dict) else yaml_scalar(v)}"
        for k, v in values.items()
    ]
    return "llamafactory-cli train " + " ".join(shlex.quote(p) for p in [config, *parts])
