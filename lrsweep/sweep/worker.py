"""The worker loop: ask, run and tell trials until the study's budget is met.

Every way out of a trial is recorded: a finished run is told COMPLETE or PRUNED; an
exception or out-of-memory error is FAIL with its reason and the study goes on; Ctrl-C,
SIGTERM or a storage that stays down marks the trial FAIL ("interrupted"), queues its
parameters again and re-raises. The result files are rewritten after every trial and at
exit. Stale trials of dead workers are reaped when the loop starts, before every trial and
when it ends.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm.auto import tqdm

from lrsweep import record
from lrsweep.config import StudyConfig
from lrsweep.errors import LrsweepError, StudyError, first_line
from lrsweep.memory import free_memory
from lrsweep.record import TrialRecord
from lrsweep.sweep.collect import write_results
from lrsweep.sweep.confirm import enqueue_missing
from lrsweep.sweep.space import distributions, loraplus_ratio_of, schedule_of, worker_seed
from lrsweep.sweep.storage import Heartbeat, StudyStorage, fail_trial, reap_stale_trials, retry
from lrsweep.sweep.study import FINISHED, finished_count, make_pruner, make_sampler
from lrsweep.sweep.trial import Runner, TrialRun


logger = logging.getLogger(__name__)

# FAIL trials do not count against the budget: a cause that fails every trial (a batch
# that never fits, a data bug) would otherwise loop until the time limit.
MAX_FAILS_IN_A_ROW = 5


@dataclass
class SweepPlan:
    """What a worker runs: the study, its bounds and trial length, the budget, and where
    the results go (``part``: this worker's own part folder)."""

    out: Path
    study: optuna.Study
    storage: StudyStorage
    bounds: tuple[float, float]
    steps: int
    trials: int
    deadline: float | None = None  # time.time() after which no new trial starts
    part: bool = False


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(
    cfg: StudyConfig,
    plan: SweepPlan,
    runner: Runner,
    *,
    device: torch.device,
    progress: bool = True,
) -> int:
    """Run trials with ``runner`` until the study holds ``plan.trials`` finished trials, then
    the confirmation runs of its best configurations (``sweep.confirm_top``), or until the
    deadline passes. Returns the number of trials this worker finished."""
    study, storage = plan.study, plan.storage
    worker = worker_name()
    study.sampler = make_sampler(
        cfg.sweep.sampler, worker_seed(cfg.seed, worker, len(study.trials))
    )
    study.pruner = make_pruner(cfg.sweep, plan.steps)
    tally = _Tally()
    count = lambda: retry(lambda: finished_count(study), what="count trials")  # noqa: E731
    confirming = lambda: retry(  # noqa: E731
        lambda: enqueue_missing(study, cfg), what="queue confirmation runs"
    )
    bar = tqdm(total=plan.trials, initial=count(), desc="trials", disable=not progress)
    try:
        retry(lambda: reap_stale_trials(study, storage), what="reap stale trials")
        while count() < plan.trials and not _past(plan):
            _next_trial(cfg, plan, runner, worker, device, tally)
            bar.n = count()
            bar.refresh()
        while count() >= plan.trials and not _past(plan) and confirming() > 0:
            _next_trial(cfg, plan, runner, worker, device, tally)
        retry(lambda: reap_stale_trials(study, storage), what="reap stale trials")
    finally:
        bar.close()
        write_results(study, storage, plan.out, worker if plan.part else None)
    return tally.done


@dataclass
class _Tally:
    done: int = 0
    failed_in_a_row: int = 0


def _past(plan: SweepPlan) -> bool:
    if plan.deadline is not None and time.time() >= plan.deadline:
        logger.warning("time limit reached; no new trial starts")
        return True
    return False


def _next_trial(
    cfg: StudyConfig,
    plan: SweepPlan,
    runner: Runner,
    worker: str,
    device: torch.device,
    tally: _Tally,
) -> None:
    """Reap stale trials, run one trial, write the results; stop after too many failures."""
    study, storage = plan.study, plan.storage
    retry(lambda: reap_stale_trials(study, storage), what="reap stale trials")
    frozen = _one_trial(cfg, plan, runner, worker, device)
    write_results(study, storage, plan.out, worker if plan.part else None)
    tqdm.write(summary_line(frozen))
    if frozen.state in FINISHED:
        tally.done += 1
        tally.failed_in_a_row = 0
        return
    tally.failed_in_a_row += 1
    if tally.failed_in_a_row >= MAX_FAILS_IN_A_ROW:
        raise StudyError(
            f"{tally.failed_in_a_row} trials in a row failed (last: "
            f"{TrialRecord.of(frozen).reason}); fix the cause and run again"
        )


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while this block runs (in the main thread), so that an
    interrupt cannot fall between asking for a trial and guarding it; one that arrives is
    handled as the block ends. Python runs signal handlers in the main thread whichever
    thread the OS delivered the signal to, so swapping the handlers holds them reliably
    (masking the main thread alone does not: torch's and tqdm's threads take them)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, _: held.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in held[:1]:
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def _one_trial(
    cfg: StudyConfig, plan: SweepPlan, runner: Runner, worker: str, device: torch.device
) -> FrozenTrial:
    study, storage = plan.study, plan.storage
    space = distributions(cfg, plan.bounds)
    trial: Trial | None = None
    run: TrialRun | None = None
    seed = cfg.seed
    try:
        with _signals_held():
            trial = asked = retry(lambda: _ask(study, space), what="start a trial")
            schedule = schedule_of(trial.params, cfg, plan.steps)
            run = TrialRun(schedule, loraplus_ratio_of(trial.params, cfg))
            queued = retry(lambda: TrialRecord.of(asked), what="start a trial")
            seed = queued.seed_or(cfg.seed)
            heartbeat = Heartbeat(storage, storage.trial_id(study, trial.number), trial.number)
        # Started here, not in the held block: an interrupt held there is raised as it ends.
        with heartbeat:
            return _run_and_tell(study, trial, run, runner, seed, worker, device)
    except UpdateFinishedTrialError:
        # Another worker failed this trial as stale (a storage outage longer than the grace
        # period, clocks apart) and queued its retry: this one goes on with the next trial.
        assert trial is not None
        logger.warning("trial %d was failed by another worker as stale", trial.number)
        return storage.backend.get_trial(storage.trial_id(study, trial.number))
    except BaseException as err:
        if trial is not None and run is not None:
            _abandon(study, storage, trial, run, seed, worker, err)
        raise


def _ask(study: optuna.Study, space: dict) -> Trial:
    with warnings.catch_warnings():
        # lrsweep beats for its trials itself (Heartbeat); Optuna's hint that heartbeats
        # belong to Study.optimize does not apply.
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        return study.ask(space)


def _abandon(
    study: optuna.Study,
    storage: StudyStorage,
    trial: Trial,
    run: TrialRun,
    seed: int,
    worker: str,
    err: BaseException,
) -> None:
    """An interrupted trial that is still RUNNING: record it, FAIL it, queue it again."""
    try:
        frozen = storage.backend.get_trial(storage.trial_id(study, trial.number))
        if frozen.state != TrialState.RUNNING:
            return
        _record(trial, run, seed, worker, f"interrupted ({type(err).__name__})")
        fail_trial(study, storage, frozen, "interrupted")
    except Exception as inner:  # noqa: BLE001 - the original error is the one to raise
        logger.warning("could not mark trial %d as interrupted: %s", trial.number, inner)


def _run_and_tell(
    study: optuna.Study,
    trial: Trial,
    run: TrialRun,
    runner: Runner,
    seed: int,
    worker: str,
    device: torch.device,
) -> FrozenTrial:
    """Run one trial and record it; every failure becomes the trial's state and reason."""
    state, value, out_of_memory = TrialState.COMPLETE, None, False
    try:
        run = runner(trial, run.schedule)
        if run.reason is not None:
            state = TrialState.PRUNED
        else:
            value = run.records[-1].eval_loss
    except torch.OutOfMemoryError as err:
        # Still out of memory at a micro-batch of 1 (lrsweep.oom retried the smaller ones).
        state, out_of_memory = TrialState.FAIL, True
        run.reason = f"out of memory: {first_line(err)}"[:500]
    except Exception as err:
        logger.exception("trial %d raised", trial.number)
        state, run.reason = TrialState.FAIL, f"{type(err).__name__}: {err}"[:500]
        # torch.AcceleratorError came with torch 2.8.
        if isinstance(err, (getattr(torch, "AcceleratorError", ()), LrsweepError)):
            # A broken CUDA context or a user error: record the trial, then stop.
            _record(trial, run, seed, worker, run.reason)
            retry(lambda: study.tell(trial, state=TrialState.FAIL), what="record the trial")
            if isinstance(err, LrsweepError):
                raise
            raise StudyError(
                f"CUDA error in trial {trial.number} ({run.reason}); this process "
                "may be unusable: run the sweep again to resume"
            ) from err
    if out_of_memory:
        free_memory(device)  # outside the except block, whose traceback holds the tensors
    _record(trial, run, seed, worker, run.reason)
    # The trial's result survives a database restart: retry until it is recorded.
    return retry(
        lambda: study.tell(
            trial,
            value if state == TrialState.COMPLETE else None,
            state=state,
            skip_if_finished=True,
        ),
        what="record the trial",
    )


def _record(trial: Trial, run: TrialRun, seed: int, worker: str, reason: str | None) -> None:
    run.reason = reason

    def store() -> None:
        record.write(trial, run.record(TrialRecord.of(trial), seed, worker))

    retry(store, what="record the trial")


def summary_line(trial: FrozenTrial) -> str:
    p, r = trial.params, TrialRecord.of(trial)
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    extra = f" (#{r.confirms}, seed {r.seed})" if r.is_confirmation else ""
    family = f" {p['schedule']}" if "schedule" in p else ""
    min_lr = r.min_lr if r.min_lr is not None else math.nan
    return (
        f"trial {trial.number:>3}{extra} {trial.state.name:<8} eval {value:<7}{family} "
        f"peak_lr {p.get('peak_lr', math.nan):.2e} "
        f"warmup {r.warmup_steps if r.warmup_steps is not None else '-'} steps "
        f"min_lr {min_lr:.1e} {r.seconds or 0:.0f}s" + (f"  ({r.reason})" if r.reason else "")
    )
