"""Confirmation with fresh seeds: after the budget, the best configurations run again.

The objective is flat near its best while two seeds of one configuration differ by about as
much, so the best single trial is partly luck. Once the study holds its budget of finished
trials, the ``sweep.confirm_top`` best complete configurations are queued again with
``sweep.confirm_seeds`` new seeds each (adapter init and data order). A confirmation run is an
ordinary queued trial whose record (``lrsweep.record``) says which trial it repeats
(``confirms``) and with which ``seed``: it resumes like any other trial after a crash (a stale
or interrupted one is queued again with them, see ``storage.fail_trial``), and it is never
pruned.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsweep import record
from lrsweep.config import StudyConfig
from lrsweep.record import CONFIRMATION_ORIGIN, TrialRecord, is_confirmation


_OPEN = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def confirmation_seeds(config: StudyConfig) -> list[int]:
    """The new seeds: the study's seed + 1, + 2, ... (never the seed of the sweep's trials)."""
    return [config.seed + i for i in range(1, config.sweep.confirm_seeds + 1)]


def top_configurations(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The ``k`` best complete trials that are not themselves confirmation runs."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not is_confirmation(t) and t.value is not None
    ]
    return sorted(done, key=lambda t: (t.value, t.number))[:k]


def planned(study: optuna.Study, config: StudyConfig) -> list[tuple[FrozenTrial, int]]:
    """(trial to confirm, seed) for every confirmation run the study should have now."""
    if config.sweep.confirm_top == 0 or config.sweep.confirm_seeds == 0:
        return []
    seeds = confirmation_seeds(config)
    return [(t, s) for t in top_configurations(study, config.sweep.confirm_top) for s in seeds]


def enqueue_missing(study: optuna.Study, config: StudyConfig) -> int:
    """Queue every planned confirmation run that has no trial (waiting, running or
    finished; a failed one is queued again). Returns how many are waiting to run."""
    have: dict[tuple[int, int], TrialState] = {}
    for t in study.get_trials(deepcopy=False, states=_OPEN):
        if is_confirmation(t):
            r = TrialRecord.of(t)
            have[(int(r.confirms), int(r.seed))] = t.state  # type: ignore[arg-type]
    waiting = 0
    for trial, seed in planned(study, config):
        state = have.get((trial.number, seed))
        if state is None:
            queued = TrialRecord(CONFIRMATION_ORIGIN, confirms=trial.number, seed=seed)
            record.queue(study, trial.params, queued)
            state = TrialState.WAITING
        waiting += state == TrialState.WAITING
    return waiting


def runs_left(study: optuna.Study | None, config: StudyConfig, trials_left: int) -> int:
    """Confirmation runs still to come, for the time estimate: all of them while the budget is
    not met (the best configurations are not known yet), else those not finished."""
    runs = config.sweep.confirm_top * config.sweep.confirm_seeds
    if study is None or trials_left > 0:
        return runs
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    records = [TrialRecord.of(t) for t in finished if is_confirmation(t)]
    done = {(r.confirms, r.seed) for r in records}
    return sum((t.number, s) not in done for t, s in planned(study, config))
