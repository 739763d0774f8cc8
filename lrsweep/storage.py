"""Where a study lives, and how lrsweep knows which of its running trials are still alive.

The default is an Optuna journal file in the output folder: safe for several processes on
one machine, unlike SQLite. A journal has no heartbeat, so every running trial gets a
liveness record (host, pid, process start time, last beat) in ``live/`` beside the journal,
refreshed by a background thread. A RUNNING trial is stale when its process is gone (same
host) or its beat is older than the grace period (another host); a trial whose process is
alive is never failed. On a database, Optuna's own heartbeat does this job.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import optuna
import psutil
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from lrsweep.errors import StudyError, first_line
from lrsweep.results import atomic_write


logger = logging.getLogger(__name__)
T = TypeVar("T")

JOURNAL_FILE = "study.journal"
LIVE_DIR = "live"


def open_storage(out: Path, url: str | None = None, heartbeat: float = 10.0) -> BaseStorage:
    """The study's storage: a journal file in ``out`` by default; a database URL
    (postgresql://, mysql://) with Optuna's heartbeat and connection checks; or a path to a
    journal file elsewhere."""
    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(out / JOURNAL_FILE)))
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme is not None and not is_database(url):
        raise StudyError(
            f"--storage {redact(url)}: unsupported scheme {scheme!r}; use "
            "postgresql://, mysql:// or a journal file path (never SQLite for "
            "parallel workers)"
        )
    if scheme is not None:
        interval = max(1, round(heartbeat))
        # Optuna marks the heartbeat arguments experimental; the warning is noise to users.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        try:
            return retry(
                lambda: RDBStorage(
                    _with_driver(url),
                    # pool_pre_ping replaces connections that a server restart has broken.
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=interval,
                    grace_period=round(grace_seconds(interval)),
                ),
                what="connect",
                max_wait=30,
            )
        except ImportError as err:
            raise StudyError(
                f"--storage {redact(url)}: the database driver is missing "
                f"({err.name}); pip install 'lrsweep[postgres]'"
            ) from None
        except Exception as err:  # noqa: BLE001 - any connection failure is the user's to fix
            raise StudyError(
                f"--storage {redact(url)}: cannot connect ({redact(first_line(err))})"
            ) from None
    path = Path(url).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def is_database(url: str | None) -> bool:
    scheme = url.split("://", 1)[0].split("+", 1)[0] if url and "://" in url else ""
    return scheme in ("postgresql", "postgres", "mysql")


def _with_driver(url: str) -> str:
    # SQLAlchemy 2 maps a bare postgresql:// to psycopg2; lrsweep uses psycopg 3.
    for alias in ("postgresql://", "postgres://"):
        if url.startswith(alias):
            return "postgresql+psycopg://" + url[len(alias) :]
    return url


def grace_seconds(heartbeat: float) -> float:
    """How long a silent worker counts as alive: six missed beats."""
    return 6 * heartbeat


_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]*(@)")


def redact(text: str) -> str:
    """Hide the password of every URL in ``text``."""
    return _PASSWORD.sub(r"\1***\2", text)


def retry(call: Callable[[], T], *, what: str, max_wait: float = 900.0) -> T:
    """Call ``call``, retrying with backoff while the database is unreachable (a restart, a
    dropped connection), for up to ``max_wait`` seconds."""
    from sqlalchemy.exc import DBAPIError

    delay, deadline = 1.0, time.time() + max_wait
    while True:
        try:
            return call()
        except (DBAPIError, optuna.exceptions.StorageInternalError) as err:
            if time.time() + delay > deadline:
                raise
            logger.warning(
                "storage unreachable while trying to %s (%s); retrying in %.0f s",
                what,
                redact(first_line(err)),
                delay,
            )
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


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


def live_dir(storage: BaseStorage) -> Path | None:
    """Where a journal's liveness records live: beside the journal file, so that every
    process sharing the journal sees them (None for a database, which has heartbeats)."""
    backend = getattr(storage, "_backend", None)
    if not isinstance(backend, JournalFileBackend):
        return None
    journal = Path(backend._file_path)
    return journal.parent / (LIVE_DIR if journal.name == JOURNAL_FILE else f"{journal.stem}.live")


class Heartbeat:
    """Beats for a running trial from a daemon thread: Optuna's own heartbeat on a database,
    a liveness record beside the journal otherwise. A failed beat (database down, disk full)
    is logged and never kills the trial."""

    def __init__(
        self, storage: BaseStorage, trial_id: int, trial_number: int, interval: float
    ) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.path = (live_dir(storage) or Path(".")) / f"{trial_number}.json"
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lrsweep-heartbeat")

    def _beat(self) -> None:
        if is_heartbeat_enabled(self.storage):  # a database (wrapped in Optuna's cache)
            self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
            return
        record = Liveness.here()
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(asdict(record))))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception as err:  # noqa: BLE001
                logger.warning("heartbeat failed: %s", redact(first_line(err)))

    def __enter__(self) -> Heartbeat:
        try:
            self._beat()
        except Exception as err:  # noqa: BLE001
            logger.warning("heartbeat failed: %s", redact(first_line(err)))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if not is_heartbeat_enabled(self.storage):
            self.path.unlink(missing_ok=True)


def read_liveness(live: Path, trial_number: int) -> Liveness | None:
    try:
        return Liveness(**json.loads((live / f"{trial_number}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def reap_stale_trials(study: optuna.Study, grace: float) -> list[int]:
    """Mark RUNNING trials whose worker died as FAIL and enqueue their parameters again.

    Returns the numbers of the trials it failed. Workers on one machine reap under a file
    lock, so that a dead trial is failed and retried once.
    """
    storage = study._storage
    live = live_dir(storage)
    if live is None:  # a database: Optuna's heartbeats, and row locks against double reaping
        stale = set(storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]
        return [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t._trial_id in stale and fail_trial(study, t, "worker died (no heartbeat)")
        ]
    live.mkdir(parents=True, exist_ok=True)
    with open(live / ".reap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _reap_journal(study, live, grace)


def _reap_journal(study: optuna.Study, live: Path, grace: float) -> list[int]:
    now = time.time()
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = read_liveness(live, trial.number)
        if record is not None and record.alive(grace, now):
            continue
        if record is None and _started(trial) > now - grace:
            continue  # just asked; its first beat is on the way
        who = f"{record.host}:{record.pid}" if record else "unknown worker"
        if fail_trial(study, trial, f"worker {who} died (no heartbeat)"):
            reaped.append(trial.number)
            (live / f"{trial.number}.json").unlink(missing_ok=True)
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
