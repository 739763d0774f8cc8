"""The result files: one owner, never fewer trials than before, readable without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from lrsweep.results import TRIALS_FILE, read_parquet, write_sweep
from tests.conftest import ROOT, run_cli


TINY = str(ROOT / "studies" / "tiny.toml")


def _sweep(capsys, monkeypatch, out: Path, *args: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(
        capsys, monkeypatch, "sweep", TINY, "--out", str(out), "--trials", "3", "-q", *args
    )
    assert code == 0, err


def test_report_and_export_import_no_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _sweep(capsys, monkeypatch, tmp_path)
    script = (
        "import sys\n"
        "from lrsweep.cli import main\n"
        f"for command in (['report', {str(tmp_path)!r}], ['export', {str(tmp_path)!r}]):\n"
        "    sys.argv = ['lrsweep', *command]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exit_:\n"
        "        assert not exit_.code, exit_.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert "Plots:" in done.stdout and '"learning_rate"' in done.stdout


def test_a_late_worker_then_a_report_without_storage_keep_every_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The study lives outside OUT (as on a database): report OUT has only the files to go by.
    out, journal = tmp_path / "out", str(tmp_path / "elsewhere.journal")
    _sweep(capsys, monkeypatch, out, "--storage", journal)
    assert len(read_parquet(out / TRIALS_FILE)[0]) == 3
    code, said, err = run_cli(
        capsys, monkeypatch, "worker", "--out", str(out), "--storage", journal, "-q"
    )
    assert code == 0, err
    assert "Nothing to do" in said
    assert not (out / "parts").exists()  # a worker that ran nothing leaves no empty part
    code, said, err = run_cli(capsys, monkeypatch, "report", str(out))
    assert code == 0, err
    assert "Trials: " in said and "Plots:" in said
    assert len(read_parquet(out / TRIALS_FILE)[0]) == 3


class _Trial:
    """The few fields of an Optuna FrozenTrial that the result files read."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.state = optuna.trial.TrialState.COMPLETE
        self.value = 1.0
        self.params = {"peak_lr": 1e-3, "warmup_fraction": 0.1, "min_lr_ratio": 0.1}
        self.user_attrs = {
            "curve": {"lr": [0.0, 1e-3], "loss": [2.0, 1.9], "eval_loss": [None, 1.0]}
        }


def test_result_files_are_never_replaced_by_fewer_trials(tmp_path: Path) -> None:
    assert write_sweep([_Trial(0), _Trial(1)], tmp_path, {"study": "s"})
    before = (tmp_path / TRIALS_FILE).read_bytes()
    # A process that sees only trial 1 (a lagging storage, another study) leaves them alone.
    assert not write_sweep([_Trial(1)], tmp_path, {"study": "s"})
    assert (tmp_path / TRIALS_FILE).read_bytes() == before
    assert write_sweep([_Trial(0), _Trial(1), _Trial(2)], tmp_path, {"study": "s"})
    assert read_parquet(tmp_path / TRIALS_FILE)[0]["number"].tolist() == [0, 1, 2]


def test_merging_parts_never_drops_trials_of_the_folder_s_own_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No journal (the study lived on a database): reap merges the workers' parts into OUT.
    assert write_sweep([_Trial(n) for n in range(4)], tmp_path, {"study": "s"})
    assert write_sweep([_Trial(0)], tmp_path / "parts" / "host-1", {"study": "s"})
    (tmp_path / "curves.parquet").unlink()  # OUT's trials can no longer be merged
    code, _, err = run_cli(capsys, monkeypatch, "reap", str(tmp_path))
    assert code == 2 and "would drop trials [1, 2, 3]" in err and "--storage" in err
    assert read_parquet(tmp_path / TRIALS_FILE)[0]["number"].tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_worker_started_before_its_study_waits_for_it(tmp_path: Path) -> None:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "lrsweep"]
    worker = subprocess.Popen(
        [*command, "worker", "--out", str(tmp_path), "--wait", "5m", "-q"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sweep = subprocess.run(
        [*command, "sweep", TINY, "--out", str(tmp_path), "--trials", "4", "-q"]
        + ["--set", "sweep.steps=120", "--set", "sweep.eval_every=40"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr
    said, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err
    assert "no study" not in err
    trials, _ = read_parquet(tmp_path / TRIALS_FILE)
    ran = trials[trials["worker"].str.endswith(f":{worker.pid}")]
    assert len(ran) >= 1, (said, err)
    assert set(ran["state"]) <= {"COMPLETE", "PRUNED"}


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)) + "/": "" for p in folder.rglob("*") if p.is_dir()}


def test_report_export_and_dashboard_read_a_read_only_folder_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A colleague's finished sweep, copied and made read-only (chmod -R a-w): every byte,
    every file and folder stays as it was, also where the files lag behind the journal and
    a trial looks stale (report and export used to reap it and rewrite the files)."""
    import shutil
    import time

    from lrsweep.sweep.storage import open_storage

    _sweep(capsys, monkeypatch, tmp_path / "s", "--set", "sweep.heartbeat_seconds=0.2")
    # One more trial left RUNNING by a dead worker: the files lag, and once its grace
    # period (6 beats) is over it looks stale.
    backend = open_storage(tmp_path / "s")
    study = optuna.load_study(study_name="lrsweep", storage=backend.backend)
    study.ask()
    time.sleep(1.5)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "s", copy)
    subprocess.run(["chmod", "-R", "a-w", str(copy)], check=True)
    before = _hashes(copy)
    try:
        code, out, err = run_cli(capsys, monkeypatch, "report", str(copy))
        assert code == 0, err
        assert "trial 3 looks stale" in out and "No plots: " in out and "read-only" in out
        assert "RUNNING" in out
        code, out, err = run_cli(capsys, monkeypatch, "export", str(copy))
        assert code == 0, err
        code, out, err = run_cli(
            capsys, monkeypatch, "report", str(copy), "--plots", str(tmp_path / "plots")
        )
        assert code == 0 and (tmp_path / "plots" / "sweep_lr.png").exists(), err
        open_storage(copy, create=False, read_only=True)  # what dashboard serves
        assert _hashes(copy) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)
    # The commands that write bring it up to date: reap fails the stale trial, queues it
    # again, and rewrites the files.
    code, out, err = run_cli(capsys, monkeypatch, "reap", str(copy))
    assert code == 0 and "Reaped trials 3; queued again." in out, err
    trials = read_parquet(copy / TRIALS_FILE)[0]
    assert trials.set_index("number").loc[3, "state"] == "FAIL"
