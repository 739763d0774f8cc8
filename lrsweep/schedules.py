"""Learning-rate schedules as pure functions of the optimizer step.

The range test's ramp is lrsweep's own. The sweep's warmup + cosine schedule is transformers'
``cosine_with_min_lr`` itself, evaluated on a throwaway optimizer, so that an exported
TrainingArguments reproduces a trial step for step, quirks included: with warmup the first
update uses LR 0, and the floor is approached but never reached (the last step has p < 1).
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


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup then cosine decay to ``min_lr_ratio * peak_lr`` over ``total_steps``."""

    peak_lr: float
    total_steps: int
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0

    @property
    def warmup_steps(self) -> int:
        # TrainingArguments.get_warmup_steps for a fraction: ceil(fraction * total).
        return math.ceil(self.warmup_fraction * self.total_steps)

    @property
    def min_lr(self) -> float:
        return self.min_lr_ratio * self.peak_lr

    def trainer_kwargs(self) -> dict[str, Any]:
        """The TrainingArguments keyword arguments that make a Trainer run this schedule;
        ``warmup_steps`` an integer, never a fraction (transformers 5 reads < 1 as one)."""
        return {
            "learning_rate": self.peak_lr,
            "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": self.min_lr_ratio},
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
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=self.warmup_steps,
            num_training_steps=self.total_steps,
            scheduler_specific_kwargs={"min_lr_rate": self.min_lr_ratio},
        )
        out = []
        for _ in range(self.total_steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out
