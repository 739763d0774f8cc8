"""One sweep trial: what it records, the eval-report-and-prune rule every runner shares, and
lrsweep's own runner (a fresh adapter trained with one schedule, seen by its watchers).

The adapter is attached to the shared base model and detached afterwards; the optimizer and
the adapter are then unreachable and collected, and on CUDA the cache is emptied, so memory
does not grow from trial to trial. ``lrsweep.hf`` has the other runner, the user's Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from lrsweep.data import batches
from lrsweep.memory import free_memory, peak_memory_mb, reset_peak_memory
from lrsweep.models import attach_lora, detach_lora
from lrsweep.oom import Attempt, run_with_retry
from lrsweep.record import TrialRecord
from lrsweep.schedules import Schedule
from lrsweep.suggest import ema
from lrsweep.sweep.space import loraplus_ratio_of
from lrsweep.sweep.storage import retry
from lrsweep.training import Loop, Precision, StepRecord, make_optimizer, train


if TYPE_CHECKING:
    from optuna.trial import Trial
    from peft import PeftModel

    from lrsweep.config import StudyConfig, SweepConfig
    from lrsweep.context import Context

logger = logging.getLogger(__name__)

_EMA_WINDOW = 100


@dataclass
class TrialRun:
    """What one trial recorded; stored as the trial's user attributes before it is told."""

    schedule: Schedule
    loraplus_lr_ratio: float | None = None  # None where the runner's optimizer is the user's
    records: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    reason: str | None = None
    shape: Attempt | None = None  # the micro-batch and accumulation that ran (OOM retries)
    dtype: str | None = None  # the compute dtype, as torch names it without "torch."

    def record(self, queued: TrialRecord, seed: int, worker: str) -> TrialRecord:
        """What the trial recorded, added to what it was queued with."""
        return TrialRecord.ended(
            queued,
            self.schedule,
            self.records,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            seconds=self.seconds,
            peak_memory_mb=self.peak_memory_mb,
            reason=self.reason,
            seed=seed,
            worker=worker,
            dtype=self.dtype,
            **(self.shape.facts() if self.shape else {}),
        )


# A runner trains one trial with one schedule and returns what it recorded: lrsweep's own
# loop (run_trial) or a user's Trainer (lrsweep.hf).
Runner = Callable[["Trial", Schedule], TrialRun]


class TrialWatcher(Protocol):
    """Sees one trial of lrsweep's own runner: a live tracker, the adapter keeper."""

    def start(self, trial: Trial, run: TrialRun) -> None: ...

    def step(self, record: StepRecord) -> None: ...

    def end(self, model: PeftModel, run: TrialRun, finished: bool) -> None:
        """Called before the adapter is detached; ``finished``: every step ran."""


def report_eval(
    trial: Trial, loss: float, steps_done: int, total_steps: int, pruner: str, prune: bool = True
) -> str | None:
    """Report an eval loss to the pruner; the reason to stop the trial, or None.
    ``prune`` False (a confirmation run) reports without ever stopping. The last evaluation
    (after ``total_steps``) is the objective: pruning there would save nothing."""
    if not math.isfinite(loss):
        return f"non-finite eval loss at step {steps_done}"
    retry(lambda: trial.report(loss, steps_done), what="report")
    last = steps_done >= total_steps
    if prune and not last and retry(trial.should_prune, what="ask the pruner"):
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


def run_trial(
    ctx: Context,
    trial: Trial,
    schedule: Schedule,
    progress: bool = True,
    watchers: Sequence[TrialWatcher] = (),
    start: Attempt | None = None,
) -> TrialRun:
    """Train a fresh adapter with ``schedule``, reporting eval losses through ``trial``.

    A run that the pruner stops, or whose loss diverges or turns non-finite, ends early with
    ``reason`` set (the trial is then PRUNED); a confirmation run is never pruned. Out of
    memory, it starts again with half the micro-batch and twice the accumulation
    (``lrsweep.oom``), from ``start`` when an earlier run found the shape that fits;
    ``TrialRun.shape`` says what ran.
    """
    cfg = ctx.config

    def attempt_run(attempt: Attempt) -> TrialRun:
        return _train_once(ctx, trial, schedule, attempt, progress, watchers)

    # run_with_retry logs each retry itself.
    run, used = run_with_retry(attempt_run, cfg.train, device=ctx.base.device, start=start)
    run.shape = used
    return run


def _train_once(
    ctx: Context,
    trial: Trial,
    schedule: Schedule,
    attempt: Attempt,
    progress: bool,
    watchers: Sequence[TrialWatcher],
) -> TrialRun:
    cfg, device = ctx.config, ctx.base.device
    reset_peak_memory(device)
    seed, prune, ratio = _identity(trial, cfg)
    # Same seed, same adapter init, data order and dropout masks: trials differ only by their
    # schedule, whatever ran before them in this process.
    torch.manual_seed(seed)
    model = attach_lora(ctx.base, cfg.lora, seed)
    precision = Precision(device, ctx.precision.dtype)  # a fresh GradScaler for fp16
    run = TrialRun(schedule, ratio, dtype=precision.dtype_name)
    start = time.perf_counter()
    finished, started = False, list[TrialWatcher]()
    optimizer: torch.optim.Optimizer | None = None
    try:
        # Inside the try: a tracker that fails to start (a store it cannot reach) fails this
        # trial alone, and the adapter still comes off the shared base.
        for watcher in watchers:
            watcher.start(trial, run)
            started.append(watcher)
        on_step = _watch(trial, run, started, cfg.sweep, prune)
        optimizer = make_optimizer(model, dataclasses.replace(cfg.train, loraplus_lr_ratio=ratio))
        result = train(
            model,
            optimizer,
            attempt.batches(batches(ctx.blocks.train, cfg.train.batch_size, seed)),
            schedule.lrs(),
            Loop.of(attempt.train, precision),
            eval_blocks=ctx.blocks.eval,
            eval_every=cfg.sweep.eval_every,
            on_step=on_step,
            desc=f"trial {trial.number}",
            progress=progress,
            hold_on_skip=True,
        )
        run.reason = result.stop_reason
        finished = run.reason is None
    finally:
        run.seconds = time.perf_counter() - start
        run.peak_memory_mb = peak_memory_mb(device)
        try:
            for watcher in started:
                watcher.end(model, run, finished)
        finally:
            detach_lora(model)
            del model
            optimizer = None  # noqa: F841 - drop the last reference before collecting
            free_memory(device)
    return run


def _watch(
    trial: Trial, run: TrialRun, watchers: Sequence[TrialWatcher], sweep: SweepConfig, prune: bool
) -> Callable[[StepRecord], str | None]:
    """The loop's per-step callback: record, show the watchers, report, prune, diverge."""
    losses: list[float] = []

    def on_step(record: StepRecord) -> str | None:
        run.records.append(record)
        losses.append(record.loss)
        for watcher in watchers:
            watcher.step(record)
        loss, done, total = record.eval_loss, record.step + 1, run.schedule.total_steps
        if loss is not None and (
            reason := report_eval(trial, loss, done, total, sweep.pruner, prune)
        ):
            return reason
        return diverged(losses, sweep.diverge_factor)

    return on_step


def _identity(trial: Trial, cfg: StudyConfig) -> tuple[int, bool, float]:
    """The trial's seed, whether it may be pruned (not a confirmation run), its LoRA+ ratio."""
    record = retry(lambda: TrialRecord.of(trial), what="start a trial")
    ratio = loraplus_ratio_of(trial.params, cfg)
    return record.seed_or(cfg.seed), not record.is_confirmation, ratio
