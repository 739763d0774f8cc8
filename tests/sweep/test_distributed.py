"""Many workers, one study, a real PostgreSQL server: no trial lost or counted twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest
from optuna.trial import TrialState

from lrsweep.results import CURVE_COLUMNS, TRIAL_COLUMNS, merge_parts, read_parquet
from lrsweep.sweep.collect import load_results
from lrsweep.sweep.plan import prepare_sweep
from lrsweep.sweep.storage import open_storage
from tests.conftest import ROOT, tiny_config
from tests.postgres import PASSWORD, Server, postgres  # noqa: F401 - the fixture


pytestmark = pytest.mark.slow

TRIALS = 12
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TINY = str(ROOT / "studies" / "tiny.toml")


def _env(server: Server) -> dict[str, str]:
    # The URL travels in the environment, as a user keeps a password off the command line.
    return {**os.environ, "LRSWEEP_STORAGE": server.url, "OMP_NUM_THREADS": "1"}


def _lrsweep(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lrsweep", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _study(server: Server, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(Path("."), server.url).backend)


def _check_merged(server: Server, out: Path, name: str) -> None:
    study = _study(server, name)
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) >= TRIALS
    assert len(finished) <= TRIALS + 2  # each worker overshoots by at most one
    trials, _, meta = load_results(out, server.url, name)
    assert trials["number"].is_unique
    assert sorted(trials["number"]) == [t.number for t in study.trials]
    assert PASSWORD not in str(meta) and "***" in meta["storage"]
    # The workers' part files, merged without the storage, agree with it.
    (out / "trials.parquet").unlink()
    (out / "curves.parquet").unlink()
    merged, _, _ = load_results(out)
    done = merged[merged["state"].isin(["COMPLETE", "PRUNED"])]
    assert sorted(done["number"]) == sorted(t.number for t in finished)
    # Written back (as lrsweep reap does without a storage), each file notes its own columns.
    assert merge_parts(out)
    assert read_parquet(out / "curves.parquet")[1]["columns"] == CURVE_COLUMNS
    assert read_parquet(out / "trials.parquet")[1]["columns"] == TRIAL_COLUMNS


def test_three_workers_share_a_study(postgres: Server, tmp_path: Path) -> None:  # noqa: F811
    proc = _lrsweep(
        "sweep",
        TINY,
        "--study",
        "three",
        "--out",
        str(tmp_path),
        "--workers",
        "3",
        "--trials",
        str(TRIALS),
        "--set",
        "sweep.steps=30",
        env=_env(postgres),
    )
    seen_cmdlines = []
    while proc.poll() is None:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen_cmdlines.append(" ".join(child.cmdline()))
        except psutil.Error:
            pass
        time.sleep(0.5)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert any(" worker " in c for c in seen_cmdlines)
    assert all(PASSWORD not in c for c in seen_cmdlines)
    assert PASSWORD not in out + err
    parts = list((tmp_path / "parts").glob("*/trials.parquet"))
    assert len(parts) == 3
    for part in parts:
        assert PASSWORD not in str(read_parquet(part)[1])
    workers = {
        t.user_attrs["worker"] for t in _study(postgres, "three").trials if t.state in FINISHED
    }
    assert len(workers) == 3  # every worker ran trials
    _check_merged(postgres, tmp_path, "three")


def test_a_killed_worker_is_failed_and_its_trial_retried(
    postgres: Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Trials long enough that the study is still running when the grace period (6 s) ends.
    cfg = tiny_config("sweep.steps=500", "sweep.eval_every=100", "sweep.heartbeat_seconds=1")
    prepare_sweep(cfg, tmp_path, storage=postgres.url, study_name="killed", progress=False)
    env = _env(postgres)
    victim = _lrsweep(
        "worker",
        "--study",
        "killed",
        "--out",
        str(tmp_path),
        "-q",
        "--trials",
        str(TRIALS),
        env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        study = _study(postgres, "killed")
        running = [t for t in study.trials if t.state == TrialState.RUNNING]
        if running and any(t.state in FINISHED for t in study.trials):
            break
        time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    killed = running[0].number
    others = [
        _lrsweep(
            "worker",
            "--study",
            "killed",
            "--out",
            str(tmp_path),
            "-q",
            "--trials",
            str(TRIALS),
            env=env,
        )
        for _ in range(2)
    ]
    for proc in others:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    study = _study(postgres, "killed")
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL and "no heartbeat" in dead.user_attrs["reason"]
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].params == dead.params
    assert len([t for t in study.trials if t.state in FINISHED]) >= TRIALS


def test_a_database_restart_loses_nothing(postgres: Server, tmp_path: Path) -> None:  # noqa: F811
    # Beats every 2 s, grace 12 s: the server stays down 5 s, longer than a beat.
    proc = _lrsweep(
        "sweep",
        TINY,
        "--study",
        "restart",
        "--out",
        str(tmp_path),
        "-q",
        "--trials",
        "6",
        "--set",
        "sweep.steps=400",
        "--set",
        "sweep.eval_every=40",
        "--set",
        "sweep.heartbeat_seconds=2",
        env=_env(postgres),
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (tmp_path / "trials.parquet").exists():
            trials = pd.read_parquet(tmp_path / "trials.parquet")
            if (trials["state"] == "RUNNING").any() or len(trials) >= 1:
                break
        time.sleep(0.3)
    postgres.stop()
    time.sleep(5)
    postgres.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "storage unreachable" in err  # it noticed, waited and went on
    assert PASSWORD not in out + err
    study = _study(postgres, "restart")
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 0
    assert len([t for t in study.trials if t.state in FINISHED]) == 6


def test_a_late_worker_and_a_report_without_storage_keep_the_results(
    postgres: Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    env = _env(postgres)
    sweep = _lrsweep(
        "sweep", TINY, "--study", "late", "--out", str(tmp_path), "-q", "--trials", "3", env=env
    )
    _, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, err
    worker = _lrsweep("worker", "--study", "late", "--out", str(tmp_path), "-q", env=env)
    said, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err
    assert "Nothing to do" in said
    # Without --storage, report has the files alone: they keep all three trials.
    report = subprocess.run(
        [sys.executable, "-m", "lrsweep", "report", str(tmp_path)],
        cwd=ROOT,
        env={k: v for k, v in env.items() if k != "LRSWEEP_STORAGE"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "Traceback" not in report.stderr
    trials, _ = read_parquet(tmp_path / "trials.parquet")
    assert sorted(trials["number"]) == [t.number for t in _study(postgres, "late").trials]
    assert len(trials) >= 3
