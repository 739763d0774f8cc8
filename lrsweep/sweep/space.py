"""The sweep's search space and the trial length: pure functions of the config."""

from __future__ import annotations

import math
import zlib
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from lrsweep.config import StudyConfig, SweepConfig
from lrsweep.errors import StudyError
from lrsweep.horizon import PROBE_HELD_OUT, known_data, lowest_factor, planned_steps
from lrsweep.schedules import FIRST_MIN_LR_RATIO, FIRST_WARMUP_FRACTION, FLOORED, Schedule
from lrsweep.suggest import Suggestion


def peak_lr_bounds(
    config: StudyConfig,
    suggestion: Suggestion | None,
    highest_tested: float = math.inf,
    steps: int = 0,
    best_drop: float | None = None,
) -> tuple[float, float]:
    """The log-uniform bounds of the peak LR: the study file's, or from the range test: a
    tenth of the recommendation (an eleventh on data the model already knows, where the
    number was that far too high: ``lrsweep.horizon``), and lower by the factor the
    interval reaches down for trials of ``steps`` past the calibration's, up to the
    divergence LR (or the highest LR tested)."""
    if config.search.peak_lr:
        low, high = config.search.peak_lr
        return low, high
    if suggestion is None or suggestion.recommended_lr is None:
        reason = suggestion.reason if suggestion else "no range test"
        raise StudyError(
            f"search.peak_lr: the range test gave no recommendation ({reason}); "
            "set search.peak_lr = [low, high] in the study file"
        )
    below = max(10.0, PROBE_HELD_OUT) if known_data(best_drop) else 10.0
    low = suggestion.recommended_lr / below * lowest_factor(steps)
    high = suggestion.divergence_lr or highest_tested
    return low, max(high, low * 10)


def _searches_floor(config: StudyConfig) -> bool:
    # min_lr_ratio is searched unless the floor is absolute or no searched family has one
    # (linear decays to 0, constant never decays): a dimension that changes nothing only
    # slows the sampler down.
    return config.search.min_lr == 0 and any(f in FLOORED for f in config.search.schedule)


def distributions(config: StudyConfig, bounds: tuple[float, float]) -> dict[str, BaseDistribution]:
    space: dict[str, BaseDistribution] = {
        "peak_lr": FloatDistribution(*bounds, log=True),
        "warmup_fraction": _uniform(config.search.warmup_fraction),
    }
    if _searches_floor(config):
        space["min_lr_ratio"] = _uniform(config.search.min_lr_ratio)
    if len(config.search.schedule) > 1:
        space["schedule"] = CategoricalDistribution(config.search.schedule)
    if config.search.loraplus_lr_ratio:
        space["loraplus_lr_ratio"] = _uniform(config.search.loraplus_lr_ratio, log=True)
    return space


def _uniform(bounds: list[float], log: bool = False) -> FloatDistribution:
    low, high = bounds  # [low, high], checked by the config
    return FloatDistribution(low, high, log=log)


def total_steps(sweep: SweepConfig, train_sequences: int, sequences_per_step: int) -> int:
    """A trial's optimizer steps: ``sweep.steps``, or ``sweep.epochs`` over the training set."""
    steps = 0 if sweep.epochs > 0 else sweep.steps
    return planned_steps(steps, sweep.epochs, train_sequences, sequences_per_step)


def schedule_of(params: dict[str, Any], config: StudyConfig, steps: int) -> Schedule:
    peak = params["peak_lr"]
    # An absolute search.min_lr becomes the trial's ratio: the export's floor is a ratio,
    # which keeps every LoRA+ parameter group on its own floor.
    ratio = params.get("min_lr_ratio", min(1.0, config.search.min_lr / peak))
    family = params.get("schedule", config.search.schedule[0])
    decay = config.search.wsd_decay_fraction if family == "wsd" else 0.0
    return Schedule(peak, steps, params["warmup_fraction"], ratio, family, decay)


def loraplus_ratio_of(params: dict[str, Any], config: StudyConfig) -> float:
    """The trial's LoRA+ ratio: searched, or the study's ``train.loraplus_lr_ratio``."""
    return params.get("loraplus_lr_ratio", config.train.loraplus_lr_ratio)


def first_trial(
    recommended_lr: float, config: StudyConfig, bounds: tuple[float, float]
) -> dict[str, Any]:
    """A first try at ``recommended_lr`` (the range test's, or a common default) with
    common schedule defaults (cosine, plain LoRA where searched), clipped to the space."""

    def clip(value: float, low: float, high: float) -> float:
        return min(max(value, low), high)

    search = config.search
    params: dict[str, Any] = {
        "peak_lr": clip(recommended_lr, *bounds),
        "warmup_fraction": clip(FIRST_WARMUP_FRACTION, *search.warmup_fraction),
    }
    if _searches_floor(config):
        params["min_lr_ratio"] = clip(FIRST_MIN_LR_RATIO, *search.min_lr_ratio)
    if len(search.schedule) > 1:
        params["schedule"] = "cosine" if "cosine" in search.schedule else search.schedule[0]
    if search.loraplus_lr_ratio:
        params["loraplus_lr_ratio"] = clip(1.0, *search.loraplus_lr_ratio)
    return params


def worker_seed(seed: int, worker: str, trials_so_far: int) -> int:
    """A sampler seed of its own for every worker and every (re)start, so that a resumed or
    parallel study does not repeat the same startup parameters."""
    return zlib.crc32(f"{seed}/{worker}/{trials_so_far}".encode())
