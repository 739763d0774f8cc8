"""A sweep's result files kept in step with its study.

The storage is the source of truth. A ``lrsweep sweep`` process rewrites ``OUT``'s
trials.parquet and curves.parquet from it after every trial; worker processes write only
their own part folders (no two processes write one file). ``lrsweep report`` and ``export``
rebuild the files from the storage when they can reach it, and otherwise merge the parts
with the files already there. Either way no file ends up with fewer trials than it held.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

import lrsweep
from lrsweep.config import DEFAULT_STUDY
from lrsweep.errors import StudyError
from lrsweep.results import merge_parts, part_folder, read_sweep, sweep_states, write_sweep
from lrsweep.sweep.storage import StudyStorage, journal_path, open_storage, reap_stale_trials


logger = logging.getLogger(__name__)


def _metadata(study: optuna.Study, storage: StudyStorage) -> dict[str, Any]:
    return {
        "version": lrsweep.__version__,
        "study": study.study_name,
        "storage": storage.display,
        "config": study.user_attrs["config"],
        "peak_lr_bounds": study.user_attrs.get("peak_lr_bounds"),
    }


def write_results(
    study: optuna.Study, storage: StudyStorage, out: Path, worker: str | None = None
) -> None:
    """Rebuild the result files from the storage: all trials into ``out``, or with
    ``worker`` the trials that worker ran into its part folder."""
    trials = study.get_trials(deepcopy=False)
    folder = out
    if worker is not None:
        trials = [t for t in trials if t.user_attrs.get("worker") == worker]
        if not trials:
            return  # a worker that ran nothing leaves no empty part folder behind
        folder = part_folder(out, worker)
    write_sweep(trials, folder, _metadata(study, storage))


def load_results(
    out: Path, storage_url: str | None = None, study_name: str = DEFAULT_STUDY
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """trials.parquet, curves.parquet and their metadata: rebuilt first when they lag
    behind the storage (stale trials of dead workers reaped on the way), or merged from the
    workers' part files when there is no storage to read."""
    journal = journal_path(out, storage_url)
    if storage_url is not None or (journal is not None and journal.exists()):
        storage = open_storage(out, storage_url, create=False)
        try:
            study = optuna.load_study(study_name=study_name, storage=storage.backend)
        except KeyError:
            raise StudyError(
                f"no study named {study_name!r} in {storage.display}; check --study"
            ) from None
        if "config" in study.user_attrs:
            heartbeat = study.user_attrs["config"]["sweep"]["heartbeat_seconds"]
            storage = storage.beating(heartbeat)
            study = optuna.load_study(study_name=study_name, storage=storage.backend)
            reap_stale_trials(study, storage)
            states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
            if sweep_states(out) != states:
                logger.info("results in %s lag the study: rebuilding them", out)
                write_results(study, storage, out)
    elif not merge_parts(out):
        raise StudyError(
            f"{out}: no sweep here (no study journal, result files or parts/); run "
            "lrsweep sweep --out there, or give --storage"
        )
    return read_sweep(out)
