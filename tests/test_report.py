"""The report: tables, the recommendation paragraph and plots, drawn from a real sweep's files
(tests/fixtures/sweep-0.1.0: 5 trials of a tiny sweep, one a confirmation run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from lrsweep.ranking import configurations, recommend, seed_noise
from lrsweep.record import BASELINE_ORIGIN, FIRST_ORIGIN
from lrsweep.report import (
    SWEEP_PLOTS,
    format_configurations,
    format_recommendation,
    format_trials,
    plot_sweep,
)
from lrsweep.sweep.collect import load_results


FIXTURE = Path(__file__).parent / "fixtures" / "sweep-0.1.0"


def _sweep(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    shutil.copy(FIXTURE / "study.journal", tmp_path / "study.journal")
    trials, curves, _ = load_results(tmp_path)
    return trials, curves


def test_the_trials_table_ranks_and_says_when_it_shows_the_top(tmp_path: Path) -> None:
    trials, _ = _sweep(tmp_path)
    table = format_trials(trials, top=3).splitlines()
    assert table[0] == "Trials: 5 complete; the best 3 of 5:"
    numbers = [int(line.split()[0]) for line in table[3:]]
    best = trials.sort_values(["eval_loss", "number"])["number"].tolist()[:3]
    assert numbers == best
    assert format_trials(trials).splitlines()[0] == "Trials: 5 complete"
    assert "confirms #3 (seed 1)" in format_trials(trials)


def test_the_recommendation_says_what_to_use_and_how_sure(tmp_path: Path) -> None:
    trials, _ = _sweep(tmp_path)
    rec = recommend(trials, FIRST_ORIGIN, BASELINE_ORIGIN)
    text = format_recommendation(rec)
    assert rec is not None and text.startswith("Use: ") and f"trial {rec.best.number}" in text
    assert "over 2 seeds" in text and "seed noise of one run" in text
    configs = configurations(trials)
    table = format_configurations(configs, seed_noise(configs))
    assert table.startswith("Configurations over seeds") and " 3    2 " in table
    assert format_recommendation(None) == "No recommendation yet: no trial is complete."


def test_the_sweep_plots_are_pngs(tmp_path: Path) -> None:
    trials, curves = _sweep(tmp_path)
    paths, missing = plot_sweep(trials, curves, tmp_path)
    assert missing is None and [p.name for p in paths] == list(SWEEP_PLOTS)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    none, why = plot_sweep(trials.assign(eval_loss=None, best_eval_loss=None), curves, tmp_path)
    assert none == [] and why is not None and "no plots yet" in why
