"""The planned run's length: how it is read and what it does to the suggestion."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lrsweep.horizon import (
    CALIBRATION_STEPS,
    PROBE_HELD_OUT,
    carry,
    lowest_factor,
    planned_steps,
)
from lrsweep.rangetest import RangeTestCurve
from lrsweep.suggest import suggest_probe


def _probe(best_lr: float = 3e-3) -> tuple[list[float], list[float]]:
    """A synthetic probe: 9 runs half a decade apart, a valley at ``best_lr`` in log10(LR)
    and divergence two runs above it."""
    lrs = [10 ** (-5 + 0.5 * i) for i in range(9)]
    losses = [3.0 - 0.3 * max(0.0, 1 - (math.log10(lr / best_lr) / 1.5) ** 2) for lr in lrs]
    top = int(np.argmin(losses))
    losses[top + 2 :] = [8.0] * (len(lrs) - top - 2)
    return lrs, losses


def test_planned_steps_max_steps_win_and_epochs_count_the_training_set() -> None:
    assert planned_steps(500, 3.0, 1000, 8) == 500
    assert planned_steps(0, 3.0, 1000, 8) == 375
    assert planned_steps(0, 0.5, 3, 8) == 1  # never 0 steps for a real run
    assert planned_steps(0, 3.0, 0, 8) == 0  # epochs of an unknown training set


def test_a_longer_run_keeps_the_number_and_widens_the_interval_down() -> None:
    found = suggest_probe(*_probe(), 3.0)
    assert found.recommended_lr is not None and found.interval is not None
    for steps in (1, CALIBRATION_STEPS):
        assert carry(found, steps) == found
    carried = carry(found, 10 * CALIBRATION_STEPS)
    assert carried.recommended_lr == found.recommended_lr
    assert carried.divergence_lr == found.divergence_lr
    low, high = carried.interval  # type: ignore[misc]
    # The largest shift the grid measured at 10x the steps: 0.75 decade.
    assert math.log10(found.interval[0] / low) == pytest.approx(0.75)
    assert high == found.interval[1]
    assert any("1000 steps" in w and "5.6x lower" in w for w in carried.warnings)
    # A longer run reaches further down, never past the measured rate.
    assert lowest_factor(10_000) == pytest.approx(10**-1.5)
    assert lowest_factor(10_000) < lowest_factor(1000) < lowest_factor(101) < 1.0


def test_no_recommendation_is_carried_as_it_is() -> None:
    flat = suggest_probe([1e-4, 1e-3, 1e-2, 1e-1], [3.0, 2.999, 2.9995, 3.0], 3.0)
    assert flat.recommended_lr is None and carry(flat, 5000) == flat


def _curve(losses: list[float], start_loss: float) -> RangeTestCurve:
    n = len(losses)
    lrs = [10 ** (-5 + 0.5 * i) for i in range(n)]
    return RangeTestCurve(
        lrs, losses, losses, losses, [0] * n, [0.0] * n, None, 1.0, "probe", 12 * n, start_loss
    )


def test_a_probe_that_barely_lowers_the_loss_says_the_number_may_be_too_high() -> None:
    """The C headers' probe: its best run lowered the held-out loss by 1.0 % and the best
    peak LR of complete fine-tunes lay 3.6-11x below the number; every other corpus's dropped
    by 3 % or more. The number stays; the interval reaches down as far as that."""
    known = _curve([2.995, 2.99, 2.98, 2.97, 2.965, 3.02, 9.0], 2.995)
    fresh = _curve([2.99, 2.95, 2.85, 2.7, 2.6, 2.8, 9.0], 2.995)
    assert known.best_drop == pytest.approx(0.01, abs=1e-4)
    said, reach = {}, {}
    for name, curve in (("known", known), ("fresh", fresh)):
        found = suggest_probe(curve.lrs, curve.losses, 2.995)
        carried = carry(found, CALIBRATION_STEPS, curve.best_drop)
        assert found.recommended_lr is not None and found.interval is not None
        # A caveat, not a correction: the number and the interval's top stay.
        assert carried.recommended_lr == found.recommended_lr
        assert carried.interval is not None and carried.interval[1] == found.interval[1]
        reach[name] = found.recommended_lr / carried.interval[0]
        said[name] = " ".join(carried.warnings)
    assert "lowered the held-out loss by only 1.0%" in said["known"]
    assert reach["known"] == pytest.approx(PROBE_HELD_OUT)
    assert "already predicts" not in said["fresh"] and reach["fresh"] < PROBE_HELD_OUT / 2
    # The known data's reach and a long run's widening both apply, one after the other.
    long = carry(suggest_probe(known.lrs, known.losses, 2.995), 1000, known.best_drop)
    assert long.interval is not None and long.recommended_lr is not None
    reach_long = long.recommended_lr / long.interval[0]
    assert reach_long == pytest.approx(PROBE_HELD_OUT / lowest_factor(1000))
    # The ramp trains as it goes: no untrained loss to compare its points with.
    assert dataclasses.replace(known, mode="ramp").best_drop is None
