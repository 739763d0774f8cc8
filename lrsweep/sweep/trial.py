"""One sweep trial: what it records, the eval-report-and-prune rule every runner shares, and
lrsweep's own runner (a fresh adapter trained with one cosine schedule).

The adapter is attached to the shared base model and detached afterwards; the optimizer and
the adapter are then unreachable and collected, and on CUDA the cache is emptied, so memory
does not grow from trial to trial. ``lrsweep.hf`` has the other runner, the user's Trainer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import torch

from lrsweep.data import batches
from lrsweep.models import attach_lora, detach_lora
from lrsweep.oom import Attempt, free_memory, run_with_retry
from lrsweep.schedules import CosineSchedule
from lrsweep.suggest import ema
from lrsweep.sweep.storage import retry
from lrsweep.training import Loop, Precision, StepRecord, make_optimizer, train


if TYPE_CHECKING:
    from optuna.trial import Trial

    from lrsweep.context import Context

logger = logging.getLogger(__name__)

_EMA_WINDOW = 100


@dataclass
class TrialRun:
    """What one trial recorded; stored as the trial's user attributes before it is told."""

    schedule: CosineSchedule
    records: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    reason: str | None = None
    shape: Attempt | None = None  # the micro-batch and accumulation that ran (OOM retries)

    def attrs(self, seed: int, worker: str) -> dict[str, Any]:
        evals = [(r.step, r.eval_loss) for r in self.records if r.eval_loss is not None]
        finite = [(s, v) for s, v in evals if math.isfinite(v)]
        best_step, best = min(finite, key=lambda e: e[1]) if finite else (None, None)
        return {
            "warmup_steps": self.schedule.warmup_steps,
            "min_lr": self.schedule.min_lr,
            "min_lr_ratio": self.schedule.min_lr_ratio,
            "total_steps": self.schedule.total_steps,
            "best_eval_loss": best,
            "best_step": best_step,
            "tokens": self.records[-1].tokens if self.records else 0,
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "reason": self.reason,
            "seed": seed,
            "worker": worker,
            **(self.shape.attrs() if self.shape else {}),
            "curve": {
                "lr": [r.lr for r in self.records],
                "loss": [r.loss for r in self.records],
                "eval_loss": [r.eval_loss for r in self.records],
            },
        }


# A runner trains one trial with one schedule and returns what it recorded: lrsweep's own
# loop (run_trial) or a user's Trainer (lrsweep.hf).
Runner = Callable[["Trial", CosineSchedule], TrialRun]


def report_eval(trial: Trial, loss: float, steps_done: int, pruner: str) -> str | None:
    """Report an eval loss to the pruner; the reason to stop the trial, or None."""
    if not math.isfinite(loss):
        return f"non-finite eval loss at step {steps_done}"
    retry(lambda: trial.report(loss, steps_done), what="report")
    if retry(trial.should_prune, what="ask the pruner"):
        return f"pruned by the {pruner} pruner at step {steps_done}"
    return None


def diverged(losses: list[float], factor: float) -> str | None:
    """Why a trial whose smoothed training loss left ``factor`` times its first diverged."""
    # An EMA with beta 0.9 forgets within ~50 steps: a window keeps this O(1) per step.
    smoothed = ema(losses[-_EMA_WINDOW:], 0.9)[-1]
    if smoothed > factor * losses[0]:
        return (
            f"diverged at step {len(losses) - 1} (smoothed loss {smoothed:.3g} > "
            f"{factor}x the first)"
        )
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def run_trial(
    ctx: Context,
    trial: Trial,
    schedule: CosineSchedule,
    progress: bool = True,
    start: Attempt | None = None,
) -> TrialRun:
    """Train a fresh adapter with ``schedule``, reporting eval losses through ``trial``.

    A run that the pruner stops, or whose loss diverges or turns non-finite, ends early with
    ``reason`` set: the trial is then PRUNED. Out of memory, it starts again with half the
    micro-batch and twice the accumulation (``lrsweep.oom``), from ``start`` when an earlier
    run found the shape that fits; ``TrialRun.shape`` says what ran.
    """
    cfg = ctx.config

    def attempt_run(attempt: Attempt) -> TrialRun:
        return _train_once(ctx, trial, schedule, attempt, progress)

    def retrying(attempt: Attempt) -> None:
        logger.warning(
            "trial %d out of memory: retrying with %s", trial.number, attempt.describe()
        )

    run, used = run_with_retry(
        attempt_run, cfg.train, device=ctx.base.device, on_retry=retrying, start=start
    )
    run.shape = used
    return run


def _train_once(
    ctx: Context, trial: Trial, schedule: CosineSchedule, attempt: Attempt, progress: bool
) -> TrialRun:
    cfg = ctx.config
    device = ctx.base.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Same seed, same adapter init, data order and dropout masks: trials differ only by their
    # schedule, whatever ran before them in this process.
    torch.manual_seed(cfg.seed)
    model = attach_lora(ctx.base, cfg.lora, cfg.seed)
    precision = Precision(device, ctx.precision.dtype)  # a fresh GradScaler for fp16
    run = TrialRun(schedule)
    start = time.perf_counter()
    losses: list[float] = []

    def on_step(record: StepRecord) -> str | None:
        run.records.append(record)
        losses.append(record.loss)
        if record.eval_loss is not None:
            reason = report_eval(trial, record.eval_loss, record.step + 1, cfg.sweep.pruner)
            if reason is not None:
                return reason
        return diverged(losses, cfg.sweep.diverge_factor)

    try:
        optimizer = make_optimizer(model, cfg.train)
        result = train(
            model,
            optimizer,
            attempt.batches(batches(ctx.blocks.train, cfg.train.batch_size, cfg.seed)),
            schedule.lrs(),
            Loop.of(attempt.train, precision),
            eval_blocks=ctx.blocks.eval,
            eval_every=cfg.sweep.eval_every,
            on_step=on_step,
            desc=f"trial {trial.number}",
            progress=progress,
        )
        run.reason = result.stop_reason
    finally:
        run.seconds = time.perf_counter() - start
        run.peak_memory_mb = peak_memory_mb(device)
        detach_lora(model)
        del model
        optimizer = None  # noqa: F841 - drop the last reference before collecting
        free_memory(device)
    return run
