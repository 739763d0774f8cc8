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
from lrsweep.ranking import Recommendation, recommend
from lrsweep.schedules import Schedule
from lrsweep.sweep.space import BASELINE_ORIGIN, FIRST_ORIGIN


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


def training_arguments(trial: pd.Series, config: StudyConfig) -> dict[str, Any]:
    """Everything the trial's schedule and update depended on, as TrainingArguments kwargs
    (LoRA+ has no TrainingArguments key: see :func:`loraplus_snippet`)."""
    train = config.train
    schedule = schedule_of_row(trial, config)
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
