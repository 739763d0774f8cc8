"""Suggestions on synthetic range-test curves whose steepest point and minimum are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lrsweep.suggest import (
    FLAT,
    METHODS,
    NEVER_DIVERGED,
    TOO_FEW,
    MethodResult,
    Suggestion,
    divergence_index,
    ema,
    minimum,
    slide,
    steep,
    suggest,
    suggest_probe,
    suggest_probe_seeds,
    valley,
)


LRS = np.geomspace(1e-7, 1, 100)
SEEDS = [0, 1, 2, 3, 4, 5]


def clean_loss(lrs: np.ndarray, centre: float = -4.0, blowup: bool = True) -> np.ndarray:
    """A drop from 2 to 1 centred at 10**centre, then (optionally) an explosion past ~1e-2."""
    x = np.log10(lrs)
    loss = 2.0 - 1.0 / (1.0 + np.exp(-(x - centre) * 3.0))
    return loss + 0.05 * np.exp(4.0 * (x + 1.5)) if blowup else loss


def noisy(loss: np.ndarray, seed: int, sigma: float = 0.02) -> np.ndarray:
    return loss + np.random.default_rng(seed).normal(0.0, sigma, len(loss))


def truth() -> tuple[float, float]:
    """Steepest point and minimum of the clean curve, on a fine grid."""
    fine = np.geomspace(1e-7, 1, 200_001)
    loss = clean_loss(fine)
    grad = np.gradient(loss, np.log10(fine))
    return float(fine[np.argmin(grad)]), float(fine[np.argmin(loss)])


STEEPEST, LOWEST = truth()


def decades(a: float, b: float) -> float:
    return abs(math.log10(a) - math.log10(b))


def test_truth_is_what_the_curve_was_built_for() -> None:
    assert decades(STEEPEST, 1e-4) < 0.01
    assert 1e-3 < LOWEST < 1e-2


def test_ema_is_bias_corrected() -> None:
    losses = [3.0, 1.0, 2.0, 5.0]
    out = ema(losses, 0.98)
    assert out[0] == pytest.approx(3.0)
    assert np.allclose(ema([2.5] * 50, 0.98), 2.5)
    avg, expected = 0.0, []
    for i, v in enumerate(losses):
        avg = 0.98 * avg + 0.02 * v
        expected.append(avg / (1 - 0.98 ** (i + 1)))
    assert np.allclose(out, expected)


def test_ema_skips_non_finite_and_beta_zero_is_raw() -> None:
    out = ema([math.nan, 2.0, math.inf, 2.0], 0.9)
    assert math.isnan(out[0]) and math.isnan(out[2])
    assert out[1] == pytest.approx(2.0) and out[3] == pytest.approx(2.0)
    assert np.array_equal(ema([1.0, 4.0, 2.0], 0.0), [1.0, 4.0, 2.0])
    with pytest.raises(ValueError):
        ema([1.0], 1.0)


def test_divergence_index_on_a_known_curve() -> None:
    assert divergence_index([4, 3, 2, 1, 2, 3.9, 5], 0.0, 4.0) == 6
    assert divergence_index([4, 3, 2, 1, 2, 3.9], 0.0, 4.0) is None
    assert divergence_index([4, 3, math.nan, 1], 0.0, 4.0) == 2
    assert divergence_index([1.0, 1.0, math.inf], 0.9, 4.0) == 2
    # Smoothing delays the stop: one step at 5x is not yet 4x in the beta=0.9 average.
    assert divergence_index([1.0] * 20 + [5.0], 0.9, 4.0) is None
    assert divergence_index([1.0] * 20 + [50.0], 0.9, 4.0) == 20


def test_clean_curve_has_no_smoothing_lag() -> None:
    # A causal EMA would move the steepest point about half a decade to the right.
    result = steep(LRS, clean_loss(LRS))
    assert result.lr is not None and decades(result.lr, STEEPEST) < 0.1


@pytest.mark.parametrize("seed", SEEDS)
def test_methods_find_the_known_points(seed: int) -> None:
    loss = noisy(clean_loss(LRS), seed)
    results = {name: fn(LRS, loss) for name, fn in METHODS.items()}
    lrs = {name: r.lr for name, r in results.items()}
    assert all(r.reason is None for r in results.values()), results
    assert decades(lrs["steep"], STEEPEST) < 0.5
    assert decades(lrs["minimum"], LOWEST / 10) < 0.5
    # valley: about half-way down the descent, so around steep and well before the minimum.
    assert lrs["steep"] / 10**0.3 <= lrs["valley"] <= LOWEST / 3
    # slide: where the gradient settles again, just before the minimum.
    assert LOWEST / 10 < lrs["slide"] <= LOWEST * 2


@pytest.mark.parametrize("seed", SEEDS)
def test_suggestion_interval_and_divergence(seed: int) -> None:
    s = suggest(LRS, noisy(clean_loss(LRS), seed))
    assert s.basis == "valley" and s.reason is None
    assert s.recommended_lr == s.methods["valley"].lr
    assert s.divergence_lr is not None and LOWEST < s.divergence_lr < 1.0
    assert s.interval is not None
    lo, hi = s.interval
    assert lo <= s.recommended_lr <= hi < s.divergence_lr
    assert hi / lo >= 3.0
    assert lo <= min(m.lr for m in s.methods.values() if m.lr is not None)
    assert s.warnings == ()


def test_methods_ignore_the_loss_scale() -> None:
    loss = noisy(clean_loss(LRS), 7)
    for name, fn in METHODS.items():
        assert fn(LRS, 10 * loss).lr == fn(LRS, loss).lr, name


@pytest.mark.parametrize("seed", SEEDS)
def test_flat_curve_gives_no_recommendation(seed: int) -> None:
    s = suggest(LRS, noisy(np.full(100, 2.0), seed))
    for name, result in s.methods.items():
        assert result.lr is None and "flat" in (result.reason or ""), name
    assert s.recommended_lr is None and s.interval is None
    assert "flat" in (s.reason or "")
    assert s.divergence_lr is None


def test_flat_then_blowup_is_flat_not_diverged_at_once() -> None:
    x = np.log10(LRS)
    s = suggest(LRS, noisy(2.0 + 0.05 * np.exp(4.0 * (x + 1.5)), 0))
    assert s.recommended_lr is None and "flat" in (s.reason or "")
    assert s.divergence_lr is not None and 1e-3 < s.divergence_lr < 1.0


@pytest.mark.parametrize("shape", ["linear", "exponential"])
def test_curve_rising_from_the_start(shape: str) -> None:
    x = np.log10(LRS) + 7
    loss = 2.0 + 0.3 * x if shape == "linear" else 1.0 + np.exp(x)
    s = suggest(LRS, noisy(loss, 0))
    for name, result in s.methods.items():
        assert result.lr is None and (result.reason or "").startswith("diverged at once"), name
    assert s.recommended_lr is None and "start_lr" in (s.reason or "")
    assert s.divergence_lr is not None and s.divergence_lr < 1e-5


def test_non_finite_points_inside_are_dropped() -> None:
    loss = noisy(clean_loss(LRS), 3)
    holed = loss.copy()
    holed[[40, 41, 65]] = [math.nan, math.inf, -math.inf]
    for name, fn in METHODS.items():
        clean, dropped = fn(LRS, loss).lr, fn(LRS, holed).lr
        assert clean is not None and dropped is not None, name
        assert decades(clean, dropped) < 0.3, name
    s = suggest(LRS, holed)
    assert s.recommended_lr is not None and s.interval is not None
    # A non-finite loss counts as divergence, so the recommendation past it is flagged.
    assert s.divergence_lr == pytest.approx(LRS[40])
    assert "recommendation is not below divergence_lr" in s.warnings
    assert s.interval[0] <= s.recommended_lr <= s.interval[1]


def test_curve_ending_in_nan() -> None:
    loss = noisy(clean_loss(LRS), 1)
    loss[85:] = math.nan
    s = suggest(LRS, loss)
    assert s.divergence_lr is not None and s.divergence_lr <= LRS[85]
    assert s.recommended_lr is not None and s.interval is not None
    assert s.interval[1] < s.divergence_lr


def test_never_diverging_curve_warns() -> None:
    s = suggest(LRS, noisy(clean_loss(LRS, blowup=False), 0))
    assert s.divergence_lr is None and s.recommended_lr is not None
    assert "never diverged: end_lr may be too low" in s.warnings


def test_descent_at_the_end_of_the_range_warns() -> None:
    s = suggest(LRS, noisy(clean_loss(LRS, centre=-0.4, blowup=False), 0), basis="steep")
    assert s.recommended_lr is not None and s.recommended_lr > 0.1
    assert "suggestion at the edge of the tested range" in s.warnings


def test_noisy_curve_warns() -> None:
    s = suggest(LRS, noisy(clean_loss(LRS), 0, sigma=0.2))
    assert s.recommended_lr is not None
    assert "curve is noisy" in s.warnings
    assert "curve is noisy" not in suggest(LRS, noisy(clean_loss(LRS), 0, sigma=0.02)).warnings


@pytest.mark.parametrize("n_finite", [0, 5, 9])
def test_too_few_points(n_finite: int) -> None:
    loss = clean_loss(LRS)[:30].copy()
    loss[n_finite:] = math.nan
    for fn in METHODS.values():
        assert fn(LRS[:30], loss) == MethodResult(None, "too few finite points")
    s = suggest(LRS[:30], loss)
    assert s.recommended_lr is None and s.reason == "too few finite points"


def test_basis_choice_and_unknown_basis() -> None:
    loss = noisy(clean_loss(LRS), 0)
    s = suggest(LRS, loss, basis="minimum")
    assert s.basis == "minimum" and s.recommended_lr == minimum(LRS, loss).lr
    assert suggest(LRS, loss, basis="slide").recommended_lr == slide(LRS, loss).lr
    assert suggest(LRS, loss).recommended_lr == valley(LRS, loss).lr
    with pytest.raises(ValueError, match="unknown basis"):
        suggest(LRS, loss, basis="median")


@pytest.mark.parametrize("curve", ["normal", "flat"])
def test_suggestion_round_trips_through_json(curve: str) -> None:
    loss = clean_loss(LRS) if curve == "normal" else np.full(100, 2.0)
    s = suggest(LRS, noisy(loss, 0))
    d = json.loads(json.dumps(s.to_dict()))
    assert set(d) == {
        "recommended_lr",
        "interval",
        "divergence_lr",
        "methods",
        "reason",
        "warnings",
        "basis",
    }
    assert Suggestion.from_dict(d) == s


def _probe_curve(best: float, start: float = 3.0, depth: float = 0.3) -> tuple[list, list]:
    """Losses of fixed-LR runs: a parabola in log10(lr) with its minimum at ``best``."""
    lrs = [10 ** (-5 + 0.5 * i) for i in range(9)]
    losses = [start - depth + 0.3 * (math.log10(lr) - math.log10(best)) ** 2 for lr in lrs]
    return lrs, losses


@pytest.mark.parametrize("best", [3e-4, 1.3e-3, 5e-3])
def test_probe_finds_the_vertex_between_the_runs(best: float) -> None:
    lrs, losses = _probe_curve(best)
    s = suggest_probe(lrs, losses, 3.0)
    assert s.recommended_lr == pytest.approx(best, rel=1e-6)
    assert s.interval is not None and s.interval[0] < best < s.interval[1]
    # The first run above the best that keeps under a tenth of the best drop (0.3) is the
    # divergence LR.
    first_worse = next(lr for lr, loss in zip(lrs, losses) if lr > best and loss > 2.97)
    assert s.divergence_lr == first_worse
    assert s.interval[1] <= first_worse / 2


@pytest.mark.parametrize("noise", [+0.0003, -0.0003])
def test_probe_divergence_does_not_flip_on_noise_near_the_untrained_loss(noise: float) -> None:
    """A run that ends at about the untrained loss has given back the best run's drop: the
    divergence LR (the sweep's upper bound) is the same whichever side of it rounding puts
    it, as on the bundled model, whose 1e-2 run ended 0.3 % above the untrained loss in one
    run and 0.07 % below it in another."""
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    s = suggest_probe(lrs, [2.99, 2.95, 2.9, 3.0 + noise, 9.0], 3.0)
    assert s.divergence_lr == 1e-2
    assert s.recommended_lr is not None and s.interval is not None
    assert s.interval[1] <= 1e-2 / 2
    # A run that keeps a real share of the drop is not diverged.
    kept = suggest_probe(lrs, [2.99, 2.95, 2.9, 2.97, 9.0], 3.0)
    assert kept.divergence_lr == 1e-1


def test_probe_interval_spans_the_runs_that_are_as_good() -> None:
    lrs = [10 ** (-5 + 0.5 * i) for i in range(9)]  # 1e-5 .. 1e-1, half a decade apart
    sharp = suggest_probe(lrs, [2.99, 2.98, 2.97, 2.95, 2.7, 2.95, 2.97, 3.1, 3.5], 3.0)
    broad = suggest_probe(lrs, [2.99, 2.98, 2.72, 2.71, 2.7, 2.71, 2.72, 3.1, 3.5], 3.0)
    assert sharp.interval is not None and broad.interval is not None
    # One best run: the interval is one run spacing either side of it.
    assert sharp.interval == pytest.approx((10**-3.5, 10**-2.5))
    # Runs as good as the best widen it to their span.
    assert broad.interval == pytest.approx((1e-4, 1e-2))


def test_probe_flat_edges_and_too_few() -> None:
    lrs = [1e-5, 1e-4, 1e-3, 1e-2]
    flat = suggest_probe(lrs, [3.0, 2.999, 2.9995, 3.0], 3.0)
    assert flat.recommended_lr is None and flat.reason == FLAT
    low = suggest_probe(lrs, [2.5, 2.7, 2.9, 3.2], 3.0)
    assert any("lowest LR" in w for w in low.warnings)
    high = suggest_probe(lrs, [2.95, 2.9, 2.8, 2.6], 3.0)
    assert high.divergence_lr is None
    assert any("never diverged" in w for w in high.warnings)
    assert any("edge" in w for w in high.warnings)
    nan = suggest_probe(lrs, [2.9, math.nan, math.nan, math.nan], 3.0)
    assert nan.recommended_lr is None and nan.reason == TOO_FEW


def test_probe_over_seeds_recommends_from_the_mean_and_its_interval_covers_each_seed() -> None:
    lrs = [10 ** (-5 + 0.5 * i) for i in range(9)]
    # Seed 0 is best at 1e-4, seed 1 at 3.2e-3; both are good in between, where the mean is.
    seed0 = [2.99, 2.95, 2.70, 2.75, 2.75, 2.95, 2.96, 3.5, 9.0]
    seed1 = [2.99, 2.99, 2.98, 2.75, 2.75, 2.70, 2.95, 3.5, 9.0]
    seeds = suggest_probe_seeds(lrs, list(zip(seed0, seed1, strict=True)), 3.0)
    mean = suggest_probe(lrs, [(a + b) / 2 for a, b in zip(seed0, seed1, strict=True)], 3.0)
    assert seeds.recommended_lr == mean.recommended_lr
    lo, hi = seeds.methods["seed 0"].lr, seeds.methods["seed 1"].lr
    assert lo == suggest_probe(lrs, seed0, 3.0).recommended_lr and lo is not None
    assert hi == suggest_probe(lrs, seed1, 3.0).recommended_lr and hi is not None
    # The mean curve's interval is narrower than the seeds' spread; the seeds' holds both.
    assert mean.interval is not None and mean.interval[0] > lo and mean.interval[1] < hi
    assert seeds.interval is not None
    assert seeds.interval[0] <= lo and hi <= seeds.interval[1]
    assert seeds.divergence_lr == mean.divergence_lr == lrs[7]
    # Seeds that agree leave the mean's suggestion as it is.
    same = suggest_probe_seeds(lrs, [(v, v) for v in seed0], 3.0)
    alone = suggest_probe(lrs, seed0, 3.0)
    assert (same.recommended_lr, same.interval) == (alone.recommended_lr, alone.interval)


def test_probe_over_seeds_diverges_where_the_first_seed_did() -> None:
    """The probe stops every seed at the first one's divergence: the mean of a diverged run
    and a good one can look fine, but the sweep's bounds must stay below it."""
    lrs = [10 ** (-5 + 0.5 * i) for i in range(8)]
    seed0 = [2.99, 2.95, 2.80, 2.70, 2.75, 2.85, 2.95, 3.05]  # diverged at 3.2e-2
    seed1 = [2.99, 2.96, 2.82, 2.72, 2.74, 2.78, 2.76, 2.75]
    mean = suggest_probe(lrs, [(a + b) / 2 for a, b in zip(seed0, seed1, strict=True)], 3.0)
    assert mean.divergence_lr is None and NEVER_DIVERGED in mean.warnings
    seeds = suggest_probe_seeds(lrs, list(zip(seed0, seed1, strict=True)), 3.0)
    assert seeds.divergence_lr == lrs[7] and NEVER_DIVERGED not in seeds.warnings
    assert seeds.interval is not None and seeds.interval[1] <= lrs[7] / 2


def test_the_number_over_seeds_stays_below_any_seed_s_divergence() -> None:
    """A diverged run and a good one can average to the best: where one seed diverged, the
    mean counts as diverged too."""
    lrs = [1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2]
    for seed0, seed1 in [
        ([2.9, 2.7, 2.5, 2.96, 3.1], [2.9, 2.7, 2.6, 1.9, 3.1]),  # seed 0 diverged at the best
        ([2.9, 2.0, 2.95, 2.96, math.nan], [2.9, 2.8, 2.0, 0.5, math.nan]),  # and below it
    ]:
        seeds = suggest_probe_seeds(lrs, list(zip(seed0, seed1, strict=True)), 3.0)
        assert seeds.divergence_lr is not None and seeds.recommended_lr is not None
        assert seeds.recommended_lr < seeds.divergence_lr, (
            seeds.recommended_lr,
            seeds.divergence_lr,
        )
        assert seeds.interval is not None and seeds.interval[1] <= seeds.divergence_lr / 2


def test_the_divergence_lr_is_where_the_ramp_stops_at_its_own_smoothing() -> None:
    """One spike of 40x: the ramp's default EMA (0.9) stops there, a slower one (0.98, as in
    fastai) rides it out, and the suggestion's divergence LR follows rangetest.smoothing."""
    from lrsweep.config import RangeTestConfig
    from lrsweep.find import suggestion_of
    from lrsweep.rangetest import RangeTestCurve

    loss = noisy(clean_loss(LRS, blowup=False), 0)
    loss[70] = 40.0
    n = len(LRS)
    curve = RangeTestCurve(
        LRS.tolist(),
        loss.tolist(),
        loss.tolist(),
        loss.tolist(),
        [0] * n,
        [0.0] * n,
        None,
        1.0,
        "ramp",
    )
    for beta, stop in ((0.9, 70), (0.98, None)):
        assert divergence_index(loss, beta, 4.0) == stop
        found = suggestion_of(curve, RangeTestConfig(mode="ramp", smoothing=beta))
        assert found.divergence_lr == (None if stop is None else LRS[stop])
