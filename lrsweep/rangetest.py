"""The LR range test, in two modes: a ramp (one short run whose LR grows each optimizer step,
recording the loss) or probes (short runs at fixed LRs from the same start, each scored by the
held-out loss at its end).

Either leaves no trace: the trainable weights, the optimizer state and the RNG states are
snapshotted before and restored afterwards, also when the run fails midway.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lrsweep.config import RangeTestConfig
from lrsweep.models import load_trainable_state, trainable_state
from lrsweep.schedules import ramp
from lrsweep.suggest import divergence_index, ema
from lrsweep.training import Precision, StepRecord, evaluate, train


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

    @property
    def optimizer_steps(self) -> int:
        """What the range test cost in optimizer steps."""
        return self.spent_steps if self.mode == "probe" else len(self.lrs)

    def frame(self) -> pd.DataFrame:
        extra = {} if self.run_losses is None else {"run_losses": self.run_losses}
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


@dataclass
class _Snapshot:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    python_rng: object
    numpy_rng: dict[str, Any]


def _snapshot(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision
) -> _Snapshot:
    return _Snapshot(
        weights=trainable_state(model),
        optimizer=copy.deepcopy(optimizer.state_dict()),
        scaler=copy.deepcopy(precision.scaler.state_dict()) if precision.scaler else None,
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),  # type: ignore[arg-type]
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
    torch.set_rng_state(saved.torch_rng)
    if saved.cuda_rng:
        torch.cuda.set_rng_state_all(saved.cuda_rng)
    random.setstate(saved.python_rng)  # type: ignore[arg-type]
    np.random.set_state(saved.numpy_rng)  # type: ignore[arg-type]


def run_range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    config: RangeTestConfig,
    *,
    grad_accum: int,
    max_grad_norm: float,
    precision: Precision,
    probe: torch.Tensor | None = None,
    eval_batch_size: int = 8,
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

    saved = _snapshot(model, optimizer, precision)
    try:
        result = train(
            model,
            optimizer,
            batches,
            lrs,
            grad_accum=grad_accum,
            max_grad_norm=max_grad_norm,
            precision=precision,
            eval_blocks=probe[: config.probe_blocks] if use_eval else None,  # type: ignore[index]
            eval_every=1,
            eval_batch_size=eval_batch_size,
            on_step=watch,
            desc="range test",
            progress=progress,
        )
    finally:
        _restore(model, optimizer, precision, saved)
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
        smoothed=ema(losses, config.smoothing).tolist(),
        train_losses=train_losses,
        tokens=tokens,
        seconds=seconds,
        stop_reason=result.stop_reason,
        seconds_per_step=records[-1].train_seconds / len(records) if records else math.nan,
    )


def run_probes(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    config: RangeTestConfig,
    *,
    grad_accum: int,
    max_grad_norm: float,
    precision: Precision,
    probe: torch.Tensor,
    eval_batch_size: int = 8,
    eval_every: int = 0,
    progress: bool = True,
) -> RangeTestCurve:
    """``config.runs`` runs of ``run_steps`` steps at fixed LRs from ``start_lr`` to
    ``end_lr``, each from the same weights, optimizer state, RNG state and batches, so that
    they differ only by their LR; each is scored by the loss on all of ``probe`` at its end
    (and every ``eval_every`` steps, for ``run_losses``). Runs stop at the first LR that ends
    non-finite or above the untrained loss once a lower LR improved on it."""
    lrs = ramp(config.start_lr, config.end_lr, config.runs, config.spacing)
    per_run = config.run_steps
    fixed = [next(batches) for _ in range(per_run * grad_accum)]
    saved = _snapshot(model, optimizer, precision)
    points: list[tuple[float, float, list[float], float, int, float]] = []
    stop_reason = None
    train_seconds = 0.0
    start_loss = evaluate(model, probe, eval_batch_size, precision)
    try:
        for i, lr in enumerate(lrs):
            _restore(model, optimizer, precision, saved)
            result = train(
                model,
                optimizer,
                iter(fixed),
                [lr] * per_run,
                grad_accum=grad_accum,
                max_grad_norm=max_grad_norm,
                precision=precision,
                eval_blocks=probe,
                eval_every=eval_every or per_run,
                eval_batch_size=eval_batch_size,
                desc=f"probe {i + 1}/{len(lrs)} lr {lr:.1e}",
                progress=progress,
            )
            records = result.records
            evals = [r.eval_loss for r in records if r.eval_loss is not None]
            done = len(records) == per_run and evals
            loss = evals[-1] if done else math.nan  # type: ignore[index]
            train_loss = float(np.mean([r.loss for r in records])) if records else math.nan
            tokens = (points[-1][4] if points else 0) + (records[-1].tokens if records else 0)
            seconds = records[-1].seconds if records else 0.0
            points.append((lr, loss, evals, train_loss, tokens, seconds))  # type: ignore[arg-type]
            train_seconds += records[-1].train_seconds if records else 0.0
            improved = any(p[1] < start_loss for p in points[:-1])
            if not math.isfinite(loss) or (improved and loss > start_loss):
                stop_reason = f"diverged at lr {lr:.3g} (held-out loss above the untrained one)"
                break
    finally:
        _restore(model, optimizer, precision, saved)
    losses = [p[1] for p in points]
    return RangeTestCurve(
        lrs=[p[0] for p in points],
        losses=losses,
        smoothed=losses,
        train_losses=[p[3] for p in points],
        tokens=[p[4] for p in points],
        seconds=list(np.cumsum([p[5] for p in points])),
        stop_reason=stop_reason,
        seconds_per_step=train_seconds / (per_run * len(points)) if points else math.nan,
        mode="probe",
        spent_steps=per_run * len(points),
        start_loss=start_loss,
        run_losses=[p[2] for p in points],
    )
