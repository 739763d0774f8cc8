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
from lrsweep.config import DEFAULT_STUDY, RANGETEST_KEYS, StudyConfig, SweepConfig
from lrsweep.context import Context, prepare
from lrsweep.durations import format_duration
from lrsweep.errors import StudyError
from lrsweep.find import load_find, run_find, save_find
from lrsweep.memory import check_memory
from lrsweep.record import StudyRecord, TrialRecord
from lrsweep.results import check_writable, results_study
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


@dataclass(frozen=True)
class PreparedSweep:
    """A sweep ready to run (``plan``), or on a dry run without a study yet the plan it
    would make (``plan`` None; its budget, trial length and bounds here)."""

    ctx: Context
    plan: SweepPlan | None
    trials: int
    steps: int
    bounds: tuple[float, float]
    seconds_per_step: float
    ran_find: bool = False  # the range test ran now, for the bounds: its plot is still to draw
    needs_find: bool = False  # a dry run: the range test that a real run would start with
    memory: str | None = None  # on CUDA: the first steps' peak memory against the device's
    fits: Attempt | None = None  # the micro-batch and accumulation that fit on the device

    @property
    def left(self) -> int:
        done = finished_count(self.plan.study) if self.plan else 0
        return max(0, self.trials - done)

    @property
    def confirmations_left(self) -> int:
        return runs_left(self.plan.study if self.plan else None, self.ctx.config, self.left)

    def estimate(self) -> str:
        confirm, cfg = self.confirmations_left, self.ctx.config
        runs = self.left + confirm
        extra = f" + {confirm} confirmation runs" if confirm else ""
        head = f"Estimate: {self.left} trials{extra} x {self.steps} steps"
        if self.needs_find:
            rt = cfg.rangetest
            probe_steps = rt.seeds * rt.runs * (rt.run_steps + rt.cooldown_steps)
            find_steps = probe_steps if rt.mode == "probe" else rt.steps
            return (
                f"{head}, after the range test that sets the bounds ({rt.mode}: "
                f"{find_steps} optimizer steps, the time of {find_steps / self.steps:.1f} "
                "trials; a dry run does not run it: lrsweep find --out OUT first to plan from it)"
            )
        bounds = f"peak_lr in [{self.bounds[0]:.2e}, {self.bounds[1]:.2e}]"
        secs = estimate_seconds(runs, self.steps, self.seconds_per_step, cfg)
        if not math.isfinite(secs):  # fixed bounds and no trial yet: no step was timed
            return f"{head} (time per step not measured yet); {bounds}"
        return (
            f"{head} x {self.seconds_per_step:.2f} s/step (+ evals) = {format_duration(secs)} "
            f"at most; {bounds}"
        )


def _wait_for_journal(path: Path | None, wait: float) -> float:
    """A worker started together with its sweep may find the journal not written yet: wait
    for it, saying so once; the seconds of ``wait`` left."""
    deadline = time.time() + wait
    if path is not None and not path.exists() and wait > 0:
        logger.warning("waiting for the study's journal %s to appear", path)
    while path is not None and not path.exists() and time.time() < deadline:
        time.sleep(1.0)
    return max(0.0, deadline - time.time())


def open_study(
    config: StudyConfig | None, out: Path, url: str | None, name: str, wait: float = 0.0
) -> tuple[StudyStorage | None, optuna.Study | None, StudyConfig]:
    """The storage (None while a new study's journal is not written), the study (None
    when it is still to be created) and the config."""
    heartbeat = (config.sweep if config else SweepConfig()).heartbeat_seconds
    journal = journal_path(out, url)
    if config is None:
        wait = _wait_for_journal(journal, wait)
    elif journal is not None and not journal.exists():
        _one_study_per_folder(out, name, None, url)
        return None, None, config  # a new study: its journal is written once it is created
    storage = open_storage(out, url, heartbeat, create=False)
    _one_study_per_folder(out, name, storage, url)
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
        storage, study, stored = open_study(None, out, url, name, 0.0)
    except StudyError:
        return open_study(config_mod.load(None, overrides), out, url, name, 0.0)
    raw = config_mod.apply_overrides(stored.to_dict(), overrides)
    assert study is not None
    return storage, study, check_joinable(study, config_mod.from_dict(raw))


def stored_config(out: Path, url: str | None, name: str) -> StudyConfig | None:
    """The config stored in the study ``name``, or None when there is no such study yet."""
    journal = journal_path(out, url)
    if journal is not None and not journal.exists():
        return None
    backend = open_storage(out, url, create=False)
    try:
        study = optuna.load_study(study_name=name, storage=backend.backend)
    except KeyError:
        return None
    stored = StudyRecord.of(study).config
    return config_mod.from_stored(stored) if stored is not None else None


def settle(
    backend: StudyStorage | None,
    study: optuna.Study | None,
    cfg: StudyConfig,
    out: Path,
    *,
    url: str | None,
    name: str,
    bounds: tuple[float, float],
    first: dict[str, Any] | None,
    steps: int,
    trials: int | None,
    deadline: float | None = None,
    dry_run: bool = False,
) -> tuple[SweepPlan, StudyConfig]:
    """The plan of a study: created now when it is new (its config, bounds, budget and
    first trials stored in it), with the budget of ``trials`` when given (stored, except on
    a dry run, which only plans an existing study). The one planning step ``lrsweep
    sweep``, ``lrsweep worker`` and ``hf.sweep`` share."""
    if study is None:
        backend = backend or open_storage(out, url, cfg.sweep.heartbeat_seconds)
        study, cfg = create_study(backend, name, cfg, bounds, first, trials or cfg.sweep.trials)
    assert backend is not None
    stored = StudyRecord.of(study).peak_lr_bounds or bounds
    goal = budget(study, trials, cfg, store=not dry_run)
    return SweepPlan(out, study, backend, stored, steps, goal, deadline), cfg


def _one_study_per_folder(
    out: Path, name: str, backend: StudyStorage | None, url: str | None
) -> None:
    """Refuse a second study in an output folder, before anything runs: its result files,
    curves and adapters are numbered by trial, and two studies' trial numbers overlap. The
    studies of a storage given with --storage (a database, a shared journal) have their
    own folders; those of the folder's own journal share this one."""
    others = {s for s in [results_study(out)] if s is not None and s != name}
    if backend is not None and url is None:
        others |= set(optuna.get_all_study_names(backend.backend)) - {name}
    if others:
        raise StudyError(
            f"{out} holds study {min(others)!r}: give study {name!r} its own output folder "
            "(--out; out= in Python): result files and adapters there are numbered by trial"
        )


def prepare_sweep(
    config: StudyConfig | None,
    out: Path,
    *,
    overrides: tuple[str, ...] = (),
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    trials: int | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
    device: str | None = None,
    sweep_section: dict[str, Any] | None = None,
    progress: bool = True,
    dry_run: bool = False,
    wait: float = 0.0,
) -> PreparedSweep:
    """Join the study or plan a new one, ready to run. With ``config`` None (a worker) the
    study's stored config is used, with ``overrides`` applied, waiting up to ``wait``
    seconds for the study to appear. No trial starts after ``deadline`` (epoch seconds),
    or ``timeout`` seconds from now.

    ``sweep_section`` replaces the ``[sweep]`` settings of the study's stored config (how a
    ``--workers`` parent passes its own run's settings to its workers). A dry run creates
    no study and runs no range test: it plans from a saved one, or says what one costs."""
    if config is None and overrides:
        backend, study, cfg = _open_with_overrides(overrides, out, storage, study_name)
    else:
        backend, study, cfg = open_study(config, out, storage, study_name, wait)
    if sweep_section is not None:
        cfg = cfg.replace(sweep=config_mod.from_dict({"sweep": sweep_section}).sweep)
    if device is not None:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, device=device))
    check_trackers(cfg.sweep.report_to)
    ctx = prepare(cfg)
    memory, fits = check_memory(ctx)
    found = load_find(out, cfg)
    ran_find = False
    needs_find = study is None and found is None and not cfg.search.peak_lr
    if needs_find:
        _keep_other_find(out, cfg)
    if needs_find and not dry_run:
        logger.info("no range test in %s yet: running it for the bounds", out)
        found, ran_find = run_find(ctx, progress=progress, start=fits), True
        save_find(found, out)
    steps = total_steps(
        cfg.sweep, len(ctx.blocks.train), cfg.train.batch_size * cfg.train.grad_accum
    )
    if study is not None:
        bounds = StudyRecord.of(study).peak_lr_bounds or (math.nan, math.nan)
    elif needs_find and dry_run:
        bounds = (math.nan, math.nan)  # the range test that would set them has not run
    elif found is None:
        bounds = peak_lr_bounds(cfg, None)  # search.peak_lr, else a StudyError
    else:
        # For this sweep's trials, whatever run the saved range test was carried to.
        highest, drop = max(found.curve.lrs), found.curve.best_drop
        bounds = peak_lr_bounds(cfg, found.suggestion, highest, steps, drop)
    if deadline is None and timeout:
        deadline = time.time() + timeout
    plan: SweepPlan | None = None
    if study is not None or not dry_run:
        first = None
        if found is not None and found.recommended_lr is not None:
            first = first_trial(found.recommended_lr, cfg, bounds)
        plan, cfg = settle(
            backend,
            study,
            cfg,
            out,
            url=storage,
            name=study_name,
            bounds=bounds,
            first=first,
            steps=steps,
            trials=trials,
            deadline=deadline,
            dry_run=dry_run,
        )
    goal = plan.trials if plan else trials or cfg.sweep.trials
    seconds_per_step = found.curve.seconds_per_step if found else _seconds_per_step(study)
    return PreparedSweep(
        ctx, plan, goal, steps, bounds, seconds_per_step, ran_find, needs_find, memory, fits
    )


def _keep_other_find(out: Path, cfg: StudyConfig) -> None:
    """Refuse to replace a saved range test made with other settings by this sweep's own."""
    other = load_find(out)
    if other is not None:
        keys = ", ".join(config_mod.differences(other.config, cfg, RANGETEST_KEYS))
        raise StudyError(
            f"{out} holds a range test made with another {keys}: sweep with its settings, "
            "give this sweep its own --out, or run `lrsweep find` with these settings there first"
        )


def _seconds_per_step(study: optuna.Study | None) -> float:
    finished = study.get_trials(deepcopy=False, states=FINISHED) if study else []
    done = [r for r in map(TrialRecord.of, finished) if r.curve is not None]
    steps = sum(len(r.curve.lr) for r in done if r.curve is not None)
    return sum(r.seconds or 0.0 for r in done) / steps if steps else math.nan


def execute(prepared: PreparedSweep, progress: bool = True, part: bool = False) -> optuna.Study:
    """Run trials in this process until the budget is met; the result files are rewritten
    after every trial and at exit, also when interrupted. ``part``: this process is one of
    several workers and writes its own part files only."""
    ctx, plan = prepared.ctx, prepared.plan
    if plan is None:
        raise StudyError("a dry run has no study to run")
    plan = dataclasses.replace(plan, part=part)
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
    """Run (or resume) the sweep in ``out`` from Python; returns the Optuna study.
    ``overrides`` apply to whatever ``study`` is: a path, a config, or None (the study's
    stored config; for a new study, the defaults when ``overrides`` are given, else a
    StudyError, as ``lrsweep sweep`` without a study file)."""
    check_writable(Path(out), "out=")
    if isinstance(study, StudyConfig):
        raw = config_mod.apply_overrides(study.to_dict(), overrides)
        cfg: StudyConfig | None = config_mod.from_dict(raw)
    elif study is None:
        cfg = None
    else:
        cfg = config_mod.load(study, overrides)
    prepared = prepare_sweep(
        cfg,
        Path(out),
        overrides=tuple(overrides) if cfg is None else (),
        storage=storage,
        trials=trials,
        timeout=timeout,
        progress=progress,
    )
    return execute(prepared, progress=progress)
