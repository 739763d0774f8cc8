"""The recommended trial's schedule for the planned run, in the config of the tool the user
trains with (:mod:`lrsweep.interop` has each tool's keys).

The planned run is ``--max-steps`` / ``--epochs``, else the study's ``planned`` section (read
from the user's own config with ``--from``), else the sweep's own trial length. The peak LR,
warmup fraction, floor and family carry over unchanged: the warmup is exported as the found
fraction of the planned length, never as the trial's step count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from lrsweep.config import ALL_LINEAR, LORAPLUS_EMBEDDING_FACTOR, StudyConfig
from lrsweep.errors import StudyError
from lrsweep.interop import (
    Planned,
    detect,
    fill,
    llamacpp,
    llamafactory,
    load_file,
    read_length,
    schedule_keys,
)
from lrsweep.interop.edit import yaml_scalar
from lrsweep.ranking import Recommendation, recommend
from lrsweep.record import BASELINE_ORIGIN, FIRST_ORIGIN
from lrsweep.schedules import Schedule


def best_trial(trials: pd.DataFrame) -> pd.Series:
    """The COMPLETE trial with the lowest eval loss."""
    done = trials[(trials["state"] == "COMPLETE") & trials["eval_loss"].notna()]
    if done.empty:
        raise StudyError("no complete trial yet; run or resume the sweep first")
    return done.sort_values(["eval_loss", "number"]).iloc[0]


def recommendation(trials: pd.DataFrame) -> Recommendation:
    """The configuration to use: the best mean over seeds (see :mod:`lrsweep.ranking`)."""
    found = recommend(trials, FIRST_ORIGIN, BASELINE_ORIGIN)
    if found is None:
        raise StudyError("no complete trial yet; run or resume the sweep first")
    return found


def schedule_of_row(trial: pd.Series, config: StudyConfig) -> Schedule:
    """The schedule a trial ran, from its row in trials.parquet."""
    family = trial.get("schedule")
    family = family if isinstance(family, str) else "cosine"  # files from before families
    return Schedule(
        float(trial["peak_lr"]),
        int(trial["total_steps"]),
        float(trial["warmup_fraction"]),
        float(trial["min_lr_ratio"]),
        family,
        config.search.wsd_decay_fraction if family == "wsd" else 0.0,
    )


def loraplus_ratio(trial: pd.Series) -> float | None:
    """The trial's LoRA+ ratio where it used LoRA+ (a ratio other than 1), else None."""
    ratio = trial.get("loraplus_lr_ratio")
    return float(ratio) if ratio is not None and pd.notna(ratio) and ratio != 1 else None


def planned_run(
    trial: pd.Series,
    config: StudyConfig,
    max_steps: int = 0,
    epochs: float = 0.0,
    into: Path | None = None,
) -> tuple[Planned, str]:
    """The trial's schedule over the planned run, and where that run's length came from: the
    given length, else the length in the user's own file (``into``), else the study's
    ``planned`` section, else the trial's own steps."""
    schedule = schedule_of_row(trial, config)
    source = "--max-steps / --epochs"
    if not (max_steps or epochs) and into is not None:
        max_steps, epochs = read_length(into)
        source = str(into)
    if not (max_steps or epochs):
        max_steps, epochs = config.planned.max_steps, config.planned.epochs
        source = f"the config the sweep read ({config.planned.source or 'the study'})"
    if not (max_steps or epochs):
        max_steps = schedule.total_steps
        source = "the sweep's own trial length; give --max-steps or --epochs for your run"
    planned = Planned(
        schedule.peak_lr,
        schedule.warmup_fraction,
        schedule.min_lr_ratio,
        schedule.family,
        schedule.decay_fraction,
        loraplus_ratio(trial),
        max_steps,
        epochs,
    )
    return planned, source


def training_arguments(
    trial: pd.Series, config: StudyConfig, planned: Planned | None = None
) -> dict[str, Any]:
    """Everything the trial's schedule and update depended on, as TrainingArguments kwargs for
    the planned run (LoRA+ has no TrainingArguments key: see :func:`loraplus_snippet`). The
    optimizer is not named: lrsweep's AdamW is the Trainer's default, and a user's own
    ``optim`` stays theirs."""
    train = config.train
    values, _ = schedule_keys("transformers", planned or planned_run(trial, config)[0])
    micro, accum = _ran_shape(trial, config)
    return {
        **values,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "adam_beta1": train.adam_beta1,
        "adam_beta2": train.adam_beta2,
        "adam_epsilon": train.adam_epsilon,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": config.seed,
        **_precision(trial, config),
    }


def _ran_shape(trial: pd.Series, config: StudyConfig) -> tuple[int, int]:
    """The micro-batch and accumulation the trial ran: after an out-of-memory retry, a
    smaller micro-batch with more accumulation (the same rows per optimizer step)."""
    micro, accum = trial.get("micro_batch_size"), trial.get("grad_accum")
    if micro is None or pd.isna(micro):  # studies from before the shape was recorded
        return config.train.batch_size, config.train.grad_accum
    return int(micro), int(accum)


def _precision(trial: pd.Series, config: StudyConfig) -> dict[str, bool]:
    """bf16 stated either way (TRL's SFTConfig defaults to bf16=True, TrainingArguments to
    False; Axolotl and LLaMA-Factory read the same keys), fp16 where it ran: the dtype that
    ran (train.dtype "auto" is bf16 or fp16 on CUDA), else the configured one."""
    ran = trial.get("dtype")
    dtype = ran if isinstance(ran, str) else config.train.dtype
    return {"bf16": dtype == "bfloat16", **({"fp16": True} if dtype == "float16" else {})}


def render(
    fmt: str, trial: pd.Series, config: StudyConfig, planned: Planned, into: Path | None = None
) -> tuple[str, list[str]]:
    """The planned schedule in ``fmt`` (or written into a copy of the user's file ``into``),
    and one line for each thing the format cannot say."""
    header = f"lrsweep trial {int(trial['number'])}: the schedule for {planned.length}"
    if into is not None:
        notes = []
        if planned.loraplus_lr_ratio is not None and detect(load_file(into)[0]) == "transformers":
            notes.append(
                f"LoRA+ has no TrainingArguments key, so {into.name} does not get it: "
                "--format python prints the optimizer to pass to the Trainer"
            )
        return fill(into, planned, header), notes
    kwargs = training_arguments(trial, config, planned)
    notes = []
    if planned.loraplus_lr_ratio is not None and fmt in ("json", "yaml"):
        notes.append("LoRA+ has no TrainingArguments key: --format python prints the optimizer")
    if fmt == "json":
        return json.dumps(kwargs, indent=2), notes
    if fmt == "yaml":
        return _yaml(header, kwargs), notes
    if fmt == "python":
        return to_python(kwargs, trial), notes
    if fmt == "axolotl":
        keys = {**schedule_keys("axolotl", planned)[0], **_axolotl(trial, config)}
        return _yaml(header, keys), []
    if fmt == "llamafactory":
        keys = {**schedule_keys("llamafactory", planned)[0], **_llamafactory(trial, config)}
        return _yaml(header, keys), []
    if fmt == "llamafactory-cli":
        return llamafactory.cli_overrides(planned), []
    if fmt == "llamacpp":
        return llamacpp.flags(planned, config.train.weight_decay)
    raise ValueError(fmt)


def _yaml(header: str, values: dict[str, Any]) -> str:
    return "\n".join([f"# {header}", *(f"{k}: {yaml_scalar(v)}" for k, v in values.items())])


def _targets(config: StudyConfig) -> list[str] | None:
    targets = config.lora.target_modules
    return None if targets == [ALL_LINEAR] else list(targets)


def _axolotl(trial: pd.Series, config: StudyConfig) -> dict[str, Any]:
    """The batch shape, precision and adapter the trial ran, in Axolotl's keys (its QLoRA
    needs load_in_4bit as well as the adapter's name)."""
    train, lora, quantization = config.train, config.lora, config.model.quantization
    targets = _targets(config)
    micro, accum = _ran_shape(trial, config)
    return {
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "sequence_len": train.seq_len,
        **_precision(trial, config),
        "adapter": "qlora" if quantization == "4bit" else "lora",
        **({f"load_in_{quantization}": True} if quantization in ("4bit", "8bit") else {}),
        "lora_r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        **({"lora_target_modules": targets} if targets else {"lora_target_linear": True}),
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": config.seed,
    }


def _llamafactory(trial: pd.Series, config: StudyConfig) -> dict[str, Any]:
    """The batch shape, precision and adapter the trial ran, in LLaMA-Factory's keys."""
    train, lora = config.train, config.lora
    targets = _targets(config)
    quantized = config.model.quantization in ("4bit", "8bit")
    micro, accum = _ran_shape(trial, config)
    return {
        "finetuning_type": "lora",
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "cutoff_len": train.seq_len,
        **_precision(trial, config),
        "lora_rank": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "lora_target": ",".join(targets) if targets else "all",
        **({"quantization_bit": int(config.model.quantization[0])} if quantized else {}),
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": config.seed,
    }


def loraplus_snippet(kwargs: dict[str, Any], ratio: float) -> list[str]:
    """Lines that build the trial's LoRA+ optimizer with peft, for ``Trainer(optimizers=...)``:
    the Trainer's scheduler then scales every group's LR, B's at ``ratio`` times A's."""
    return [
        "",
        "# LoRA+: the B matrices at loraplus_lr_ratio x the LR of the A matrices (peft).",
        "import torch",
        "from peft.optimizers import create_loraplus_optimizer",
        "",
        "optimizer = create_loraplus_optimizer(",
        "    model=peft_model,",
        "    optimizer_cls=torch.optim.AdamW,",
        f"    lr={kwargs['learning_rate']!r},",
        f"    loraplus_lr_ratio={ratio!r},",
        f"    loraplus_lr_embedding={LORAPLUS_EMBEDDING_FACTOR * kwargs['learning_rate']!r},",
        f"    loraplus_weight_decay={kwargs['weight_decay']!r},",
        f"    betas=({kwargs['adam_beta1']!r}, {kwargs['adam_beta2']!r}),",
        f"    eps={kwargs['adam_epsilon']!r},",
        f"    weight_decay={kwargs['weight_decay']!r},",
        ")",
        "# trainer = Trainer(model=peft_model, args=args, optimizers=(optimizer, None), ...)",
    ]


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
    if (ratio := loraplus_ratio(trial)) is not None:
        lines.extend(loraplus_snippet(kwargs, ratio))
    return "\n".join(lines)


def _versus(label: str, comparison: Any) -> str:
    c = comparison
    z = f", {c.z:.1f} standard errors" if c.z is not None else ""
    return (
        f"{label} (trial {c.other.number}, {c.other.mean:.4f} over {c.other.n} run(s)) "
        f"by {c.margin:+.4f}{z}"
    )


def recommendation_note(rec: Recommendation) -> str:
    """What export says about its pick, on stderr: the mean, the noise, the runner-up."""
    best = rec.best
    if not rec.confirmed:
        head = (
            f"trial {best.number}: the best single run ({best.mean:.4f}), not confirmed with "
            "other seeds (sweep.confirm_top)"
        )
    else:
        head = (
            f"trial {best.number}: the best mean eval loss, {best.mean:.4f} +- "
            f"{best.spread:.4f} over {best.n} seeds (seed noise of one run "
            f"{rec.noise:.4f})"
        )
    if rec.runner_up is not None:
        head += "; beats " + _versus("the runner-up", rec.runner_up)
    return head
