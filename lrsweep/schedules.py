"""Learning-rate schedules as pure functions of the optimizer step.

The range test's ramp is lrsweep's own. The sweep's schedules (warmup, then cosine, linear,
constant or warmup-stable-decay) are transformers' own schedulers, evaluated on a throwaway
optimizer, so that an exported TrainingArguments reproduces a trial step for step, quirks
included: with warmup the first update uses LR 0, and the cosine floor is approached but never
reached (the last step has p < 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


# The schedule of a first try before any sweep: the range test's recommendation as the
# study's first trial, and the snippet lrsweep find prints.
FIRST_WARMUP_FRACTION = 0.05
FIRST_MIN_LR_RATIO = 0.1


def ramp(start_lr: float, end_lr: float, steps: int, mode: str = "exp") -> list[float]:
    """LRs of a range test: ``steps`` values from ``start_lr`` to ``end_lr`` inclusive,
    geometric (``exp``) or evenly spaced (``linear``)."""
    if steps == 1:
        return [start_lr]
    t = [i / (steps - 1) for i in range(steps)]
    if mode == "exp":
        return [start_lr * (end_lr / start_lr) ** x for x in t]
    return [start_lr + (end_lr - start_lr) * x for x in t]


# lrsweep's schedule families and the transformers scheduler (``lr_scheduler_type``) each is.
FAMILIES = {
    "cosine": "cosine_with_min_lr",
    "linear": "linear",
    "constant": "constant_with_warmup",
    "wsd": "warmup_stable_decay",
}
# The families that decay to a floor (min_lr_ratio); linear decays to 0, constant never decays.
FLOORED = ("cosine", "wsd")


@dataclass(frozen=True)
class Schedule:
    """Linear warmup over ``ceil(warmup_fraction * total_steps)`` steps, then the decay of
    ``family`` over the rest of ``total_steps``, as transformers' own scheduler gives it:

    - ``cosine``: cosine decay to ``min_lr_ratio * peak_lr`` (``cosine_with_min_lr``);
    - ``linear``: linear decay to 0 (``linear``; ``min_lr_ratio`` does not apply);
    - ``constant``: the peak after warmup (``constant_with_warmup``; no floor);
    - ``wsd``: warmup, stable at the peak, then a cosine decay to the floor over the last
      ``decay_fraction`` of the steps (``warmup_stable_decay``; its warmup starts at the floor).
    """

    peak_lr: float
    total_steps: int
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0
    family: str = "cosine"
    decay_fraction: float = 0.0  # wsd only: the share of total_steps spent decaying

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown schedule family {self.family!r}; known: {list(FAMILIES)}")

    @property
    def warmup_steps(self) -> int:
        # TrainingArguments.get_warmup_steps for a fraction: ceil(fraction * total).
        return math.ceil(self.warmup_fraction * self.total_steps)

    @property
    def decay_steps(self) -> int:
        """wsd's decay steps: ceil(decay_fraction * total), within what warmup leaves."""
        return min(
            math.ceil(self.decay_fraction * self.total_steps), self.total_steps - self.warmup_steps
        )

    @property
    def floor_ratio(self) -> float:
        """The floor as a fraction of the peak: min_lr_ratio where the family has a floor."""
        return self.min_lr_ratio if self.family in FLOORED else 0.0

    @property
    def min_lr(self) -> float:
        return self.floor_ratio * self.peak_lr

    def scheduler_kwargs(self) -> dict[str, Any]:
        """``lr_scheduler_kwargs`` of the family (its floor as a ratio, so that every
        parameter group of a LoRA+ optimizer keeps its own floor)."""
        if self.family == "cosine":
            return {"min_lr_rate": self.min_lr_ratio}
        if self.family == "wsd":
            return {"num_decay_steps": self.decay_steps, "min_lr_ratio": self.min_lr_ratio}
        return {}

    def trainer_kwargs(self) -> dict[str, Any]:
        """The TrainingArguments keyword arguments that make a Trainer run this schedule;
        ``warmup_steps`` an integer, never a fraction (transformers 5 reads < 1 as one)."""
        return {
            "learning_rate": self.peak_lr,
            "lr_scheduler_type": FAMILIES[self.family],
            "lr_scheduler_kwargs": self.scheduler_kwargs(),
            "warmup_steps": self.warmup_steps,
            "max_steps": self.total_steps,
        }

    def lrs(self) -> list[float]:
        """The LR of every optimizer step, as transformers' scheduler gives it."""
        # Imported here: reading and exporting a finished sweep needs no torch.
        import torch
        from transformers.optimization import get_scheduler

        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=self.peak_lr)
        scheduler = get_scheduler(
            FAMILIES[self.family],
            optimizer,
            num_warmup_steps=self.warmup_steps,
            num_training_steps=self.total_steps,
            scheduler_specific_kwargs=self.scheduler_kwargs(),
        )
        out = []
        for _ in range(self.total_steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out
