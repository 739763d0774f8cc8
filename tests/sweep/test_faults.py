"""The fault battery: no command leaves a study or its files worse than it found it.

Each case damages a finished tiny sweep (or gives bad input) the way a crash, a full disk or
a careless command line would, runs the real command, and checks the exit code, that any
message is one line without a traceback, that no file appeared or shrank, and that the
storage and the parquet files agree afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lrsweep.errors import StudyError
from lrsweep.results import TRIALS_FILE, atomic_write, read_parquet
from lrsweep.sweep import worker as worker_mod
from lrsweep.sweep.plan import execute, prepare_sweep
from lrsweep.sweep.storage import Liveness, open_storage, redact
from lrsweep.sweep.study import create_study
from tests.conftest import ROOT, run_cli, tiny_config
from tests.postgres import PASSWORD, Server, postgres  # noqa: F401 - the fixture


TINY = str(ROOT / "studies" / "tiny.toml")
FAST = ("--set", "sweep.steps=8", "--set", "sweep.eval_every=4")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sweep with three finished trials, copied afresh into every test."""
    out = tmp_path_factory.mktemp("finished")
    cfg = tiny_config("sweep.steps=8", "sweep.eval_every=4")
    execute(prepare_sweep(cfg, out, trials=3, progress=False), progress=False)
    return out


@pytest.fixture
def sweep_dir(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    return out


def _files(folder: Path) -> dict[Path, int]:
    return (
        {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}
    )


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="lrsweep", storage=open_storage(out, create=False).backend)


def _agree(out: Path) -> None:
    """The parquet files hold every trial of the storage, in its state."""
    study = _study(out)
    trials, _ = read_parquet(out / TRIALS_FILE)
    assert dict(zip(trials["number"], trials["state"], strict=True)) == {
        t.number: t.state.name for t in study.trials
    }


def _one_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------- damaged files


def _cut_journal(out: Path) -> None:
    journal = out / "study.journal"
    os.truncate(journal, journal.stat().st_size - 100)


def _garbage_line(out: Path) -> None:
    journal = out / "study.journal"
    lines = journal.read_bytes().split(b"\n")
    lines[9] = b"@@x"
    journal.write_bytes(b"\n".join(lines))


def _cut(name: str, size: int) -> Callable[[Path], None]:
    return lambda out: os.truncate(out / name, size)


@dataclass
class Damage:
    name: str
    damage: Callable[[Path], None]
    command: tuple[str, ...]
    code: int
    said: str  # in stdout on success, or the one line of stderr on failure
    shrinks: tuple[str, ...] = ()  # files the command may legitimately shorten


DAMAGES = [
    Damage(
        "torn last journal record",
        _cut_journal,
        ("sweep", "--trials", "5", *FAST, "-q"),
        0,
        "Trials: ",
        shrinks=("study.journal",),
    ),
    Damage(
        "garbage journal line, sweep",
        _garbage_line,
        ("sweep", "--trials", "5", "-q"),
        2,
        "line 10",
    ),
    Damage("garbage journal line, report", _garbage_line, ("report",), 2, "line 10"),
    Damage("garbage journal line, reap", _garbage_line, ("reap",), 2, "line 10"),
    # report and export read the study past damaged files and leave them as they are;
    # reap (like the next sweep) rebuilds them.
    Damage("truncated trials.parquet", _cut(TRIALS_FILE, 3000), ("report",), 0, "Plots:"),
    Damage("empty curves.parquet", _cut("curves.parquet", 0), ("report",), 0, "Plots:"),
    Damage("truncated curves.parquet", _cut("curves.parquet", 500), ("export",), 0, "max_steps"),
    Damage("truncated trials.parquet, reap", _cut(TRIALS_FILE, 3000), ("reap",), 0, "up to date"),
    Damage("torn last journal record, report", _cut_journal, ("report",), 0, "Plots:"),
]
# The commands that only read: they change no file (the plots they draw aside).
READERS = ("report", "export")


@pytest.mark.parametrize("case", DAMAGES, ids=lambda c: c.name)
def test_damaged_files(
    case: Damage,
    sweep_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case.damage(sweep_dir)
    before = _files(sweep_dir)
    journal = (sweep_dir / "study.journal").read_bytes()
    # sweep takes the folder as --out; report and export as their argument.
    where = ("--out",) if case.command[0] == "sweep" else ()
    code, out, err = run_cli(capsys, monkeypatch, *case.command, *where, str(sweep_dir))
    assert code == case.code, err
    if code:
        _one_line(err)
        assert case.said in err
        assert (sweep_dir / "study.journal").read_bytes() == journal  # nothing appended
    elif case.command[0] in READERS:
        assert case.said in out, out
        after = _files(sweep_dir)
        drawn = (".png",)
        assert {p: n for p, n in after.items() if p.suffix not in drawn} == {
            p: n for p, n in before.items() if p.suffix not in drawn
        }
        assert (sweep_dir / "study.journal").read_bytes() == journal
        return
    else:
        assert case.said in out, out
        _agree(sweep_dir)
        if case.command[0] == "sweep":
            finished = (TrialState.COMPLETE, TrialState.PRUNED)
            assert len(_study(sweep_dir).get_trials(states=finished)) == 5
    after = _files(sweep_dir)
    for path, size in before.items():
        if path.name in ("trials.parquet", "curves.parquet") and code == 0:
            continue  # rebuilt from the storage
        if path.name not in case.shrinks:
            assert after.get(path, -1) >= size, path


def test_torn_journal_repair_says_so(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    _cut_journal(sweep_dir)
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(capsys, monkeypatch, "reap", str(sweep_dir))
    assert code == 0, err
    assert any("torn last record" in r.getMessage() for r in caplog.records)
    assert (sweep_dir / "study.journal").read_bytes().endswith(b"\n")
    _agree(sweep_dir)


def test_damaged_files_without_storage_are_one_line(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (sweep_dir / "study.journal").unlink()
    os.truncate(sweep_dir / TRIALS_FILE, 3000)
    code, _, err = run_cli(capsys, monkeypatch, "report", str(sweep_dir))
    assert code == 2 and "damaged" in err and "--storage" in err
    _one_line(err)


# ---------------------------------------------------------------- nothing to plot


def test_report_with_nothing_to_plot_prints_the_table_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lrsweep.sweep import plan as plan_mod
    from lrsweep.sweep.trial import TrialRun

    def diverged_at_once(ctx, trial, schedule, progress=True, watchers=(), start=None):  # type: ignore[no-untyped-def]
        return TrialRun(schedule, reason="non-finite loss at step 0")

    monkeypatch.setattr(plan_mod, "run_trial", diverged_at_once)
    args = ("sweep", TINY, "--out", str(tmp_path), "--trials", "2", "-q", *FAST)
    code, _, err = run_cli(capsys, monkeypatch, *args, "--set", "search.peak_lr=[1e-3, 1e-2]")
    assert code == 0, err
    code, out, err = run_cli(capsys, monkeypatch, "report", str(tmp_path))
    assert code == 0 and "Traceback" not in err, err
    assert "2 pruned" in out and "no plots yet" in out
    assert not (tmp_path / "sweep_lr.png").exists()


# ---------------------------------------------------------------- interrupts and stale trials


@pytest.mark.usefixtures("python_sigint")
def test_a_signal_right_after_ask_marks_the_trial_and_queues_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = prepare_sweep(
        tiny_config("search.peak_lr=[1e-3, 1e-2]", *FAST[1::2]), tmp_path, trials=2, progress=False
    )
    real_ask = worker_mod._ask

    def ask_then_signal(study, space):  # type: ignore[no-untyped-def]
        trial = real_ask(study, space)
        os.kill(os.getpid(), signal.SIGINT)  # lands as the trial is handed over
        return trial

    monkeypatch.setattr(worker_mod, "_ask", ask_then_signal)
    with pytest.raises(KeyboardInterrupt):
        execute(prepared, progress=False)
    trials = prepared.plan.study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"] == "interrupted"
    assert [t.state for t in trials[1:]] == [TrialState.WAITING]
    assert trials[1].user_attrs["retry_of"] == 0
    # The trial's heartbeat did not outlive it (a Python caller's process goes on).
    assert not [t for t in threading.enumerate() if t.name == "lrsweep-heartbeat"]
    _agree(tmp_path)


def test_a_trial_another_worker_reaped_as_stale_does_not_stop_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a storage outage longer than the grace period, another worker may fail a live
    trial and queue its retry: its own worker notices and goes on."""
    from lrsweep.sweep import plan as plan_mod
    from lrsweep.sweep.storage import fail_trial

    real = plan_mod.run_trial

    def reaped_meanwhile(ctx, trial, schedule, *args, **kwargs):  # type: ignore[no-untyped-def]
        if trial.number == 0:
            storage = open_storage(tmp_path)
            frozen = storage.backend.get_trial(trial._trial_id)
            fail_trial(trial.study, storage, frozen, "worker x died (no heartbeat)")
        return real(ctx, trial, schedule, *args, **kwargs)

    monkeypatch.setattr(plan_mod, "run_trial", reaped_meanwhile)
    prepared = prepare_sweep(tiny_config(*FAST[1::2]), tmp_path, trials=2, progress=False)
    study = execute(prepared, progress=False)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 2
    assert study.trials[1].user_attrs["retry_of"] == 0


def _dead_pid() -> Liveness:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return Liveness("", proc.pid, 0.0, time.time())


@pytest.mark.parametrize("command", [("reap",), ("sweep", "-q", "--out")])
def test_a_dead_workers_trial_is_reaped_once_the_budget_is_met(
    command: tuple[str, ...],
    sweep_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json
    import socket

    study = _study(sweep_dir)
    stuck = study.ask()
    record = _dead_pid()
    live = sweep_dir / "live" / f"{stuck.number}.json"
    live.write_text(json.dumps({**record.__dict__, "host": socket.gethostname()}))
    code, _, err = run_cli(capsys, monkeypatch, *command, str(sweep_dir))
    assert code == 0, err
    reaped = _study(sweep_dir).trials[stuck.number]
    assert reaped.state == TrialState.FAIL and "died" in reaped.user_attrs["reason"]
    _agree(sweep_dir)


# ---------------------------------------------------------------- joining a study


def test_the_loser_of_a_create_race_is_checked_like_any_joiner(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    create_study(storage, "race", tiny_config(), (1e-4, 1e-2), None, 4)
    with pytest.raises(StudyError, match="different lora"):
        create_study(storage, "race", tiny_config("lora.r=8"), (1e-4, 1e-2), None, 4)
    # The same config joins.
    study, _ = create_study(storage, "race", tiny_config(), (1e-4, 1e-2), None, 4)
    assert study.study_name == "race"


def test_resuming_with_another_trial_length_is_refused(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _files(sweep_dir)
    code, _, err = run_cli(
        capsys, monkeypatch, "sweep", TINY, "--out", str(sweep_dir), "--set", "sweep.steps=24"
    )
    assert code == 2 and "different sweep.steps" in err
    _one_line(err)
    assert _files(sweep_dir) == before


def test_resuming_without_trials_keeps_the_studys_budget(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(capsys, monkeypatch, "sweep", "--out", str(sweep_dir), "--dry-run")
    assert code == 0, err
    assert out.startswith("Estimate: 0 trials")  # 3 of 3, not tiny.toml's sweep.trials = 4


# ---------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@db.example/lrsweep?password=topsecret",
        "postgresql://:topsecret@db.example/lrsweep",
        "postgresql://user:top@secret@db.example/lrsweep",
        "postgresql+psycopg://user:topsecret@db.example:5432/lrsweep?sslmode=require",
        "could not connect: password=topsecret host=db",
    ],
)
def test_no_form_of_password_survives_redaction(url: str) -> None:
    hidden = redact(url)
    assert "topsecret" not in hidden and "secret@" not in hidden
    assert "db.example" in hidden or "host=db" in hidden


# ---------------------------------------------------------------- bad input


def _latin1_study(tmp_path: Path) -> str:
    path = tmp_path / "bad.toml"
    path.write_bytes("# caf\xe9\nseed = 0\n".encode("latin-1"))
    return str(path)


BAD_INPUT = [
    ("--devices foo", ("sweep", TINY, "--devices", "foo"), "foo: not a device"),
    ("--devices cuda:0 on CPU", ("sweep", TINY, "--devices", "cuda:0"), "CUDA is not available"),
    ("--timeout -5m", ("sweep", TINY, "--timeout", "-5m"), "positive duration"),
    ("--timeout nan", ("sweep", TINY, "--timeout", "nan"), "positive duration"),
    ("--timeout inf", ("sweep", TINY, "--timeout", "inf"), "positive duration"),
    ("--timeout 0", ("sweep", TINY, "--timeout", "0"), "positive duration"),
    ("--top -1", ("report", "{out}", "--top", "-1"), "--top"),
    ("mysql without driver", ("sweep", TINY, "--storage", "mysql://u:pw@h/db"), "PyMySQL"),
    ("non-UTF-8 study", ("sweep", "{latin1}"), "not a UTF-8 text file"),
    ("report of nothing", ("report", "{out}"), "no sweep here"),
    ("worker without a study", ("worker", "--out", "{out}", "--wait", "1s"), "no study here"),
    ("worker --wait 0", ("worker", "--out", "{out}", "--wait", "0"), "no study here"),
    ("report, missing journal", ("report", "{out}", "--storage", "{out}/x/s.journal"), "no study"),
]


@pytest.mark.parametrize(("name", "args", "message"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_one_line_and_writes_nothing(
    name: str,
    args: tuple[str, ...],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    latin1 = _latin1_study(tmp_path)
    filled = [a.format(out=out, latin1=latin1) for a in args]
    if filled[0] == "sweep":
        filled += ["--out", str(out)]
    code, _, err = run_cli(capsys, monkeypatch, *filled)
    assert code == 2, err
    _one_line(err)
    assert message in err and "pw@" not in err
    assert not out.exists()  # nothing written, not even a folder


def test_result_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "x.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------- PostgreSQL


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test's own study.ask()
def test_a_stale_trial_on_a_database_is_seen_by_report_and_reaped_by_reap(
    postgres: Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = tiny_config("sweep.heartbeat_seconds=1", *FAST[1::2])
    prepared = prepare_sweep(cfg, tmp_path, storage=postgres.url, study_name="stale", trials=1)
    execute(prepared, progress=False)
    assert prepared.plan is not None
    storage = prepared.plan.storage
    study = optuna.load_study(study_name="stale", storage=storage.backend)
    stuck = study.ask()
    storage.backend.record_heartbeat(storage.trial_id(study, stuck.number))  # type: ignore[attr-defined]
    time.sleep(8)  # past the grace period of six beats

    def lrsweep(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lrsweep", *args, str(tmp_path), "--study", "stale"],
            cwd=ROOT,
            env={**os.environ, "LRSWEEP_STORAGE": postgres.url},
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = lrsweep("report")
    assert done.returncode == 0, done.stderr
    assert "Heartbeat of storage" not in done.stderr
    assert f"trial {stuck.number} looks stale" in done.stdout
    seen = optuna.load_study(study_name="stale", storage=storage.backend).trials[stuck.number]
    assert seen.state == TrialState.RUNNING  # a report only reads
    done = lrsweep("reap")
    assert done.returncode == 0 and f"Reaped trials {stuck.number}" in done.stdout, done.stderr
    reaped = optuna.load_study(study_name="stale", storage=storage.backend).trials[stuck.number]
    assert reaped.state == TrialState.FAIL and "no heartbeat" in reaped.user_attrs["reason"]
    trials, meta = read_parquet(tmp_path / TRIALS_FILE)
    assert trials.set_index("number").loc[stuck.number, "state"] == "FAIL"
    assert PASSWORD not in str(meta)


@pytest.mark.slow
def test_a_password_in_the_query_reaches_no_file(
    postgres: Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    url = f"postgresql://lrsweep@127.0.0.1:{postgres.port}/lrsweep?password={PASSWORD}"
    done = subprocess.run(
        [sys.executable, "-m", "lrsweep", "sweep", TINY, "--out", str(tmp_path), "--trials", "1"]
        + ["--study", "query", "-q", *FAST],
        cwd=ROOT,
        env={**os.environ, "LRSWEEP_STORAGE": url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert "Heartbeat of storage" not in done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------- faults of the new features


def test_run_sweep_applies_overrides_to_a_config_too(tmp_path: Path) -> None:
    """They were dropped in silence when the study was a StudyConfig (or None)."""
    from lrsweep import config as config_mod
    from lrsweep.sweep.plan import run_sweep

    cfg = config_mod.load(TINY)
    run_sweep(cfg, tmp_path / "a", overrides=["sweep.steps=7"], trials=1, progress=False)
    trials, _ = read_parquet(tmp_path / "a" / TRIALS_FILE)
    assert trials["total_steps"].tolist() == [7]
    run_sweep(TINY, tmp_path / "b", overrides=["sweep.steps=7"], trials=1, progress=False)
    run_sweep(None, tmp_path / "b", overrides=["sweep.eval_every=7"], trials=2, progress=False)
    trials, _ = read_parquet(tmp_path / "b" / TRIALS_FILE)
    assert trials["total_steps"].tolist() == [7, 7]


def test_a_range_test_key_of_the_other_mode_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "f"
    code, _, err = run_cli(
        capsys, monkeypatch, "find", TINY, "--set", "rangetest.steps=20", "--out", str(out)
    )
    assert code == 2 and "rangetest.steps: has no effect in probe mode" in err, err
    _one_line(err)
    assert not out.exists()
    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "find",
        TINY,
        "--mode",
        "ramp",
        "--set",
        "rangetest.runs=5",
        "--out",
        str(out),
    )
    assert code == 2 and "rangetest.runs: has no effect in ramp mode" in err, err


def test_a_quiet_sweep_prints_no_optuna_info_and_says_its_table_is_the_top(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrsweep",
            "sweep",
            TINY,
            "--out",
            str(tmp_path),
            "-q",
            "--trials",
            "6",
            *FAST,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "A new study created" not in done.stderr and "[I " not in done.stderr
    assert "; the best 5 of 6:" in done.stdout


def test_the_cli_gives_sigterm_back_to_a_python_caller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(
        capsys, monkeypatch, "sweep", TINY, "--out", str(tmp_path), "--trials", "1", "-q", *FAST
    )
    assert code == 0, err
    assert signal.getsignal(signal.SIGTERM) is before
