"""A sweep killed or interrupted at any moment loses no finished trial and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lrsweep.sweep.storage import open_storage
from tests.conftest import ROOT, default_sigint


pytestmark = pytest.mark.slow

TRIALS = 5


def _sweep(out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrsweep",
            "sweep",
            str(ROOT / "studies" / "tiny.toml"),
            "--out",
            str(out),
            "--trials",
            str(TRIALS),
            "--set",
            "sweep.steps=150",
            "--set",
            "sweep.eval_every=50",
            "--set",
            "sweep.heartbeat_seconds=0.5",
            "-q",
        ],
        cwd=ROOT,
        env=env,
        preexec_fn=default_sigint,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_mid_trial(out: Path, proc: subprocess.Popen[str]) -> int:
    """Wait until at least one trial finished and another one is running; its number."""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        live = sorted((out / "live").glob("*.json")) if (out / "live").exists() else []
        if (out / "trials.parquet").exists() and live and int(live[0].stem) >= 1:
            time.sleep(0.5)
            return int(live[0].stem)
        time.sleep(0.2)
    raise AssertionError("the sweep never got to its second trial")


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="lrsweep", storage=open_storage(out).backend)


def _finish_and_check(out: Path, killed: int, reason: str) -> None:
    before = {t.number: t.state for t in _study(out).trials}
    proc = _sweep(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    study = _study(out)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS  # the budget counts the whole study, not each run
    # Every trial finished before the interruption is still there, unchanged.
    for number, state in before.items():
        if state.is_finished() and number != killed:
            assert study.trials[number].state == state
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL and reason in dead.user_attrs["reason"]
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].params == dead.params
    assert not list((out / "live").glob("*.json"))
    # The parquet files hold every trial exactly once.
    import pandas as pd

    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["number"]) == [t.number for t in study.trials]


def test_sigint_marks_the_trial_and_a_rerun_finishes_the_budget(tmp_path: Path) -> None:
    proc = _sweep(tmp_path)
    running = _wait_mid_trial(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume" in err
    _finish_and_check(tmp_path, running, "interrupted")


def test_sigkill_leaves_a_stale_trial_that_the_rerun_fails_and_retries(tmp_path: Path) -> None:
    proc = _sweep(tmp_path)
    running = _wait_mid_trial(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert _study(tmp_path).trials[running].state == TrialState.RUNNING
    record = json.loads((tmp_path / "live" / f"{running}.json").read_text())
    assert record["pid"] == proc.pid
    _finish_and_check(tmp_path, running, "died")


def test_sigterm_exits_143_with_the_trial_recorded(tmp_path: Path) -> None:
    proc = _sweep(tmp_path)
    running = _wait_mid_trial(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert _study(tmp_path).trials[running].state == TrialState.FAIL
