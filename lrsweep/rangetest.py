"""The LR range test: a short run whose LR grows each optimizer step, recording the loss.

It leaves no trace: the trainable weights, the optimizer state and the RNG states are
snapshotted before and restored afterwards, also when the run fails midway.
"""

from __future__ import annotations

import copy
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
from lrsweep.training import Precision, StepRecord, train


@dataclass
class RangeTestCurve:
    """One point per optimizer step of the ramp (fewer when it stopped early)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    tokens: list[int]
    seconds: list[float]
    stop_reason: str | None

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "step": np.arange(len(self.lrs), dtype=np.int64),
            "lr": self.lrs,
            "loss": self.losses,
            "smoothed_loss": self.smoothed,
            "tokens": np.asarray(self.tokens, dtype=np.int64),
            "seconds": self.seconds,
        })

    @property
    def seconds_per_step(self) -> float:
        return self.seconds[-1] / len(self.seconds) if self.seconds else float("nan")


@dataclass
class _Snapshot:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    python_rng: object
    numpy_rng: dict[str, Any]


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              precision: Precision) -> _Snapshot:
    return _Snapshot(
        weights=trainable_state(model),
        optimizer=copy.deepcopy(optimizer.state_dict()),
        scaler=copy.deepcopy(precision.scaler.state_dict()) if precision.scaler else None,
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),  # type: ignore[arg-type]
    )


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
             saved: _Snapshot) -> None:
    load_trainable_state(model, saved.weights)
    optimizer.load_state_dict(saved.optimizer)
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
    progress: bool = True,
) -> RangeTestCurve:
    """Ramp the LR from ``start_lr`` to ``end_lr`` and record the loss of every step.

    Stops early when the loss is not finite or its smoothed value exceeds
    ``diverge_factor`` times its best. The model and optimizer come back as they were.
    """
    lrs = ramp(config.start_lr, config.end_lr, config.steps, config.mode)
    losses: list[float] = []

    def watch(record: StepRecord) -> str | None:
        losses.append(record.loss)
        if divergence_index(losses, config.smoothing, config.diverge_factor) is not None:
            return f"diverged at lr {record.lr:.3g} (smoothed loss > {config.diverge_factor}x best)"
        return None

    saved = _snapshot(model, optimizer, precision)
    try:
        result = train(
            model, optimizer, batches, lrs,
            grad_accum=grad_accum, max_grad_norm=max_grad_norm, precision=precision,
            on_step=watch, desc="range test", progress=progress,
        )
    finally:
        _restore(model, optimizer, precision, saved)
    records = result.records
    raw = [r.loss for r in records]
    if result.stop_reason and result.stop_reason.startswith("non-finite"):
        # Keep the point that broke, so the curve shows where it happened.
        raw.append(float("nan"))
        records = [*records, StepRecord(len(records), lrs[len(records)], float("nan"),
                                        float("nan"), records[-1].tokens if records else 0,
                                        records[-1].seconds if records else 0.0)]
    return RangeTestCurve(
        lrs=[r.lr for r in records],
        losses=raw,
        smoothed=ema(raw, config.smoothing).tolist(),
        tokens=[r.tokens for r in records],
        seconds=[r.seconds for r in records],
        stop_reason=result.stop_reason,
    )
