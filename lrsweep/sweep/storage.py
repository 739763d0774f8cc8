"""Where a study lives, and how lrsweep knows which of its running trials are still alive.

The default is an Optuna journal file in the output folder: safe for several processes on
one machine, unlike SQLite. A journal has no heartbeat, so every running trial gets a
liveness record (host, pid, process start time, last beat) in ``live/`` beside the journal,
refreshed by a background thread. A RUNNING trial is stale when its process is gone (same
host) or its beat is older than the grace period (another host); a trial whose process is
alive is never failed. On a database, Optuna's own heartbeat does this job.
"""

from __future__ import annotations

import dataclasses
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
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from lrsweep import record
from lrsweep.config import SweepConfig
from lrsweep.errors import StudyError, first_line
from lrsweep.record import TrialRecord
from lrsweep.results import JOURNAL_FILE, LIVE_DIR, atomic_write, locked


logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StudyStorage:
    """An opened storage and what lrsweep must know about it without asking Optuna's
    internals: where a journal lives (its liveness records sit beside it) and whether it is a
    database (with Optuna's heartbeats)."""

    backend: BaseStorage
    heartbeat: float
    url: str | None = None  # as the user gave it; print only ``display``
    journal: Path | None = None

    @property
    def is_database(self) -> bool:
        return self.journal is None

    @property
    def display(self) -> str:
        """Where the study lives, safe to print or store (no password)."""
        return redact(self.url) if self.url else JOURNAL_FILE

    @property
    def live(self) -> Path | None:
        if self.journal is None:
            return None
        name = LIVE_DIR if self.journal.name == JOURNAL_FILE else f"{self.journal.stem}.live"
        return self.journal.parent / name

    def beating(self, heartbeat: float) -> StudyStorage:
        """This storage with the study's own heartbeat, which sets the grace period after
        which a silent trial counts as stale."""
        if heartbeat == self.heartbeat:
            return self
        if self.journal is not None:
            return dataclasses.replace(self, heartbeat=heartbeat)
        assert self.url is not None
        return StudyStorage(_open_database(self.url, heartbeat), heartbeat, self.url)

    def trial_id(self, study: optuna.Study, number: int) -> int:
        study_id = self.backend.get_study_id_from_name(study.study_name)
        return self.backend.get_trial_id_from_study_id_trial_number(study_id, number)


def journal_path(out: Path, url: str | None) -> Path | None:
    """The journal file a storage URL names (None for a database)."""
    if url is None:
        return out / JOURNAL_FILE
    return None if "://" in url else Path(url).expanduser()


def open_storage(
    out: Path,
    url: str | None = None,
    heartbeat: float = SweepConfig.heartbeat_seconds,
    *,
    create: bool = True,
    read_only: bool = False,
) -> StudyStorage:
    """The study's storage: a journal file in ``out`` by default; a database URL
    (postgresql://, mysql://) with Optuna's heartbeat and connection checks; or a path to a
    journal file elsewhere. With ``create`` False a missing journal is an error, not a new
    empty file; ``read_only`` (commands that only read) also leaves a torn journal as it is
    (Optuna's reader skips a torn last line; the next writer repairs it)."""
    if url is not None and "://" in url:
        return StudyStorage(_open_database(url, heartbeat), heartbeat, url)
    path = journal_path(out, url)
    assert path is not None
    if not path.exists() and not create:
        raise StudyError(
            f"{path}: no study here yet; give a study file to start one, or --storage for "
            "a study that lives elsewhere"
        )
    if read_only:
        check_journal(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
    return StudyStorage(JournalStorage(JournalFileBackend(str(path))), heartbeat, url, path)


def _open_database(url: str, heartbeat: float) -> BaseStorage:
    if not is_database(url):
        scheme = url.split("://", 1)[0]
        raise StudyError(
            f"--storage {redact(url)}: unsupported scheme {scheme!r}; use "
            "postgresql://, mysql:// or a journal file path (never SQLite for "
            "parallel workers)"
        )
    interval = max(1, round(heartbeat))
    try:
        with warnings.catch_warnings():
            # Optuna marks the heartbeat arguments experimental; the warning is noise to users.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
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
        hint = (
            "pip install 'lrsweep[postgres]'"
            if url.startswith("postgres")
            else "pip install PyMySQL and use mysql+pymysql://"
        )
        raise StudyError(
            f"--storage {redact(url)}: the database driver is missing ({err.name}); {hint}"
        ) from None
    except Exception as err:  # noqa: BLE001 - any connection failure is the user's to fix
        raise StudyError(
            f"--storage {redact(url)}: cannot connect ({redact(first_line(err))})"
        ) from None


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


_URL = re.compile(r"([A-Za-z][\w+.-]*://)([^\s/?#]*)")
_SECRET_PARAM = re.compile(r"(password=)[^&\s'\"]*", re.IGNORECASE)


def _hide_userinfo(match: re.Match[str]) -> str:
    netloc = match.group(2)
    if "@" not in netloc:
        return match.group(0)
    # The last @ ends the credentials: a password may hold a raw @.
    userinfo, host = netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{match.group(1)}{user}{':***' if ':' in userinfo else ''}@{host}"


def redact(text: str) -> str:
    """Hide every credential in ``text``: the password of each URL (``user:pw@``, also
    with a raw ``@`` in it, or an empty user) and ``password=`` parameters."""
    return _SECRET_PARAM.sub(r"\1***", _URL.sub(_hide_userinfo, text))


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


# ---------------------------------------------------------------- journal integrity


def check_journal(path: Path) -> bytes:
    """Refuse a journal damaged anywhere but in its last record; its torn last record (a
    kill or a full disk during an append), or b"". Reads only: Optuna's reader skips a torn
    last record, so that commands that only read can leave it to the next writer."""
    if not path.exists():
        return b""
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # after the last newline: b"" unless the last record is torn
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except ValueError:
            raise StudyError(
                f"{path}: line {number} is damaged (not a journal record); restore the "
                "file from a backup or delete that line, then run again"
            ) from None
    return tail


def repair_journal(path: Path) -> None:
    """Drop a torn last record and refuse a journal damaged elsewhere, before Optuna reads it
    or anything is appended to it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        if tail := check_journal(path):
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size - len(tail))
            logger.warning(
                "%s: dropped a torn last record (%d bytes, an interrupted write); the "
                "records before it are kept",
                path,
                len(tail),
            )
    finally:
        lock.release()


# ---------------------------------------------------------------- liveness


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
    """Beats for a running trial from a daemon thread: Optuna's own heartbeat on a database,
    a liveness record beside the journal otherwise. A failed beat (database down, disk full)
    is logged and never kills the trial."""

    def __init__(self, storage: StudyStorage, trial_id: int, trial_number: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.path = storage.live / f"{trial_number}.json" if storage.live else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lrsweep-heartbeat")

    def _beat(self) -> None:
        if self.path is None:
            self.storage.backend.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
            return
        record = Liveness.here()
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(asdict(record))))

    def _beat_logged(self) -> None:
        try:
            self._beat()
        except Exception as err:  # noqa: BLE001
            logger.warning("heartbeat failed: %s", redact(first_line(err)))

    def _run(self) -> None:
        while not self._stop.wait(self.storage.heartbeat):
            self._beat_logged()

    def __enter__(self) -> Heartbeat:
        self._beat_logged()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_liveness(live: Path, trial_number: int) -> Liveness | None:
    try:
        return Liveness(**json.loads((live / f"{trial_number}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------- stale trials


def stale_trials(study: optuna.Study, storage: StudyStorage) -> list[tuple[FrozenTrial, str]]:
    """The RUNNING trials whose worker looks dead, each with why; reads only (a report
    says so, ``reap_stale_trials`` acts on it)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if storage.live is None:
        stale = _stale_trial_ids(storage.backend, study)
        return [
            (t, "worker died (no heartbeat)")
            for t in running
            if storage.trial_id(study, t.number) in stale
        ]
    now, grace = time.time(), grace_seconds(storage.heartbeat)
    found = []
    for trial in running:
        record = read_liveness(storage.live, trial.number)
        if record is not None and record.alive(grace, now):
            continue
        if record is None and _started(trial) > now - grace:
            continue  # just asked; its first beat is on the way
        who = f"{record.host}:{record.pid}" if record else "unknown worker"
        found.append((trial, f"worker {who} died (no heartbeat)"))
    return found


def reap_stale_trials(study: optuna.Study, storage: StudyStorage) -> list[int]:
    """Mark RUNNING trials whose worker died as FAIL and enqueue their parameters again.

    Returns the numbers of the trials it failed. Workers on one machine reap under a file
    lock, so that a dead trial is failed and retried once; on a database the row update
    decides which worker wins. Only the commands that write call it (sweep, worker, reap).
    """
    if storage.live is None:
        return [
            t.number
            for t, why in stale_trials(study, storage)
            if fail_trial(study, storage, t, why)
        ]
    storage.live.mkdir(parents=True, exist_ok=True)
    with locked(storage.live):
        reaped = []
        for trial, why in stale_trials(study, storage):
            if fail_trial(study, storage, trial, why):
                reaped.append(trial.number)
                (storage.live / f"{trial.number}.json").unlink(missing_ok=True)
        return reaped


def _stale_trial_ids(backend: BaseStorage, study: optuna.Study) -> set[int]:
    # Optuna has no public call that lists stale trials without failing them through its own
    # callback (optuna.storages.fail_stale_trials), which cannot record lrsweep's reason.
    # Checked against Optuna 5.0.0: RDBStorage._get_stale_trial_ids(study_id).
    study_id = backend.get_study_id_from_name(study.study_name)
    return set(backend._get_stale_trial_ids(study_id))  # type: ignore[attr-defined]


def _started(trial: FrozenTrial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else 0.0


def fail_trial(
    study: optuna.Study, storage: StudyStorage, trial: FrozenTrial, reason: str
) -> bool:
    """FAIL a trial left RUNNING and enqueue its parameters as a retry; False if another
    worker got there first."""
    backend = storage.backend
    trial_id = storage.trial_id(study, trial.number)
    try:
        record.store_reason(backend, trial_id, reason)
        if not backend.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
        return False
    logger.warning("trial %d failed: %s; its parameters are queued again", trial.number, reason)
    record.queue(study, trial.params, TrialRecord.of(trial).retry(trial.number))
    return True
