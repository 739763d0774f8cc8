"""LR suggestions from a range-test curve: pure functions of (lrs, raw losses), numpy only.

Every method drops non-finite points, smooths with a zero-lag centred moving average (a causal
EMA shifts each suggestion to the right, about half a decade on a 100-step test), trims the first
10% like fastai and differentiates against log10(lr). When the curve has no usable descent a
method returns ``MethodResult(None, reason)`` rather than a made-up number.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lrsweep.config import RangeTestConfig


log = logging.getLogger(__name__)

TOO_FEW = "too few finite points"
FLAT = "flat curve: the loss never fell"
DIVERGED_AT_ONCE = "diverged at once: the loss rose from the start; lower start_lr"
SHORT_DESCENT = "too few points in the descent"

_MIN_POINTS = 10
_HEAD = 10  # the first n // _HEAD points are early noise (fastai trims num_it // 10)
_NOISE_SIGMAS = 3.0
NEVER_DIVERGED = "never diverged: end_lr may be too low"
_MIN_DROP = 0.002  # a descent must also exceed 0.2% of the start loss (LoRA drops are small)
_MIN_WIDTH = 3.0  # the interval spans at least this factor
_DIVERGENCE_MARGIN = 2.0  # the interval stays this factor below divergence_lr
_EDGE = 0.1  # fraction of the tested log-LR range that counts as an edge
# Raw noise above this fraction of the descent is "noisy": on a 100-step synthetic curve the
# steepest point then scatters over more than a decade across seeds (0.4 decade at 0.02).
_NOISY = 0.1
# A probe run above the best that keeps less than this share of the best run's loss drop has
# given back what the LR gained: it counts as diverged. Plain "worse than untrained" flips on
# rounding noise when a run ends near the untrained loss (on the bundled model the 1e-2 run
# ended 0.3 % above it in one run and 0.07 % below in a rerun, moving the sweep's upper bound
# half a decade); on the quality benchmark no run lay between 0 and this share at 6 steps.
_DIVERGED_SHARE = 0.1


@dataclass(frozen=True)
class MethodResult:
    lr: float | None
    reason: str | None = None  # why lr is None (one short phrase), else None


@dataclass(frozen=True)
class Suggestion:
    recommended_lr: float | None
    interval: tuple[float, float] | None
    divergence_lr: float | None  # None if the curve never diverged
    methods: dict[str, MethodResult]
    reason: str | None = None  # why there is no recommendation
    warnings: tuple[str, ...] = ()
    basis: str = "valley"  # the method recommended_lr came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "recommended_lr": self.recommended_lr,
            "interval": list(self.interval) if self.interval is not None else None,
            "divergence_lr": self.divergence_lr,
            "methods": {k: {"lr": m.lr, "reason": m.reason} for k, m in self.methods.items()},
            "reason": self.reason,
            "warnings": list(self.warnings),
            "basis": self.basis,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Suggestion:
        iv = d.get("interval")
        return cls(
            recommended_lr=d.get("recommended_lr"),
            interval=(float(iv[0]), float(iv[1])) if iv is not None else None,
            divergence_lr=d.get("divergence_lr"),
            methods={
                k: MethodResult(m.get("lr"), m.get("reason"))
                for k, m in d.get("methods", {}).items()
            },
            reason=d.get("reason"),
            warnings=tuple(d.get("warnings", ())),
            basis=d.get("basis", "valley"),
        )


def ema(losses: Sequence[float] | np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected causal EMA as in fastai and Lightning; beta=0 returns the raw losses.

    Non-finite losses are skipped (NaN at their index) and the bias correction counts only the
    finite ones, so a NaN at step 0 does not bias everything after it.
    """
    x = np.asarray(losses, dtype=float)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if beta == 0.0:
        return x.copy()
    out = np.full(x.shape, np.nan)
    avg, k = 0.0, 0
    for i, v in enumerate(x):
        if math.isfinite(v):
            k += 1
            avg = beta * avg + (1.0 - beta) * v
            out[i] = avg / (1.0 - beta**k)
    return out


def divergence_index(losses: Sequence[float], beta: float, factor: float) -> int | None:
    """First index whose loss is non-finite or whose smoothed loss exceeds ``factor`` x the best
    smoothed loss before it; None if there is none. Cheap enough to call after every step."""
    x = np.asarray(losses, dtype=float)
    smooth = ema(x, beta)
    best = math.inf
    for i in range(len(x)):
        if not math.isfinite(x[i]) or smooth[i] > factor * best:
            return i
        best = min(best, float(smooth[i]))
    return None


def _smooth(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred moving average of odd width ~n/20 (at least 3), and each point's window width.
    The window shrinks symmetrically at the ends so that no point is shifted."""
    n = len(y)
    half = max(1, n // 40)
    csum = np.concatenate(([0.0], np.cumsum(y)))
    i = np.arange(n)
    h = np.minimum(half, np.minimum(i, n - 1 - i))
    return (csum[i + h + 1] - csum[i - h]) / (2 * h + 1), 2 * h + 1


@dataclass(frozen=True)
class _Curve:
    lrs: np.ndarray  # finite points only, in test order
    smooth: np.ndarray
    start: float  # the loss level at the start of the test
    noise: float  # robust std of raw minus smoothed
    descent: float  # start minus the smoothed minimum
    lo: int  # methods look at smooth[lo:hi + 1]: past the early noise, before the blow-up
    hi: int
    rise: int | None  # first point after the minimum back above the start level
    reason: str | None  # why no method can answer


def _prepare(lrs: Sequence[float], losses: Sequence[float]) -> _Curve:
    x = np.asarray(lrs, dtype=float)
    y = np.asarray(losses, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"lrs and losses must be 1-D of equal length: {x.shape} != {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    n = len(y)
    if n < _MIN_POINTS:
        return _Curve(x, y, math.nan, math.nan, math.nan, 0, n - 1, None, TOO_FEW)
    if np.any(np.diff(x) <= 0):
        raise ValueError("lrs must increase strictly")
    smooth, widths = _smooth(y)
    width = int(widths.max())
    head = max(1, n // _HEAD)
    start = float(np.median(y[: max(head, 5)]))
    resid = y - smooth
    # MAD is robust to the few wild points of the blow-up; each point is 1/width of its own
    # average, which shrinks the residual by sqrt(1 - 1/width).
    mad = float(np.median(np.abs(resid - np.median(resid))))
    noise = 1.4826 * mad / math.sqrt(1.0 - 1.0 / width)
    margin = max(_NOISE_SIGMAS * noise, _MIN_DROP * abs(start))
    i_min = int(np.argmin(smooth))
    descent = start - float(smooth[i_min])
    # The last points are barely smoothed: scale the margin to their noise, so that one noisy
    # last loss does not read as divergence.
    local_margin = margin * np.sqrt(width / widths)
    above = np.flatnonzero((smooth - local_margin > start)[i_min + 1 :])
    rise = i_min + 1 + int(above[0]) if above.size else None
    hi = rise if rise is not None else n - 1
    reason = None
    if i_min < head:
        # Rising within the first half of the test means the start LR was already too high;
        # flat and then blowing up late means there was no descent at any LR.
        early = np.any(smooth[: n // 2 + 1] > start + margin)
        reason = DIVERGED_AT_ONCE if early else FLAT
    elif descent < margin:
        reason = FLAT
    elif hi - head < 2:
        reason = SHORT_DESCENT
    return _Curve(x, smooth, start, noise, descent, head, hi, rise, reason)


def _window(c: _Curve) -> tuple[np.ndarray, np.ndarray]:
    return c.lrs[c.lo : c.hi + 1], c.smooth[c.lo : c.hi + 1]


def _valley(c: _Curve) -> MethodResult:
    lrs, s = _window(c)
    # fastai: longest decreasing subsequence, then a point about half-way along it.
    depth = np.ones(len(s), dtype=int)
    for i in range(1, len(s)):
        higher = depth[:i][s[:i] > s[i]]
        if higher.size:
            depth[i] = higher.max() + 1
    end = int(np.argmax(depth))
    length = int(depth[end])
    idx = max(end - length, 0) + length // 3 + length // 6
    return MethodResult(float(lrs[idx]))


def _steep(c: _Curve) -> MethodResult:
    lrs, s = _window(c)
    grad = np.gradient(s, np.log10(lrs))
    i = int(np.argmin(grad))
    if grad[i] >= 0:
        return MethodResult(None, FLAT)
    return MethodResult(float(lrs[i]))


def _minimum(c: _Curve) -> MethodResult:
    lrs, s = _window(c)
    return MethodResult(float(lrs[int(np.argmin(s))]) / 10.0)


def _slide(c: _Curve) -> MethodResult:
    lrs, s = _window(c)
    grad = np.gradient(s, np.log10(lrs))
    # fastai walks left from the end until the gradient matches the one lr_diff points to the
    # right (15 of ~85 points there), in absolute loss units per step. Here the threshold is
    # 20% of the descent per decade, so the loss scale does not matter; on synthetic curves it
    # lands just below the minimum, as fastai's does, where 5% walks through the minimum.
    lr_diff = max(1, len(s) // 6)
    thresh = 0.2 * c.descent
    right, left = len(s) - 1, len(s) - 1 - lr_diff
    if left < 0:
        return MethodResult(None, SHORT_DESCENT)
    found = left
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        found = left
        right, left = right - 1, left - 1
    if left < 0:
        return MethodResult(None, "slide: the gradient never settled")
    return MethodResult(float(lrs[found]))


_Impl = Callable[[_Curve], MethodResult]


def _run(impl: _Impl, c: _Curve) -> MethodResult:
    return MethodResult(None, c.reason) if c.reason is not None else impl(c)


def valley(lrs: Sequence[float], losses: Sequence[float]) -> MethodResult:
    """fastai's default: about half-way down the longest decreasing stretch of the curve."""
    return _run(_valley, _prepare(lrs, losses))


def steep(lrs: Sequence[float], losses: Sequence[float]) -> MethodResult:
    """Steepest descent of the smoothed loss against log10(lr)."""
    return _run(_steep, _prepare(lrs, losses))


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> MethodResult:
    """The LR at the minimum of the smoothed loss, divided by 10."""
    return _run(_minimum, _prepare(lrs, losses))


def slide(lrs: Sequence[float], losses: Sequence[float]) -> MethodResult:
    """fastai's slide, with a log10(lr) gradient and a threshold relative to the descent."""
    return _run(_slide, _prepare(lrs, losses))


METHODS: dict[str, Callable[[Sequence[float], Sequence[float]], MethodResult]] = {
    "valley": valley,
    "steep": steep,
    "minimum": minimum,
    "slide": slide,
}
_IMPLS: dict[str, _Impl] = {
    "valley": _valley,
    "steep": _steep,
    "minimum": _minimum,
    "slide": _slide,
}


def _divergence_lr(
    lrs: Sequence[float], losses: Sequence[float], c: _Curve, factor: float, beta: float
) -> float | None:
    x = np.asarray(lrs, dtype=float)
    found = []
    i = divergence_index(losses, beta, factor)
    if i is not None and math.isfinite(x[i]):
        found.append(float(x[i]))
    if c.rise is not None:
        found.append(float(c.lrs[c.rise]))
    return min(found) if found else None


def _interval(rec: float, lrs: list[float], divergence: float | None) -> tuple[float, float]:
    lo, hi = min(lrs + [rec]), max(lrs + [rec])
    if hi / lo < _MIN_WIDTH:
        widen = math.sqrt(_MIN_WIDTH * lo / hi)
        lo, hi = lo / widen, hi * widen
    if divergence is not None:
        hi = min(hi, divergence / _DIVERGENCE_MARGIN)
    hi = max(hi, rec)
    lo = min(lo, hi / _MIN_WIDTH)  # the clip must not leave a sliver
    return lo, hi


def suggest(
    lrs: Sequence[float],
    losses: Sequence[float],
    *,
    diverge_factor: float = RangeTestConfig.diverge_factor,
    smoothing: float = RangeTestConfig.smoothing,
    basis: str = "valley",
) -> Suggestion:
    """Run every method, recommend the ``basis`` one (``steep`` if it has no answer) and
    bracket the recommendation with an interval for the sweep. The divergence LR is where
    the ramp stops (:func:`divergence_index` with the ramp's ``smoothing`` and
    ``diverge_factor``), or lower where the curve rises for good first."""
    if basis not in METHODS:
        raise ValueError(f"unknown basis {basis!r}; choose from {sorted(METHODS)}")
    c = _prepare(lrs, losses)
    methods = {name: _run(impl, c) for name, impl in _IMPLS.items()}
    divergence = _divergence_lr(lrs, losses, c, diverge_factor, smoothing)
    warnings: list[str] = []
    used = basis
    if methods[basis].lr is None and methods["steep"].lr is not None:
        used = "steep"
        warnings.append(f"{basis} gave no LR ({methods[basis].reason}); used steep")
        log.debug("suggest: %s gave no LR, falling back to steep", basis)
    rec = methods[used].lr
    if divergence is None:
        warnings.append(NEVER_DIVERGED)
    if rec is None:
        return Suggestion(
            None, None, divergence, methods, methods[basis].reason, tuple(warnings), basis
        )
    tested = np.log10([v for v in np.asarray(lrs, dtype=float) if math.isfinite(v) and v > 0])
    pos = (math.log10(rec) - tested.min()) / max(float(np.ptp(tested)), 1e-12)
    if pos < _EDGE or pos > 1 - _EDGE:
        warnings.append("suggestion at the edge of the tested range")
    if c.noise > _NOISY * c.descent:
        warnings.append("curve is noisy")
    if divergence is not None and rec >= divergence:
        warnings.append("recommendation is not below divergence_lr")
    found = [m.lr for m in methods.values() if m.lr is not None]
    return Suggestion(
        rec, _interval(rec, found, divergence), divergence, methods, None, tuple(warnings), used
    )


# ---------------------------------------------------------------- probe mode

# Probe runs whose drop is at least this fraction of the best drop are "as good": the
# interval spans them.
_PROBE_AS_GOOD = 0.75


def probe_diverged(loss: float, start_loss: float, best_loss: float) -> bool:
    """Whether a probe run at an LR above the best run's has gone past the edge: its loss is
    not finite or worse than untrained, or, once the best run made a real drop, it kept less
    than a tenth of that drop."""
    drop, best_drop = start_loss - loss, start_loss - best_loss
    if not math.isfinite(loss) or drop < 0:
        return True
    return best_drop > _MIN_DROP * abs(start_loss) and drop < _DIVERGED_SHARE * best_drop


def probe_clearly_worse(loss: float, start_loss: float) -> bool:
    """Whether a probe run ended worse than untrained by more than a flat curve's noise: past
    the edge even when no run has improved yet."""
    return loss - start_loss > _MIN_DROP * abs(start_loss)


def probe_as_good(loss: Any, start_loss: float, best_loss: float) -> Any:
    """Whether a probe run's loss drop is within the interval's share of the best run's (for
    a loss or an array of them)."""
    return start_loss - loss >= _PROBE_AS_GOOD * (start_loss - best_loss)


def suggest_probe(lrs: Sequence[float], losses: Sequence[float], start_loss: float) -> Suggestion:
    """The suggestion of probe mode: ``losses[i]`` is the held-out loss after a short run at
    (peak) LR ``lrs[i]``, all from the same start, whose loss was ``start_loss``.

    The best run's LR, refined by a parabola through it and its neighbours in log10(LR); the
    interval spans the runs whose loss drop is within 75% of the best drop, and at least one
    run spacing either side of the recommendation. No correction factor: on the quality
    benchmark (BENCHMARKS.md) the best peak LR of 12-step cosine runs, unscaled, landed
    close to that of complete cosine fine-tunes (``lrsweep.horizon`` holds how close, on
    the development and the held-out data)."""
    x = np.log10(np.asarray(lrs, dtype=float))
    y = np.asarray(losses, dtype=float)
    drops = start_loss - y
    finite = np.isfinite(y)
    if finite.sum() < 3:
        return Suggestion(None, None, None, {}, TOO_FEW, (), "probe")
    i = int(np.nanargmax(drops))
    above = np.flatnonzero([probe_diverged(v, start_loss, y[i]) for v in y[i:]])
    divergence = float(10 ** x[i + above[0]]) if above.size else None
    if drops[i] <= _MIN_DROP * abs(start_loss):
        return Suggestion(None, None, divergence, {}, FLAT, (), "probe")
    best = x[i]
    if 0 < i < len(y) - 1 and finite[i - 1] and finite[i + 1]:
        a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
        if a > 0:  # a minimum: its vertex, kept within half a spacing of the best run
            half = (x[i + 1] - x[i - 1]) / 4
            best = float(np.clip(-b / (2 * a), x[i] - half, x[i] + half))
    good = np.flatnonzero(finite & probe_as_good(y, start_loss, y[i]))
    rec = float(10**best)
    # At least one run spacing either side: the runs cannot resolve finer, and on the quality
    # benchmark the recommendation moved by up to 0.24 decade between seeds.
    spacing = float(np.median(np.diff(x)))
    low = min(10 ** x[good.min()], rec / 10**spacing)
    high = max(10 ** x[good.max()], rec * 10**spacing)
    methods = {"probe": MethodResult(rec), "best run": MethodResult(float(10 ** x[i]))}
    warnings = []
    if i == 0:
        warnings.append("the lowest LR tested was the best: lower start_lr")
    if divergence is None:
        warnings.append(NEVER_DIVERGED)
    if i == len(y) - 1:
        warnings.append("suggestion at the edge of the tested range")
    interval = _interval(rec, [low, high], divergence)
    return Suggestion(rec, interval, divergence, methods, None, tuple(warnings), "probe")


def suggest_probe_seeds(
    lrs: Sequence[float], seed_losses: Sequence[Sequence[float]], start_loss: float
) -> Suggestion:
    """The suggestion of a probe repeated over seeds: ``seed_losses[i]`` holds each seed's
    held-out loss after its run at ``lrs[i]``. The recommendation is :func:`suggest_probe` on
    the mean loss per LR (NaN where a seed did not finish); the interval also reaches each
    seed's own recommendation, so that it is at least as wide as their spread; those are
    under ``methods`` as "seed k". The divergence LR is the lowest that any seed diverged at
    (the probe stopped every seed there), so that the sweep's bounds stay below it; the mean
    counts as diverged there too (a diverged run and a good one can average to the best)."""
    by_seed = np.asarray(seed_losses, dtype=float).T
    own = [suggest_probe(lrs, losses, start_loss) for losses in by_seed]
    mean = by_seed.mean(axis=0)
    first = min((s.divergence_lr for s in own if s.divergence_lr is not None), default=None)
    if first is not None:
        past = np.asarray(lrs, dtype=float) >= first
        mean[past] = np.maximum(by_seed[:, past].max(axis=0), start_loss)
    combined = suggest_probe(lrs, mean, start_loss)
    diverged = [s.divergence_lr for s in (combined, *own) if s.divergence_lr is not None]
    divergence = min(diverged, default=None)
    warnings = tuple(w for w in combined.warnings if divergence is None or w != NEVER_DIVERGED)
    combined = replace(combined, divergence_lr=divergence, warnings=warnings)
    if combined.recommended_lr is None or combined.interval is None:
        return combined
    methods = {
        **combined.methods,
        **{f"seed {k}": MethodResult(s.recommended_lr, s.reason) for k, s in enumerate(own)},
    }
    found = [s.recommended_lr for s in own if s.recommended_lr is not None]
    interval = _interval(combined.recommended_lr, [*combined.interval, *found], divergence)
    return replace(combined, interval=interval, methods=methods)
