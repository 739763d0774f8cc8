"""The best trial's schedule as TrainingArguments keyword arguments for transformers 5.

``warmup_steps`` is exported as an integer (the trial's own ceil(fraction x total)), never a
fraction: transformers 5 deprecates ``warmup_ratio`` and reads ``warmup_steps < 1`` as a
fraction, and a fraction cast to int silently becomes 0.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from lrsweep.config import StudyConfig
from lrsweep.errors import StudyError
from lrsweep.schedules import CosineSchedule


def best_trial(trials: pd.DataFrame) -> pd.Series:
    """The COMPLETE trial with the lowest eval loss."""
    done = trials[(trials["state"] == "COMPLETE") & trials["eval_loss"].notna()]
    if done.empty:
        raise StudyError("no complete trial yet; run or resume the sweep first")
    return done.sort_values(["eval_loss", "number"]).iloc[0]


def training_arguments(trial: pd.Series, config: StudyConfig) -> dict[str, Any]:
    """Everything the trial's schedule and update depended on, as TrainingArguments kwargs."""
    train = config.train
    schedule = CosineSchedule(
        float(trial["peak_lr"]),
        int(trial["total_steps"]),
        float(trial["warmup_fraction"]),
        float(trial["min_lr_ratio"]),
    )
    # The shape that ran: after an out-of-memory retry, a smaller micro-batch with more
    # accumulation (the same rows per optimizer step).
    micro, accum = trial.get("micro_batch_size"), trial.get("grad_accum")
    ran = micro is not None and not pd.isna(micro)
    kwargs: dict[str, Any] = {
        **schedule.trainer_kwargs(),
        "per_device_train_batch_size": int(micro) if ran else train.batch_size,
        "gradient_accumulation_steps": int(accum) if ran else train.grad_accum,
        "optim": "adamw_torch",
        "adam_beta1": train.adam_beta1,
        "adam_beta2": train.adam_beta2,
        "adam_epsilon": train.adam_epsilon,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": config.seed,
    }
    # bf16 stated either way: TRL's SFTConfig defaults to bf16=True, TrainingArguments to False.
    kwargs["bf16"] = train.dtype == "bfloat16"
    if train.dtype == "float16":
        kwargs["fp16"] = True
    return kwargs


def to_json(kwargs: dict[str, Any]) -> str:
    return json.dumps(kwargs, indent=2)


def to_python(kwargs: dict[str, Any], trial: pd.Series) -> str:
    """A pasteable snippet; output_dir and the data stay the user's."""
    lines = [
        f"# lrsweep trial {int(trial['number'])}: eval loss {trial['eval_loss']:.4f}",
        "from transformers import TrainingArguments",
        "",
        "args = TrainingArguments(",
        '    output_dir="out",',
    ]
    lines.extend(f"    {key}={value!r}," for key, value in kwargs.items())
    lines.append(")")
    return "\n".join(lines)
