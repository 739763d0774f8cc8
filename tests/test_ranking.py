"""Ranking by configuration: pure functions of a trials table, checked on hand-made ones."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lrsweep.ranking import configurations, recommend, seed_noise


def _trials(*rows: tuple[int, str, float | None, int | None, str | None]) -> pd.DataFrame:
    """(number, state, eval_loss, confirms, origin) rows."""
    frame = pd.DataFrame(rows, columns=["number", "state", "eval_loss", "confirms", "origin"])
    return frame.astype({"confirms": "Int64"})


def test_a_configuration_is_a_trial_with_its_confirmation_runs() -> None:
    trials = _trials(
        (0, "COMPLETE", 2.00, None, "range test recommendation"),
        (1, "COMPLETE", 1.90, None, None),
        (2, "PRUNED", None, None, None),
        (3, "COMPLETE", 1.98, 1, "confirmation"),
        (4, "COMPLETE", 2.02, 0, "confirmation"),
        (5, "FAIL", None, 1, "confirmation"),
    )
    configs = configurations(trials)
    assert [(c.number, c.losses) for c in configs] == [(1, [1.90, 1.98]), (0, [2.00, 2.02])]
    assert configs[0].mean == pytest.approx(1.94)
    assert configs[0].spread == pytest.approx(math.sqrt(2 * 0.04**2))
    # Pooled over both configurations, each with one degree of freedom.
    assert seed_noise(configs) == pytest.approx(math.sqrt((0.08**2 / 2 + 0.02**2 / 2) / 2))


def test_the_best_confirmed_mean_wins_over_a_lucky_single_run() -> None:
    trials = _trials(
        (0, "COMPLETE", 1.80, None, "common default 0.0002"),  # one lucky run, unconfirmed
        (1, "COMPLETE", 1.85, None, "range test recommendation"),
        (2, "COMPLETE", 1.86, 1, "confirmation"),
        (3, "COMPLETE", 1.95, None, None),
        (4, "COMPLETE", 1.97, 3, "confirmation"),
    )
    rec = recommend(trials, "range test recommendation", "common default")
    assert rec is not None and rec.confirmed and rec.best.number == 1
    assert rec.runner_up is not None and rec.runner_up.other.number == 3
    assert rec.runner_up.margin == pytest.approx(1.96 - 1.855)
    assert rec.first_guess is None  # the first guess is the best itself
    assert rec.baseline is not None and rec.baseline.margin == pytest.approx(1.80 - 1.855)
    assert rec.runner_up.z is not None and rec.runner_up.z > 1


def test_nothing_complete_recommends_nothing() -> None:
    trials = _trials((0, "PRUNED", None, None, None), (1, "RUNNING", None, None, None))
    assert recommend(trials, "a", "b") is None
    assert seed_noise(configurations(trials)) is None
