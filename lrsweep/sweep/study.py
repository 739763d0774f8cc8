"""The Optuna study of a sweep: creating it, joining it, and what travels in it.

A study carries its resolved config, peak LR bounds, budget and lrsweep version as user
attributes, so that a worker needs only the storage and the study name. Whoever joins a
study, by creating it second in a race or by resuming it, passes the same compatibility
check (:data:`lrsweep.config.STUDY_KEYS`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from lrsweep import config as config_mod
from lrsweep import record
from lrsweep.config import STUDY_KEYS, StudyConfig, SweepConfig
from lrsweep.errors import StudyError
from lrsweep.record import (
    BASELINE_ORIGIN,
    FIRST_ORIGIN,
    StudyRecord,
    TrialRecord,
    is_confirmation,
)
from lrsweep.sweep.space import first_trial
from lrsweep.sweep.storage import StudyStorage, retry
from lrsweep.version import __version__


logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_POLL_SECONDS = 2.0
_CREATION_SECONDS = 30.0  # how long a study being created may lack its version


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise StudyError(
                "sweep.sampler = 'gp' needs scipy: pip install 'lrsweep[gp]'"
            ) from None
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def make_pruner(sweep: SweepConfig, steps: int) -> optuna.pruners.BasePruner:
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=sweep.eval_every, max_resource=steps)
    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    # The first evaluation (at step eval_every) is mostly warmup, so it never prunes.
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=sweep.eval_every + 1)


def finished_count(study: optuna.Study) -> int:
    """Finished trials that count against the budget (confirmation runs come on top)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return sum(1 for t in trials if not is_confirmation(t))


def _load(storage: StudyStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage.backend)
    except KeyError:
        return None


def _complete(study: optuna.Study, storage: StudyStorage, wait: float) -> optuna.Study:
    """``study`` once its creator has written everything (the version is written last)."""
    deadline = time.time() + wait
    while not StudyRecord.of(study).complete:
        if time.time() >= deadline:
            raise StudyError(
                f"study {study.study_name!r} is incomplete (its creation was interrupted); "
                "remove its storage or use another output folder (--out; out= in Python)"
            )
        time.sleep(_POLL_SECONDS)
        study = optuna.load_study(study_name=study.study_name, storage=storage.backend)
    return study


def check_joinable(study: optuna.Study, config: StudyConfig | None) -> StudyConfig:
    """The config to run ``study`` with: the stored one, with this run's own sweep,
    rangetest and device settings when ``config`` is given and agrees with it."""
    stored_record = StudyRecord.of(study)
    version = stored_record.lrsweep_version
    if version != __version__:
        raise StudyError(
            f"study {study.study_name!r} was made by lrsweep {version}, this is "
            f"{__version__}; use the same version on every worker"
        )
    assert stored_record.config is not None
    stored = config_mod.from_stored(stored_record.config)
    if config is None:
        return stored
    diff = config_mod.differences(config, stored, STUDY_KEYS)
    if diff:
        raise StudyError(
            f"study {study.study_name!r} was made with a different {', '.join(diff)}; "
            "start a new study (another --out or --study; out= or study_name= in Python), or "
            "resume this one with its stored config (no study file or --set options)"
        )
    if config.planned != stored.planned:
        logger.warning(
            "planned.*: the study keeps the planned run it was made with (%s); give lrsweep "
            "export --max-steps / --epochs for another",
            stored.planned,
        )
    return stored.replace(
        sweep=config.sweep,
        rangetest=config.rangetest,
        train=dataclasses.replace(stored.train, device=config.train.device),
    )


def join_study(
    storage: StudyStorage, name: str, config: StudyConfig | None, *, wait: float = 0.0
) -> tuple[optuna.Study | None, StudyConfig | None]:
    """The study ``name`` and the config to run it with, or (None, config) when there is
    none yet. With ``config`` None (a worker), waits up to ``wait`` seconds for the study
    to appear, saying so once."""
    deadline = time.time() + wait
    said = False
    while (study := retry(lambda: _load(storage, name), what="load the study")) is None:
        if config is not None:
            return None, config
        if time.time() >= deadline:
            raise StudyError(
                f"no study named {name!r} in {storage.display}"
                + (f" after waiting {wait:.0f} s" if wait else "")
                + "; start lrsweep sweep with a study file, or wait longer (--wait)"
            )
        if not said:
            logger.warning("waiting for study %r to appear in %s", name, storage.display)
            said = True
        time.sleep(_POLL_SECONDS)
    study = _complete(study, storage, _CREATION_SECONDS)
    return study, check_joinable(study, config)


def create_study(
    storage: StudyStorage,
    name: str,
    config: StudyConfig,
    bounds: tuple[float, float],
    first: dict[str, Any] | None,
    trials: int,
) -> tuple[optuna.Study, StudyConfig]:
    """Create the study with its config, bounds and budget stored in it, the range test's
    recommendation queued as its first trial and ``sweep.baseline_lr`` (a common default,
    when it lies in the bounds) as the next. A process that loses the race to create it
    joins the winner's study through the same check as any other."""
    try:
        study = optuna.create_study(study_name=name, storage=storage.backend, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage.backend)
        study = _complete(study, storage, _CREATION_SECONDS)
        return study, check_joinable(study, config)
    record.write_study(study, config=config.to_dict(), peak_lr_bounds=bounds, trials=trials)
    if first is not None:
        record.queue(study, first, TrialRecord(FIRST_ORIGIN))
    baseline = config.sweep.baseline_lr
    # Not past a budget of one trial, where it would run as an extra one.
    room = trials > 1 or first is None
    if baseline and bounds[0] <= baseline <= bounds[1] and room:
        params = first_trial(baseline, config, bounds)
        if params != first:
            origin = f"{BASELINE_ORIGIN} {baseline:g}"
            record.queue(study, params, TrialRecord(origin))
    # Written last: a study is complete once it has a version (see _complete).
    record.write_study(study, lrsweep_version=__version__)
    return study, config


def budget(
    study: optuna.Study, trials: int | None, config: StudyConfig, store: bool = True
) -> int:
    """Finished trials the study aims for: ``trials`` when given (and then stored in the
    study, unless not to ``store``: a dry run), else the study's own budget."""
    stored = StudyRecord.of(study).trials
    if trials is None:
        return stored or config.sweep.trials
    if trials != stored and store:
        retry(lambda: record.write_study(study, trials=trials), what="store the budget")
    return trials
