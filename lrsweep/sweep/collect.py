"""A sweep's result files kept in step with its study.

The storage is the source of truth. A ``lrsweep sweep`` process rewrites ``OUT``'s
trials.parquet and curves.parquet from it after every trial; worker processes write only
their own part folders (no two processes write one file); ``lrsweep reap`` fails the trials
of dead workers and rebuilds the files (or merges the parts where there is no storage).
``lrsweep report``, ``export`` and ``dashboard`` only read: the folder may be read-only, and
it is left as it was. No file ever ends up with fewer trials than it held.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from lrsweep.config import DEFAULT_STUDY
from lrsweep.errors import StudyError
from lrsweep.record import StudyRecord, TrialRecord
from lrsweep.results import (
    merge_parts,
    merged_parts,
    part_folder,
    read_sweep,
    sweep_frames,
    sweep_states,
    write_sweep,
)
from lrsweep.sweep.storage import (
    StudyStorage,
    journal_path,
    open_storage,
    reap_stale_trials,
    stale_trials,
)
from lrsweep.version import __version__


logger = logging.getLogger(__name__)


def _metadata(study: optuna.Study, storage: StudyStorage) -> dict[str, Any]:
    stored = StudyRecord.of(study)
    return {
        "version": __version__,
        "study": study.study_name,
        "storage": storage.display,
        "config": stored.config,
        "peak_lr_bounds": list(stored.peak_lr_bounds) if stored.peak_lr_bounds else None,
    }


def write_results(
    study: optuna.Study, storage: StudyStorage, out: Path, worker: str | None = None
) -> None:
    """Rebuild the result files from the storage: all trials into ``out``, or with
    ``worker`` the trials that worker ran into its part folder."""
    trials = study.get_trials(deepcopy=False)
    folder = out
    if worker is not None:
        trials = [t for t in trials if TrialRecord.of(t).worker == worker]
        if not trials:
            return  # a worker that ran nothing leaves no empty part folder behind
        folder = part_folder(out, worker)
    write_sweep(trials, folder, _metadata(study, storage))


def _open(
    out: Path, storage_url: str | None, study_name: str, read_only: bool
) -> tuple[optuna.Study, StudyStorage] | None:
    """The study and its storage (with the study's heartbeat), or None without a storage."""
    journal = journal_path(out, storage_url)
    if storage_url is None and (journal is None or not journal.exists()):
        return None
    storage = open_storage(out, storage_url, create=False, read_only=read_only)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage.backend)
    except KeyError:
        raise StudyError(
            f"no study named {study_name!r} in {storage.display}; check --study"
        ) from None
    if (config := StudyRecord.of(study).config) is not None:
        storage = storage.beating(config["sweep"]["heartbeat_seconds"])
    return study, storage


def _no_sweep(out: Path) -> StudyError:
    return StudyError(
        f"{out}: no sweep here (no study journal, result files or parts/); run "
        "lrsweep sweep --out there, or give --storage"
    )


def load_results(
    out: Path, storage_url: str | None = None, study_name: str = DEFAULT_STUDY
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """trials.parquet, curves.parquet and their metadata, as the study holds them now. It
    only reads: where the files lag behind the storage (or are damaged), the tables are
    built from the study in memory; without a storage, the workers' part files are merged
    in memory. The commands that write (sweep, worker, reap) bring the files up to date."""
    opened = _open(out, storage_url, study_name, read_only=True)
    if opened is None:
        merged = merged_parts(out)
        if merged is None:
            raise _no_sweep(out)
        return merged
    study, storage = opened
    trials = study.get_trials(deepcopy=False)
    if sweep_states(out, study.study_name) == {t.number: t.state.name for t in trials}:
        return read_sweep(out)
    logger.info("results in %s lag the study: reading the study itself", out)
    return sweep_frames(trials, _metadata(study, storage))


def stale_lines(out: Path, storage_url: str | None, study_name: str) -> list[str]:
    """One line per RUNNING trial whose worker looks dead (what ``lrsweep reap`` would fail
    and queue again). Reads only."""
    opened = _open(out, storage_url, study_name, read_only=True)
    if opened is None:
        return []
    study, storage = opened
    return [
        f"trial {t.number} looks stale: {why}; lrsweep reap {out} marks it failed and queues "
        "it again (a running sweep does so itself)"
        for t, why in stale_trials(study, storage)
    ]


def reap(out: Path, storage_url: str | None, study_name: str) -> list[int]:
    """Fail the stale trials and queue them again, then bring the result files up to date
    (merging the workers' part files where there is no storage). Returns those failed."""
    opened = _open(out, storage_url, study_name, read_only=False)
    if opened is None:
        if not merge_parts(out):
            raise _no_sweep(out)
        return []
    study, storage = opened
    reaped = reap_stale_trials(study, storage)
    write_results(study, storage, out)
    return reaped
