"""Where a study lives, and how lrsweep knows which of its running trials are still alive.

The default is an Optuna journal file in the output folder: safe for several processes on
one machine, unlike SQLite. A journal has no heartbeat, so every running trial gets a
liveness record (host, pid, process start time, last beat) in ``<out>/live/``, refreshed by a
background thread. A RUNNING trial is stale when its process is gone (same host) or its beat
is older than the grace period (another host); a trial whose process is alive is never failed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import psutil
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from lrsweep.results import atomic_write


logger = logging.getLogger(__name__)

JOURNAL_FILE = "study.journal"
LIVE_DIR = "live"


def open_storage(out: Path) -> BaseStorage:
    """The study's journal storage in ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(out / JOURNAL_FILE)))


@dataclass(frozen=True)
class Liveness:
    host: str
    pid: int
    started: float  # process create time, so that a reused pid is not taken for the worker
    beat: float

    @staticmethod
    def here() -> Liveness:
        pid = os.getpid()
        return Liveness(socket.gethostname(), pid, psutil.Process(pid).create_time(), time.time())

    def alive(self, grace: float, now: float | None = None) -> bool:
        """Is the process that wrote this record still running its trial?"""
        if self.host == socket.gethostname():
            try:
                return abs(psutil.Process(self.pid).create_time() - self.started) < 1.0
            except psutil.Error:
                return False
        return (now or time.time()) - self.beat < grace


class Heartbeat:
    """Keeps ``<out>/live/<trial>.json`` fresh while a trial runs (a daemon thread)."""

    def __init__(self, out: Path, trial_number: int, interval: float) -> None:
        self.path = out / LIVE_DIR / f"{trial_number}.json"
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lrsweep-heartbeat")

    def _beat(self) -> None:
        record = Liveness.here()
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(asdict(record))))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError as err:  # a full disk must not kill the trial
                logger.warning("heartbeat failed: %s", err)

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def read_liveness(out: Path, trial_number: int) -> Liveness | None:
    try:
        return Liveness(**json.loads((out / LIVE_DIR / f"{trial_number}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def reap_stale_trials(study: optuna.Study, out: Path, grace: float) -> list[int]:
    """Mark RUNNING trials whose worker died as FAIL and enqueue their parameters again.

    Returns the numbers of the trials it failed. Workers on one machine reap under a file
    lock, so that a dead trial is failed and retried once.
    """
    (out / LIVE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / LIVE_DIR / ".reap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _reap(study, out, grace)


def _reap(study: optuna.Study, out: Path, grace: float) -> list[int]:
    now = time.time()
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = read_liveness(out, trial.number)
        if record is not None and record.alive(grace, now):
            continue
        if record is None and _started(trial) > now - grace:
            continue  # just asked; its first beat is on the way
        who = f"{record.host}:{record.pid}" if record else "unknown worker"
        if fail_trial(study, trial, f"worker {who} died (no heartbeat)"):
            reaped.append(trial.number)
            (out / LIVE_DIR / f"{trial.number}.json").unlink(missing_ok=True)
    return reaped


def _started(trial: FrozenTrial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """FAIL a trial left RUNNING and enqueue its parameters as a retry; False if another
    worker got there first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            return False
    except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
        return False
    logger.warning("trial %d failed: %s; its parameters are queued again", trial.number, reason)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return True
