"""The trial record: studies written by lrsweep 0.1.0 load, and every fact goes through it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd

from lrsweep.record import Curve, TrialRecord
from lrsweep.sweep.collect import load_results


DATA = Path(__file__).parent / "fixtures" / "sweep-0.1.0"
ROOT = Path(__file__).resolve().parents[1]


def test_a_study_written_by_0_1_0_loads_into_the_same_tables(tmp_path: Path) -> None:
    """tests/fixtures/sweep-0.1.0: a tiny sweep (schedule families, LoRA+, the 2e-4 baseline, a
    confirmation run) written by lrsweep 0.1.0, with the trials.parquet it wrote."""
    shutil.copy(DATA / "study.journal", tmp_path / "study.journal")
    trials, curves, meta = load_results(tmp_path)
    before = pd.read_parquet(DATA / "trials.parquet")
    # Columns added since are there, empty: 0.1.0 did not record them.
    added = [c for c in trials.columns if c not in before.columns]
    assert added == ["dtype"] and trials["dtype"].isna().all()
    pd.testing.assert_frame_equal(trials.drop(columns=added), before, check_dtype=False)
    assert meta["config"]["sweep"]["confirm_top"] == 1
    assert set(trials["origin"].dropna()) >= {"common default 0.0002", "confirmation"}
    assert len(curves) == trials["total_steps"].sum()


def test_a_record_round_trips_through_its_attributes() -> None:
    record = TrialRecord(
        origin="confirmation",
        confirms=3,
        seed=1,
        reason=None,
        curve=Curve([0.0, 1e-3], [2.0, 1.5], [None, 1.4]),
    )
    attrs = record.attrs()
    assert attrs == {
        "origin": "confirmation",
        "confirms": 3,
        "seed": 1,
        "curve": {"lr": [0.0, 1e-3], "loss": [2.0, 1.5], "eval_loss": [None, 1.4]},
    }
    assert TrialRecord.from_attrs({**attrs, "not_ours": 1}) == record
    assert record.seed_or(0) == 1 and TrialRecord().seed_or(7) == 7
    assert record.retry(9) == TrialRecord("confirmation", 3, 1, retry_of=9)


def test_the_optuna_attributes_are_named_in_one_module() -> None:
    found = subprocess.run(
        ["grep", "-rln", "--include=*.py", "user_attr", str(ROOT / "lrsweep")],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert [Path(f).relative_to(ROOT).as_posix() for f in found] == ["lrsweep/record.py"]
