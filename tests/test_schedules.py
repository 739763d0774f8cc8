from __future__ import annotations

import math

import pytest

from lrsweep.schedules import Schedule, ramp


def test_exp_ramp_is_geometric_from_start_to_end() -> None:
    lrs = ramp(1e-6, 1e-1, 11)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(r == pytest.approx(10**0.5) for r in ratios)


def test_linear_ramp_is_evenly_spaced() -> None:
    lrs = ramp(0.0001, 0.0011, 11, mode="linear")
    assert [round(b - a, 12) for a, b in zip(lrs, lrs[1:], strict=False)] == [0.0001] * 10


def _design_formula(s: int, peak: float, w: int, t: int, r: float) -> float:
    # ../shared/DESIGN.md, "The schedule (must match transformers exactly)".
    if s < w:
        return peak * s / max(1, w)
    return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, t - w))))


@pytest.mark.parametrize(
    ("total", "fraction", "ratio"),
    [
        (100, 0.0, 0.0),
        (100, 0.1, 0.1),
        (37, 0.05, 0.3),
        (10, 0.2, 0.0),
        (200, 0.013, 0.25),
    ],
)
def test_cosine_matches_the_documented_formula(total: int, fraction: float, ratio: float) -> None:
    sched = Schedule(3e-4, total, fraction, ratio)
    assert sched.warmup_steps == math.ceil(fraction * total)
    expected = [_design_formula(s, 3e-4, sched.warmup_steps, total, ratio) for s in range(total)]
    assert sched.lrs() == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_transformers_quirks_are_kept() -> None:
    lrs = Schedule(1e-3, 50, 0.1, 0.2).lrs()
    assert lrs[0] == 0.0  # with warmup the first update uses LR 0
    assert lrs[5] == pytest.approx(1e-3)  # the peak is reached at step W
    assert min(lrs[5:]) > 0.2 * 1e-3  # the floor is approached, never reached
    assert Schedule(1e-3, 50, 0.0, 0.0).lrs()[0] == 1e-3  # no warmup: peak first
