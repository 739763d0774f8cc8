"""Which fine-tune the range test's number is for, and how far it carries to the planned one.

The probe's number is checked against complete fine-tunes of ``CALIBRATION_STEPS`` optimizer
steps (linear warmup, cosine decay; bench/quality.py) at the batch shape the probe itself
runs with, so the batch is read by the probe. The run length is not: on the benchmark's grid
(bench/grid.py, BENCHMARKS.md) ten times the steps on the same data moved the best peak LR
0.75 decade down on one corpus and not down at all on another, so no one factor carries the
number to a longer run. What a longer run changes is how sure the number is: the interval
reaches as far down as the largest shift measured. The probe's own loss drop bears on it
too: a small one marks data the model already predicts well, where the number was too high,
so the interval reaches lower there, and a warning says so. Pure functions, no torch.
"""

from __future__ import annotations

import dataclasses
import math

from lrsweep.suggest import Suggestion


CALIBRATION_STEPS = 100
# Decades the best peak LR moved down per decade of steps beyond CALIBRATION_STEPS, at most,
# on the grid: stdlib 3.16e-4 at 1000 steps against 1.78e-3 at 100 (-0.75); manpages 0.
LONGER_RUN_SHIFT = 0.75
# The quality benchmark's figures, as factors of the best peak LR of complete fine-tunes
# (bench.quality.how_sure_figures computes them from bench/results, and a test holds these to
# it): the probe's worst development cell within an epoch (Perl's modules, whose final loss
# was flat within 0.4 % across that factor) and its worst loss regret there (16 rows a step on
# the Info manuals, next to the divergence cliff), its worst held-out cell (too high), and the
# ramp's range (too low) on the base shape.
PROBE_DEVELOPMENT = 5.3
PROBE_DEVELOPMENT_REGRET = 0.038
PROBE_HELD_OUT = 11.0
RAMP_LOW = (4.9, 19.0)
# Below this share of the untrained loss, the best probe run's drop marks data the model
# already predicts well: 1.0-1.4 % on the C headers, whose best peak LR lay 3.6-11x below the
# probe's number, against 3.0-18 % on every other corpus (Perl's modules 3.0 %, stdlib 3.6 %).
KNOWN_DATA_DROP = 0.02


def how_sure(mode: str) -> str:
    """One sentence on how far the number may be from the best peak LR (BENCHMARKS.md)."""
    if mode == "probe":
        return (
            f"How sure: on lrsweep's benchmark the probe's number was within "
            f"{PROBE_DEVELOPMENT:.2g}x of the best peak LR of complete fine-tunes, and its "
            f"final loss within {PROBE_DEVELOPMENT_REGRET:.1%} of theirs, in every development "
            f"cell within an epoch, and up to {PROBE_HELD_OUT:.2g}x too high on held-out data "
            "the model already predicted well; take it as the first trial, and let lrsweep "
            "sweep search around it."
        )
    low, high = RAMP_LOW
    return (
        f"How sure: on lrsweep's benchmark the ramp's recommendation was {low:.2g}x to "
        f"{high:.2g}x below the best peak LR of complete fine-tunes; probe mode (the default) "
        "is the calibrated one."
    )


def planned_steps(
    max_steps: int, epochs: float, train_sequences: int, sequences_per_step: int
) -> int:
    """A run's optimizer steps: ``max_steps`` (it wins, as in transformers), else ``epochs``
    over ``train_sequences``; 0 when neither can be known."""
    if max_steps > 0:
        return max_steps
    if epochs > 0 and train_sequences > 0:
        return max(1, math.ceil(epochs * train_sequences / sequences_per_step))
    return 0


def lowest_factor(steps: int) -> float:
    """How far below the number the best peak LR of a ``steps``-step run may lie (1 for runs
    no longer than the calibration ones)."""
    if steps <= CALIBRATION_STEPS:
        return 1.0
    return float((CALIBRATION_STEPS / steps) ** LONGER_RUN_SHIFT)


def known_data(best_drop: float | None) -> bool:
    """Whether a probe's best run's drop marks data the model already predicts well."""
    return best_drop is not None and best_drop < KNOWN_DATA_DROP


def carry(suggestion: Suggestion, steps: int, best_drop: float | None = None) -> Suggestion:
    """The suggestion for a planned run of ``steps`` optimizer steps: the same number, the
    interval's low end down by :func:`lowest_factor`, and a warning that says so. When the
    probe's best run lowered the held-out loss by less than ``KNOWN_DATA_DROP`` of it
    (``best_drop``), where the number was up to ``PROBE_HELD_OUT`` times too high on the
    benchmark, the interval reaches that far below the number first, with a warning too: a
    caveat the sweep's bounds follow, not a correction of the number."""
    if suggestion.interval is None or suggestion.recommended_lr is None:
        return suggestion
    warnings = list(suggestion.warnings)
    low, high = suggestion.interval
    if known_data(best_drop):
        assert best_drop is not None
        low = min(low, suggestion.recommended_lr / PROBE_HELD_OUT)
        warnings.append(
            f"the best probe run lowered the held-out loss by only {best_drop:.1%}: the model "
            "already predicts this data well, and on such data (C headers) lrsweep's benchmark "
            f"found the best peak LR up to {PROBE_HELD_OUT:.2g}x below the probe's number "
            "(the interval and the sweep's default bounds reach down that far)"
        )
    factor = lowest_factor(steps)
    if factor < 1.0:
        warnings.append(
            f"calibrated on {CALIBRATION_STEPS}-step fine-tunes: for {steps} steps the best "
            f"peak LR may be up to {1 / factor:.2g}x lower (the interval reaches down that far)"
        )
    return dataclasses.replace(suggestion, interval=(low * factor, high), warnings=tuple(warnings))
