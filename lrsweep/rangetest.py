"""The LR range test, in two modes: a ramp (one short run whose LR grows each optimizer step,
recording the loss) or probes (short runs at peak LRs from the same start, each scored by the
held-out loss at its end; :func:`combine_seeds` joins a probe repeated over seeds).

Either leaves no trace: the trainable weights, the optimizer state and the RNG states are
snapshotted before and restored afterwards, also when the run fails midway.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from lrsweep.config import RangeTestConfig
from lrsweep.models import load_trainable_state, trainable_state
from lrsweep.schedules import FIRST_MIN_LR_RATIO, FIRST_WARMUP_FRACTION, Schedule, ramp
from lrsweep.suggest import (
    divergence_index,
    ema,
    probe_as_good,
    probe_clearly_worse,
    probe_diverged,
)
from lrsweep.training import Batch, Loop, Precision, StepRecord, TrainResult, evaluate, train


if TYPE_CHECKING:
    from lrsweep.data import Examples


@dataclass
class RangeTestCurve:
    """One point per optimizer step of the ramp (fewer when it stopped early)."""

    lrs: list[float]
    losses: list[float]  # the signal the suggestions read: probe eval loss or train loss
    smoothed: list[float]
    train_losses: list[float]
    tokens: list[int]
    seconds: list[float]
    stop_reason: str | None
    seconds_per_step: float  # training steps alone, without the probe evaluations
    mode: str = "ramp"  # probe: one point per run, and the fields below are set
    spent_steps: int = 0  # optimizer steps of the probe runs (ramp: one per point)
    start_loss: float | None = None  # the held-out loss before any training
    run_losses: list[list[float]] | None = None  # each run's held-out loss at every eval
    seed_losses: list[list[float]] | None = None  # several seeds: each one's loss per run

    @property
    def optimizer_steps(self) -> int:
        """What the range test cost in optimizer steps."""
        return self.spent_steps if self.mode == "probe" else len(self.lrs)

    @property
    def best_drop(self) -> float | None:
        """Probe mode: the best run's held-out loss drop, as a share of the untrained loss."""
        finite = [v for v in self.losses if math.isfinite(v)]
        if self.mode != "probe" or not self.start_loss or not finite:
            return None
        return (self.start_loss - min(finite)) / abs(self.start_loss)

    def frame(self) -> pd.DataFrame:
        extra: dict[str, list[list[float]]] = {}
        if self.run_losses is not None:
            extra["run_losses"] = self.run_losses
        if self.seed_losses is not None:
            extra["seed_losses"] = self.seed_losses
        return pd.DataFrame(
            {
                **extra,
                "step": np.arange(len(self.lrs), dtype=np.int64),
                "lr": self.lrs,
                "loss": self.losses,
                "smoothed_loss": self.smoothed,
                "train_loss": self.train_losses,
                "tokens": np.asarray(self.tokens, dtype=np.int64),
                "seconds": self.seconds,
            }
        )


@dataclass(frozen=True)
class RngState:
    """Every global RNG a training step or a data loader draws from (dropout, data order)."""

    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    python_rng: object
    numpy_rng: Any

    @staticmethod
    def now() -> RngState:
        return RngState(
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            random.getstate(),
            np.random.get_state(),
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.python_rng)  # type: ignore[arg-type]
        np.random.set_state(self.numpy_rng)


@dataclass
class _Snapshot:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: RngState


def _snapshot(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision
) -> _Snapshot:
    return _Snapshot(
        weights=trainable_state(model),
        optimizer=copy.deepcopy(optimizer.state_dict()),
        scaler=copy.deepcopy(precision.scaler.state_dict()) if precision.scaler else None,
        rng=RngState.now(),
    )


def _restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    saved: _Snapshot,
) -> None:
    load_trainable_state(model, saved.weights)
    # load_state_dict keeps the given tensors, which the next steps update in place: restore
    # a copy, so that the snapshot serves every probe run.
    optimizer.load_state_dict(copy.deepcopy(saved.optimizer))
    if precision.scaler is not None and saved.scaler is not None:
        precision.scaler.load_state_dict(saved.scaler)
    saved.rng.restore()


def run_range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    config: RangeTestConfig,
    loop: Loop,
    *,
    probe: torch.Tensor | Examples | Sequence[Batch] | None = None,
    progress: bool = True,
) -> RangeTestCurve:
    """Ramp the LR from ``start_lr`` to ``end_lr`` and record the loss of every step.

    With ``signal = "eval"`` the recorded loss is the loss on ``probe`` (fixed held-out
    blocks) after each step. Stops early when the loss is not finite or its smoothed value
    exceeds ``diverge_factor`` times its best. The model and optimizer come back as they were.
    """
    lrs = ramp(config.start_lr, config.end_lr, config.steps, config.spacing)
    use_eval = config.signal == "eval"
    if use_eval and probe is None:
        raise ValueError("rangetest.signal = 'eval' needs probe blocks")
    losses: list[float] = []

    def watch(record: StepRecord) -> str | None:
        losses.append(record.eval_loss if use_eval else record.loss)  # type: ignore[arg-type]
        if divergence_index(losses, config.smoothing, config.diverge_factor) is not None:
            return (
                f"diverged at lr {record.lr:.3g} (smoothed loss > {config.diverge_factor}x best)"
            )
        return None

    saved = _snapshot(model, optimizer, loop.precision)
    try:
        result = train(
            model,
            optimizer,
            batches,
            lrs,
            loop,
            eval_blocks=probe[: config.probe_blocks] if use_eval else None,  # type: ignore[index]
            eval_every=1,
            on_step=watch,
            desc="range test",
            progress=progress,
        )
    finally:
        _restore(model, optimizer, loop.precision, saved)
    return _ramp_curve(lrs, losses, result, config.smoothing)


def _ramp_curve(
    lrs: list[float], losses: list[float], result: TrainResult, smoothing: float
) -> RangeTestCurve:
    records = result.records
    train_losses = [r.loss for r in records]
    tokens, seconds = [r.tokens for r in records], [r.seconds for r in records]
    if result.stop_reason and result.stop_reason.startswith("non-finite"):
        # Keep the point that broke, so the curve shows where it happened.
        n = len(records)
        losses, train_losses = [*losses, math.nan], [*train_losses, math.nan]
        tokens, seconds = [*tokens, tokens[-1] if n else 0], [*seconds, seconds[-1] if n else 0.0]
        records_lrs = lrs[: n + 1]
    else:
        records_lrs = [r.lr for r in records]
    return RangeTestCurve(
        lrs=records_lrs,
        losses=losses,
        smoothed=ema(losses, smoothing).tolist(),
        train_losses=train_losses,
        tokens=tokens,
        seconds=seconds,
        stop_reason=result.stop_reason,
        seconds_per_step=records[-1].train_seconds / len(records) if records else math.nan,
    )


@dataclass
class _ProbeRun:
    """One run of probe mode."""

    lr: float
    loss: float  # held-out loss at its end (NaN when it did not finish)
    evals: list[float]
    train_loss: float
    tokens: int
    seconds: float
    train_seconds: float

    @staticmethod
    def of(lr: float, result: TrainResult, steps: int) -> _ProbeRun:
        records = result.records
        evals = [r.eval_loss for r in records if r.eval_loss is not None]
        done = len(records) == steps and evals
        last = records[-1] if records else None
        return _ProbeRun(
            lr,
            evals[-1] if done else math.nan,
            evals,
            float(np.mean([r.loss for r in records])) if records else math.nan,
            last.tokens if last else 0,
            last.seconds if last else 0.0,
            last.train_seconds if last else 0.0,
        )


def probe_lrs(lr: float, steps: int, cooldown: int, schedule: str = "constant") -> list[float]:
    """One probe run's LR per step: ``steps`` at ``lr``, then ``cooldown`` falling linearly
    to the first trial's floor (``FIRST_MIN_LR_RATIO`` x lr), which the last step reaches;
    with ``schedule = "cosine"``, the first trial's schedule over ``steps`` instead."""
    if schedule == "cosine":
        return Schedule(lr, steps, FIRST_WARMUP_FRACTION, FIRST_MIN_LR_RATIO).lrs()
    fall = [1 - (1 - FIRST_MIN_LR_RATIO) * (i + 1) / cooldown for i in range(cooldown)]
    return [lr] * steps + [lr * f for f in fall]


def run_probes(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    config: RangeTestConfig,
    loop: Loop,
    *,
    probe: torch.Tensor | Examples | Sequence[Batch],
    eval_every: int = 0,
    progress: bool = True,
) -> RangeTestCurve:
    """``config.runs`` runs of ``run_steps`` steps at peak LRs from ``start_lr`` to
    ``end_lr`` (each the first trial's schedule in miniature, or a fixed LR then
    ``cooldown_steps`` of decay: :func:`probe_lrs`), each from the same
    weights, optimizer state, RNG state and batches, so that they differ only by their LR;
    each is scored by the loss on all of ``probe`` at its end (and every ``eval_every``
    steps, for ``run_losses``). The runs go up from the middle of the range to the first LR
    that has diverged (:func:`lrsweep.suggest.probe_diverged`, once a run improved on the
    start; or clearly worse than the start), then down to the first LR out of the interval."""
    lrs = ramp(config.start_lr, config.end_lr, config.runs, config.spacing)
    per_run = config.run_steps + config.cooldown_steps
    fixed = [next(batches) for _ in range(per_run * loop.grad_accum)]
    saved = _snapshot(model, optimizer, loop.precision)
    runs: list[_ProbeRun] = []
    stop_reason = None
    start_loss = evaluate(model, probe, loop.eval_batch_size, loop.precision)

    def run(lr: float) -> _ProbeRun:
        _restore(model, optimizer, loop.precision, saved)
        result = train(
            model,
            optimizer,
            iter(fixed),
            probe_lrs(lr, config.run_steps, config.cooldown_steps, config.run_schedule),
            loop,
            eval_blocks=probe,
            eval_every=eval_every or per_run,
            desc=f"probe {len(runs) + 1} (of up to {len(lrs)}) lr {lr:.1e}",
            progress=progress,
        )
        return _ProbeRun.of(lr, result, per_run)

    # From the middle of the range upwards until a run diverges, then downwards until a run
    # falls out of the interval: the runs below it cannot change the suggestion (on the
    # quality benchmark's saved probes they never did), and they are a third of the probe.
    middle = len(lrs) // 2
    try:
        for lr in lrs[middle:]:
            runs.append(run(lr))
            best = min(runs[:-1], key=lambda r: r.loss, default=None)
            loss = runs[-1].loss
            if (
                not math.isfinite(loss)
                or probe_clearly_worse(loss, start_loss)
                or (
                    best is not None
                    and best.loss < start_loss
                    and probe_diverged(loss, start_loss, best.loss)
                )
            ):
                stop_reason = (
                    f"diverged at lr {lr:.3g} (held-out loss back at or above the untrained one)"
                )
                break
        for lr in reversed(lrs[:middle]):
            runs.append(run(lr))
            if _below_the_interval(runs, start_loss):
                break
    finally:
        _restore(model, optimizer, loop.precision, saved)
    return _probe_curve(sorted(runs, key=lambda r: r.lr), stop_reason, per_run, start_loss)


def _below_the_interval(runs: list[_ProbeRun], start_loss: float) -> bool:
    """Whether the last run, below the best one so far, is out of the probe's interval, with
    three finished runs for the parabola."""
    finished = [r for r in runs if math.isfinite(r.loss)]
    if len(finished) < 3:
        return False
    best = min(finished, key=lambda r: r.loss)
    last = runs[-1]
    return (
        last.lr < best.lr
        and best.loss < start_loss
        and not probe_as_good(last.loss, start_loss, best.loss)
    )


def _probe_curve(
    runs: list[_ProbeRun], stop_reason: str | None, per_run: int, start_loss: float
) -> RangeTestCurve:
    losses = [r.loss for r in runs]
    train_seconds = sum(r.train_seconds for r in runs)
    return RangeTestCurve(
        lrs=[r.lr for r in runs],
        losses=losses,
        smoothed=losses,
        train_losses=[r.train_loss for r in runs],
        tokens=list(np.cumsum([r.tokens for r in runs], dtype=np.int64).tolist()),
        seconds=list(np.cumsum([r.seconds for r in runs])),
        stop_reason=stop_reason,
        seconds_per_step=train_seconds / (per_run * len(runs)) if runs else math.nan,
        mode="probe",
        spent_steps=per_run * len(runs),
        start_loss=start_loss,
        run_losses=[r.evals for r in runs],
    )


def combine_seeds(curves: list[RangeTestCurve]) -> RangeTestCurve:
    """One probe curve from the same probe run with several seeds: the LRs that every seed ran
    (each went up to its own divergence and down to its own interval's edge), the mean loss
    per LR, each seed's in ``seed_losses``, and the cost of them all; ``run_losses`` are the
    first seed's."""
    if len(curves) == 1:
        return curves[0]
    lrs = sorted(set.intersection(*(set(c.lrs) for c in curves)))
    at = [[c.lrs.index(lr) for c in curves] for lr in lrs]

    def per_lr(values: Sequence[Sequence[float]]) -> list[list[float]]:
        return [[float(v[i]) for v, i in zip(values, idx, strict=True)] for idx in at]

    def summed(cumulative: Sequence[Sequence[float]]) -> list[float]:
        runs = [np.diff(np.asarray(c, dtype=float), prepend=0).tolist() for c in cumulative]
        return np.cumsum([sum(row) for row in per_lr(runs)]).tolist()

    seed_losses = per_lr([c.losses for c in curves])
    losses = [float(np.mean(row)) for row in seed_losses]
    starts = [c.start_loss for c in curves if c.start_loss is not None]
    first = curves[0]
    return RangeTestCurve(
        lrs=lrs,
        losses=losses,
        smoothed=losses,
        train_losses=[float(np.mean(row)) for row in per_lr([c.train_losses for c in curves])],
        tokens=[int(t) for t in summed([c.tokens for c in curves])],
        seconds=summed([c.seconds for c in curves]),
        stop_reason=next((c.stop_reason for c in curves if lrs and c.lrs[-1] == lrs[-1]), None),
        seconds_per_step=float(np.mean([c.seconds_per_step for c in curves])),
        mode="probe",
        spent_steps=sum(c.spent_steps for c in curves),
        start_loss=float(np.mean(starts)) if starts else None,
        run_losses=[first.run_losses[idx[0]] for idx in at] if first.run_losses else None,
        seed_losses=seed_losses,
    )
