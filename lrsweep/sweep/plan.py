"""Planning a sweep: join its study or settle a new one's bounds (running the range test
first when the output folder has none), estimate its time, and run it in this process.

The study is created only after the model, the data and the bounds worked out (and never on
a dry run), so a bad input leaves no study behind.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from lrsweep import config as config_mod
from lrsweep.config import DEFAULT_STUDY, StudyConfig, SweepConfig
from lrsweep.context import Context, prepare
from lrsweep.devices import check_memory
from lrsweep.errors import StudyError
from lrsweep.find import FindResult, load_find, run_find, save_find
from lrsweep.sweep.adapters import AdapterKeeper
from lrsweep.sweep.confirm import runs_left
from lrsweep.sweep.space import first_trial, peak_lr_bounds, total_steps
from lrsweep.sweep.storage import StudyStorage, journal_path, open_storage
from lrsweep.sweep.study import (
    FINISHED,
    budget,
    check_joinable,
    create_study,
    finished_count,
    join_study,
)
from lrsweep.sweep.trial import TrialRun, TrialWatcher, run_trial
from lrsweep.sweep.worker import SweepPlan, run_worker
from lrsweep.tracking import check_trackers, make_trackers


if TYPE_CHECKING:
    from optuna.trial import Trial

    from lrsweep.oom import Attempt
    from lrsweep.schedules import Schedule

logger = logging.getLogger(__name__)


def estimate_seconds(
    trials: int, steps: int, seconds_per_step: float, config: StudyConfig
) -> float:
    """Upper bound of the sweep's time: every trial runs to the end (pruning only cuts it).
    An evaluation costs about a third of a step per batch (forward only)."""
    evals = math.ceil(steps / config.sweep.eval_every)
    eval_batches = config.data.eval_blocks / config.train.eval_batch_size
    per_eval = seconds_per_step * eval_batches / (3 * config.train.grad_accum)
    return trials * (steps * seconds_per_step + evals * per_eval)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@dataclass
class PreparedSweep:
    ctx: Context
    plan: SweepPlan
    seconds_per_step: float
    ran_find: bool = False  # the range test ran now, for the bounds: its plot is still to draw
    memory: str | None = None  # on CUDA: the first steps' peak memory against the device's
    fits: Attempt | None = None  # the micro-batch and accumulation that fit on the device

    @property
    def left(self) -> int:
        done = finished_count(self.plan.study) if self.plan.study else 0
        return max(0, self.plan.trials - done)

    @property
    def confirmations_left(self) -> int:
        return runs_left(self.plan.study, self.ctx.config, self.left)

    def estimate(self) -> str:
        plan, confirm = self.plan, self.confirmations_left
        runs = self.left + confirm
        secs = estimate_seconds(runs, plan.steps, self.seconds_per_step, self.ctx.config)
        extra = f" + {confirm} confirmation runs" if confirm else ""
        bounds = f"peak_lr in [{plan.bounds[0]:.2e}, {plan.bounds[1]:.2e}]"
        head = f"Estimate: {self.left} trials{extra} x {plan.steps} steps"
        if not math.isfinite(secs):  # fixed bounds and no trial yet: no step was timed
            return f"{head} (time per step not measured yet); {bounds}"
        return (
            f"{head} x {self.seconds_per_step:.2f} s/step (+ evals) = {_duration(secs)} "
            f"at most; {bounds}"
        )


def _wait_for_journal(path: Path | None, wait: float) -> None:
    """A worker started together with its sweep may find the journal not written yet."""
    deadline = time.time() + wait
    while path is not None and not path.exists() and time.time() < deadline:
        time.sleep(1.0)


def _open(
    config: StudyConfig | None, out: Path, url: str | None, name: str, wait: float
) -> tuple[StudyStorage | None, optuna.Study | None, StudyConfig]:
    """The storage (None while a new study's journal is not written), the study (None
    when it is still to be created) and the config."""
    heartbeat = (config.sweep if config else SweepConfig()).heartbeat_seconds
    journal = journal_path(out, url)
    if config is None:
        _wait_for_journal(journal, wait)
    elif journal is not None and not journal.exists():
        return None, None, config  # a new study: its journal is written once it is created
    storage = open_storage(out, url, heartbeat, create=False)
    study, cfg = join_study(storage, name, config, wait=wait)
    assert cfg is not None
    if cfg.sweep.heartbeat_seconds != heartbeat:
        # A worker learns the heartbeat from the study: its interval and grace period.
        storage = storage.beating(cfg.sweep.heartbeat_seconds)
        study = optuna.load_study(study_name=name, storage=storage.backend) if study else None
    return storage, study, cfg


def _open_with_overrides(
    overrides: tuple[str, ...], out: Path, url: str | None, name: str
) -> tuple[StudyStorage | None, optuna.Study | None, StudyConfig]:
    """No study file, only ``--set``: the overrides apply to the stored config when the
    study exists (and must keep it joinable), else to the defaults for a new study."""
    try:
        storage, study, stored = _open(None, out, url, name, 0.0)
    except StudyError:
        return _open(config_mod.load(None, overrides), out, url, name, 0.0)
    raw = config_mod.apply_overrides(stored.to_dict(), overrides)
    assert study is not None
    return storage, study, check_joinable(study, config_mod.from_dict(raw))


def prepare_sweep(
    config: StudyConfig | None,
    out: Path,
    *,
    overrides: tuple[str, ...] = (),
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    sweep_section: dict[str, Any] | None = None,
    progress: bool = True,
    dry_run: bool = False,
    wait: float = 0.0,
) -> PreparedSweep:
    """Join the study or plan a new one, ready to run. With ``config`` None (a worker) the
    study's stored config is used, with ``overrides`` applied, waiting up to ``wait``
    seconds for the study to appear.

    ``sweep_section`` replaces the ``[sweep]`` settings of the study's stored config (how a
    ``--workers`` parent passes its own run's settings to its workers)."""
    if config is None and overrides:
        backend, study, cfg = _open_with_overrides(overrides, out, storage, study_name)
    else:
        backend, study, cfg = _open(config, out, storage, study_name, wait)
    if sweep_section is not None:
        cfg = cfg.replace(sweep=config_mod.from_dict({"sweep": sweep_section}).sweep)
    if device is not None:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, device=device))
    check_trackers(cfg.sweep.report_to)
    ctx = prepare(cfg)
    memory, fits = check_memory(ctx)
    found = load_find(out, cfg)
    ran_find = False
    if study is not None:
        bounds: tuple[float, float] = tuple(study.user_attrs["peak_lr_bounds"])  # type: ignore[assignment]
    else:
        if found is None and not cfg.search.peak_lr:
            logger.info("no range test in %s yet: running it for the bounds", out)
            found, ran_find = run_find(ctx, progress=progress, start=fits), True
            save_find(found, out)
        bounds = peak_lr_bounds(cfg, found and found.suggestion, _highest(found))
    steps = total_steps(
        cfg.sweep, len(ctx.blocks.train), cfg.train.batch_size * cfg.train.grad_accum
    )
    if study is None and not dry_run:
        first = None
        if found is not None and found.recommended_lr is not None:
            first = first_trial(found.recommended_lr, cfg, bounds)
        backend = backend or open_storage(out, storage, cfg.sweep.heartbeat_seconds)
        study, cfg = create_study(
            backend, study_name, cfg, bounds, first, trials or cfg.sweep.trials
        )
    goal = budget(study, trials, cfg) if study is not None else trials or cfg.sweep.trials
    deadline = time.time() + timeout if timeout else None
    plan = SweepPlan(out, study, backend, bounds, steps, goal, deadline)  # type: ignore[arg-type]
    seconds_per_step = found.curve.seconds_per_step if found else _seconds_per_step(study)
    return PreparedSweep(ctx, plan, seconds_per_step, ran_find, memory, fits)


def _highest(found: FindResult | None) -> float:
    return max(found.curve.lrs) if found else math.inf


def _seconds_per_step(study: optuna.Study | None) -> float:
    done = (
        [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.user_attrs.get("curve")]
        if study
        else []
    )
    steps = sum(len(t.user_attrs["curve"]["lr"]) for t in done)
    return sum(t.user_attrs["seconds"] for t in done) / steps if steps else math.nan


def execute(prepared: PreparedSweep, progress: bool = True, part: bool = False) -> optuna.Study:
    """Run trials in this process until the budget is met; the result files are rewritten
    after every trial and at exit, also when interrupted. ``part``: this process is one of
    several workers and writes its own part files only."""
    ctx, plan = prepared.ctx, prepared.plan
    plan.part = part
    cfg, shape = ctx.config, prepared.fits
    watchers: list[TrialWatcher] = make_trackers(
        cfg.sweep.report_to, plan.out, plan.study.study_name, cfg.sweep.project
    )
    if cfg.sweep.save_adapters != "none":
        watchers.append(AdapterKeeper(plan.out, cfg, ctx.base.tokenizer))

    def runner(trial: Trial, schedule: Schedule) -> TrialRun:
        # Each trial starts at the shape the last one ended with: no need to run out of
        # memory again at sizes known not to fit.
        nonlocal shape
        run = run_trial(ctx, trial, schedule, progress, watchers, start=shape)
        shape = run.shape
        return run

    run_worker(cfg, plan, runner, device=ctx.base.device, progress=progress)
    return plan.study


def run_sweep(
    study: StudyConfig | str | Path | None,
    out: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    progress: bool = True,
) -> optuna.Study:
    """Run (or resume) the sweep in ``out`` from Python; returns the Optuna study."""
    cfg = (
        study
        if isinstance(study, StudyConfig) or study is None
        else config_mod.load(study, overrides)
    )
    prepared = prepare_sweep(
        cfg, Path(out), storage=storage, trials=trials, timeout=timeout, progress=progress
    )
    return execute(prepared, progress=progress)
