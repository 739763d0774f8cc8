"""``lrsweep sweep``: an Optuna study over peak LR, warmup fraction and min_lr.

Each trial attaches a fresh LoRA adapter to the base model loaded once per process, trains it
with transformers' cosine-with-min-LR schedule, reports eval losses to the pruner, and detaches
the adapter again. Trials run in-process: loading the base model once is what keeps a trial
cheap. An out-of-memory error fails the trial and the study goes on; any other CUDA error can
leave the process unusable, so the worker stops (the study resumes in a new process).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm.auto import tqdm

import lrsweep
from lrsweep import config as config_mod
from lrsweep.config import StudyConfig, SweepConfig
from lrsweep.errors import LrsweepError, StudyError
from lrsweep.find import FindResult
from lrsweep.schedules import CosineSchedule
from lrsweep.storage import (
    Heartbeat,
    fail_trial,
    grace_seconds,
    reap_stale_trials,
    retry,
)
from lrsweep.trial import TrialRun, free_memory


logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# FAIL trials do not count against the budget: a cause that fails every trial (a batch
# that never fits, a data bug) would otherwise loop until the time limit.
MAX_FAILS_IN_A_ROW = 5
# Sections that must match between a study and a worker that joins it (sweep.trials and
# the sampler may differ between runs).
_PINNED = ("seed", "model", "data", "lora", "train", "search")


# ---------------------------------------------------------------- search space (pure)


def peak_lr_bounds(config: StudyConfig, found: FindResult | None) -> tuple[float, float]:
    """The log-uniform bounds of the peak LR: the study file's, or from the range test:
    a tenth of the recommendation up to the divergence LR (or the highest LR tested)."""
    if config.search.peak_lr:
        low, high = config.search.peak_lr
        return low, high
    if found is None or found.suggestion.recommended_lr is None:
        reason = found.suggestion.reason if found else "no range test"
        raise StudyError(
            f"search.peak_lr: the range test gave no recommendation ({reason}); "
            "set search.peak_lr = [low, high] in the study file"
        )
    low = found.suggestion.recommended_lr / 10
    high = found.suggestion.divergence_lr or max(found.curve.lrs)
    return low, max(high, low * 10)


def distributions(config: StudyConfig, bounds: tuple[float, float]) -> dict[str, BaseDistribution]:
    space: dict[str, BaseDistribution] = {
        "peak_lr": FloatDistribution(*bounds, log=True),
        "warmup_fraction": FloatDistribution(*config.search.warmup_fraction),
    }
    if config.search.min_lr == 0:
        space["min_lr_ratio"] = FloatDistribution(*config.search.min_lr_ratio)
    return space


def total_steps(sweep: SweepConfig, train_blocks: int, blocks_per_step: int) -> int:
    if sweep.epochs > 0:
        return max(1, math.ceil(sweep.epochs * train_blocks / blocks_per_step))
    return sweep.steps


def schedule_of(params: dict[str, Any], config: StudyConfig, steps: int) -> CosineSchedule:
    peak = params["peak_lr"]
    ratio = params.get("min_lr_ratio", min(1.0, config.search.min_lr / peak))
    return CosineSchedule(peak, steps, params["warmup_fraction"], ratio)


def first_trial(
    recommended_lr: float, config: StudyConfig, bounds: tuple[float, float]
) -> dict[str, float]:
    """The range test's recommendation with common schedule defaults, clipped to the space."""

    def clip(value: float, low: float, high: float) -> float:
        return min(max(value, low), high)

    params = {
        "peak_lr": clip(recommended_lr, *bounds),
        "warmup_fraction": clip(0.05, *config.search.warmup_fraction),
    }
    if config.search.min_lr == 0:
        params["min_lr_ratio"] = clip(0.1, *config.search.min_lr_ratio)
    return params


def worker_seed(seed: int, worker: str, trials_so_far: int) -> int:
    """A sampler seed of its own for every worker and every (re)start, so that a resumed or
    parallel study does not repeat the same startup parameters."""
    return zlib.crc32(f"{seed}/{worker}/{trials_so_far}".encode())


# ---------------------------------------------------------------- study


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


def pinned(config: StudyConfig) -> dict[str, Any]:
    """The part of a config that every run of a study must share (the device may differ)."""
    raw = config.to_dict()
    raw["train"].pop("device")
    return {k: raw[k] for k in _PINNED}


def load_existing(
    storage: optuna.storages.BaseStorage,
    name: str,
    config: StudyConfig | None,
) -> tuple[optuna.Study | None, StudyConfig]:
    """Join the study ``name`` if it exists, checking that ``config`` agrees with the one
    stored in it; with ``config`` None the stored one is used. Returns (None, config) when
    there is no such study yet."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        if config is None:
            raise StudyError(f"no study named {name!r} yet; give a study file") from None
        return None, config
    version = study.user_attrs.get("lrsweep_version")
    if version is None:
        raise StudyError(
            f"study {name!r} is incomplete (its creation was interrupted); "
            "remove its storage or use a new --out"
        )
    if version != lrsweep.__version__:
        raise StudyError(
            f"study {name!r} was made by lrsweep {version}, this is "
            f"{lrsweep.__version__}; use the same version on every worker"
        )
    stored = config_mod.from_dict(study.user_attrs["config"])
    if config is None:
        return study, stored
    diff = [k for k in _PINNED if pinned(config)[k] != pinned(stored)[k]]
    if diff:
        raise StudyError(
            f"study {name!r} was made with a different [{', '.join(diff)}]; "
            "use a new --out for a new study, or leave out the study file to "
            "resume with the stored config"
        )
    return study, stored.replace(
        sweep=config.sweep,
        rangetest=config.rangetest,
        train=dataclasses.replace(stored.train, device=config.train.device),
    )


def create_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    config: StudyConfig,
    bounds: tuple[float, float],
    first: dict[str, float] | None,
) -> optuna.Study:
    """Create the study with its config and bounds stored in it, the range test's
    recommendation queued as its first trial. A worker that loses the race to create it
    joins the winner's study instead."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage)
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("peak_lr_bounds", list(bounds))
    if first is not None:
        study.enqueue_trial(first, user_attrs={"origin": "range test recommendation"})
    # Written last: a study is complete once it has a version (see load_existing).
    study.set_user_attr("lrsweep_version", lrsweep.__version__)
    return study


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# ---------------------------------------------------------------- the worker loop


@dataclass
class SweepPlan:
    """What a worker needs besides the context: bounds, steps, budget, where to write."""

    out: Path
    study: optuna.Study
    bounds: tuple[float, float]
    steps: int
    trials: int
    deadline: float | None = None  # time.time() after which no new trial starts


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


Runner = Callable[[Trial, CosineSchedule], TrialRun]


def run_worker(
    cfg: StudyConfig,
    plan: SweepPlan,
    runner: Runner,
    on_finished: Callable[[FrozenTrial], None],
    *,
    device: torch.device,
    progress: bool = True,
) -> int:
    """Ask, run and tell trials until the study holds ``plan.trials`` finished trials or the
    deadline passes. ``runner`` trains one trial (lrsweep's own loop, or a user's Trainer).
    Returns the number of trials this worker finished."""
    study = plan.study
    worker = worker_name()
    grace = grace_seconds(cfg.sweep.heartbeat_seconds)
    study.sampler = make_sampler(
        cfg.sweep.sampler, worker_seed(cfg.seed, worker, len(study.trials))
    )
    study.pruner = make_pruner(cfg.sweep, plan.steps)
    space = distributions(cfg, plan.bounds)
    done = failed_in_a_row = 0
    bar = tqdm(
        total=plan.trials,
        initial=finished_count(study),
        desc="trials",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        while retry(lambda: finished_count(study), what="count trials") < plan.trials:
            if plan.deadline is not None and time.time() >= plan.deadline:
                logger.warning("time limit reached; no new trial starts")
                break
            retry(lambda: reap_stale_trials(study, grace), what="reap stale trials")
            trial = retry(lambda: study.ask(space), what="start a trial")
            schedule = schedule_of(trial.params, cfg, plan.steps)
            with Heartbeat(
                study._storage, trial._trial_id, trial.number, cfg.sweep.heartbeat_seconds
            ):
                frozen = _run_and_tell(study, trial, schedule, runner, cfg.seed, worker, device)
            on_finished(frozen)
            tqdm.write(summary_line(frozen))
            if frozen.state in FINISHED:
                done += 1
                failed_in_a_row = 0
            else:
                failed_in_a_row += 1
                if failed_in_a_row >= MAX_FAILS_IN_A_ROW:
                    raise StudyError(
                        f"{failed_in_a_row} trials in a row failed (last: "
                        f"{frozen.user_attrs.get('reason')}); fix the cause and run again"
                    )
            bar.n = retry(lambda: finished_count(study), what="count trials")
            bar.refresh()
    finally:
        bar.close()
    return done


def _run_and_tell(
    study: optuna.Study,
    trial: Trial,
    schedule: CosineSchedule,
    runner: Runner,
    seed: int,
    worker: str,
    device: torch.device,
) -> FrozenTrial:
    """Run one trial and record it; every failure becomes the trial's state and reason."""
    run = TrialRun(schedule)
    state, value, out_of_memory = TrialState.COMPLETE, None, False
    try:
        run = runner(trial, schedule)
        if run.reason is not None:
            state = TrialState.PRUNED
        else:
            value = run.records[-1].eval_loss
    except torch.OutOfMemoryError:
        state, run.reason, out_of_memory = TrialState.FAIL, "out of memory", True
    except (KeyboardInterrupt, SystemExit) as err:
        _record(trial, run, seed, worker, f"interrupted ({type(err).__name__})")
        fail_trial(study, study._storage.get_trial(trial._trial_id), "interrupted")
        raise
    except Exception as err:
        logger.exception("trial %d raised", trial.number)
        state, run.reason = TrialState.FAIL, f"{type(err).__name__}: {err}"[:500]
        if isinstance(err, (torch.AcceleratorError, LrsweepError)):
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
    for key, value in run.attrs(seed, worker).items():
        retry(lambda: trial.set_user_attr(key, value), what="record the trial")  # noqa: B023


def summary_line(trial: FrozenTrial) -> str:
    p = trial.params
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    reason = trial.user_attrs.get("reason")
    return (
        f"trial {trial.number:>3} {trial.state.name:<8} eval {value:<7} "
        f"peak_lr {p.get('peak_lr', float('nan')):.2e} "
        f"warmup {trial.user_attrs.get('warmup_steps', '-')} steps "
        f"min_lr {trial.user_attrs.get('min_lr', float('nan')):.1e} "
        f"{trial.user_attrs.get('seconds', 0):.0f}s" + (f"  ({reason})" if reason else "")
    )
