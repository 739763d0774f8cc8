"""Running a sweep: plan it, run its trials in this process or in N worker processes, and keep
the result files in step with the storage.

A single ``lrsweep sweep`` process rewrites ``trials.parquet`` and ``curves.parquet`` from the
storage after every trial. Worker processes (``lrsweep worker``, ``--workers N``) each write
only their own part files, ``parts/<host>-<pid>/``, so no two processes write one file;
``lrsweep report`` merges the storage (or, without it, the parts) into the two files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

import lrsweep
from lrsweep import config as config_mod
from lrsweep.config import DEFAULT_STUDY, StudyConfig
from lrsweep.context import Context, prepare
from lrsweep.errors import StudyError
from lrsweep.find import FindResult, load_find, run_find
from lrsweep.results import CURVES_FILE, TRIALS_FILE, read_parquet, write_sweep_results
from lrsweep.storage import JOURNAL_FILE, open_storage, redact
from lrsweep.sweep import (
    FINISHED,
    SweepPlan,
    create_study,
    finished_count,
    first_trial,
    load_existing,
    peak_lr_bounds,
    run_worker,
    total_steps,
    worker_name,
)
from lrsweep.trial import free_memory, run_trial


logger = logging.getLogger(__name__)
PARTS_DIR = "parts"


def estimate_seconds(
    trials: int,
    steps: int,
    seconds_per_step: float,
    config: StudyConfig,
) -> float:
    """Upper bound of the sweep's time: every trial runs to the end (pruning only cuts it).
    An evaluation costs about a third of a step per batch (forward only)."""
    evals = math.ceil(steps / config.sweep.eval_every)
    eval_batches = config.data.eval_blocks / (2 * config.train.batch_size)
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
    storage_url: str | None = None

    def estimate(self) -> str:
        done = finished_count(self.plan.study) if self.plan.study else 0
        left = max(0, self.plan.trials - done)
        secs = estimate_seconds(left, self.plan.steps, self.seconds_per_step, self.ctx.config)
        return (
            f"Estimate: {left} trials x {self.plan.steps} steps x "
            f"{self.seconds_per_step:.2f} s/step (+ evals) = {_duration(secs)} at most; "
            f"peak_lr in [{self.plan.bounds[0]:.2e}, {self.plan.bounds[1]:.2e}]"
        )


def _compatible(found: FindResult, config: StudyConfig) -> bool:
    keep = ("seed", "model", "data", "lora", "train", "rangetest")
    return all(found.config.to_dict()[k] == config.to_dict()[k] for k in keep)


def prepare_sweep(
    config: StudyConfig | None,
    out: Path,
    *,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    sweep_section: dict[str, Any] | None = None,
    progress: bool = True,
    dry_run: bool = False,
) -> PreparedSweep:
    """Join the study or plan a new one: load model and data and settle the search bounds,
    running the range test first when ``out`` has none. The study is created only after all
    that worked (and not on a dry run), so a bad input leaves no study behind.

    ``sweep_section`` replaces the ``[sweep]`` settings of the study's stored config (how a
    ``--workers`` parent passes its own run's settings to its workers)."""
    heartbeat = config.sweep.heartbeat_seconds if config else None
    backend = open_storage(out, storage, heartbeat or 10.0)
    study, cfg = load_existing(backend, study_name, config)
    if sweep_section is not None:
        cfg = cfg.replace(sweep=config_mod.from_dict({"sweep": sweep_section}).sweep)
    if storage and cfg.sweep.heartbeat_seconds != heartbeat:
        # A worker learns the heartbeat from the study: reopen with its interval and grace.
        backend = open_storage(out, storage, cfg.sweep.heartbeat_seconds)
        study = optuna.load_study(study_name=study_name, storage=backend) if study else None
    if device is not None:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, device=device))
    ctx = prepare(cfg)
    found = load_find(out)
    if found is not None and not _compatible(found, cfg):
        found = None
    if study is not None:
        bounds = tuple(study.user_attrs["peak_lr_bounds"])
    else:
        if found is None and not cfg.search.peak_lr:
            logger.info("no range test in %s yet: running it for the bounds", out)
            found = run_find(ctx, progress=progress)
            found.save(out)
        bounds = peak_lr_bounds(cfg, found)
    if study is None and not dry_run:
        first = None
        if found is not None and found.recommended_lr is not None:
            first = first_trial(found.recommended_lr, cfg, bounds)  # type: ignore[arg-type]
        study = create_study(backend, study_name, cfg, bounds, first)  # type: ignore[arg-type]
    steps = total_steps(
        cfg.sweep, len(ctx.blocks.train), cfg.train.batch_size * cfg.train.grad_accum
    )
    plan = SweepPlan(
        out,
        study,
        bounds,
        steps,
        trials or cfg.sweep.trials,  # type: ignore[arg-type]
        time.time() + timeout if timeout else None,
    )
    seconds_per_step = found.curve.seconds_per_step if found else _seconds_per_step(study)
    return PreparedSweep(ctx, plan, seconds_per_step, storage)


def _seconds_per_step(study: optuna.Study | None) -> float:
    done = (
        [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.user_attrs.get("curve")]
        if study
        else []
    )
    steps = sum(len(t.user_attrs["curve"]["lr"]) for t in done)
    return sum(t.user_attrs["seconds"] for t in done) / steps if steps else math.nan


def _metadata(study: optuna.Study, config: StudyConfig, storage: str | None) -> dict[str, Any]:
    return {
        "version": lrsweep.__version__,
        "study": study.study_name,
        "storage": redact(storage) if storage else JOURNAL_FILE,
        "config": config.to_dict(),
        "peak_lr_bounds": study.user_attrs.get("peak_lr_bounds"),
    }


def write_results(
    study: optuna.Study,
    out: Path,
    config: StudyConfig,
    storage: str | None = None,
    worker: str | None = None,
) -> None:
    """Rebuild the result files from the storage: all trials into ``out``, or with
    ``worker`` the trials that worker ran into its part folder."""
    trials = study.get_trials(deepcopy=False)
    if worker is not None:
        trials = [t for t in trials if t.user_attrs.get("worker") == worker]
        out = out / PARTS_DIR / worker.replace(":", "-")
    write_sweep_results(trials, out, _metadata(study, config, storage))


def execute(
    prepared: PreparedSweep,
    progress: bool = True,
    part: bool = False,
) -> optuna.Study:
    """Run trials until the budget is met; the result files are rewritten after every trial
    and at exit, also when interrupted. ``part``: write this worker's part files only."""
    ctx, plan = prepared.ctx, prepared.plan
    worker = worker_name() if part else None

    def write(_: object = None) -> None:
        write_results(plan.study, plan.out, ctx.config, prepared.storage_url, worker)

    try:
        run_worker(
            ctx.config,
            plan,
            lambda t, s: run_trial(ctx, t, s, progress),
            write,
            device=ctx.base.device,
            progress=progress,
        )
    finally:
        write()
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


def spawn_workers(
    prepared: PreparedSweep, n: int, devices: list[str], *, timeout: float | None, quiet: bool
) -> int:
    """Run ``n`` ``lrsweep worker`` processes on this machine, one per device (round robin),
    CPU threads split between them; wait for them and merge their results. The storage URL
    reaches them through the environment, never their command line."""
    plan = prepared.plan
    env = dict(os.environ)
    if prepared.storage_url:
        env["LRSWEEP_STORAGE"] = prepared.storage_url
    threads = max(1, (os.cpu_count() or 1) // n)
    sweep_json = json.dumps(prepared.ctx.config.to_dict()["sweep"])
    # The workers load their own copies; this process only waits and merges.
    prepared.ctx.base.model = None  # type: ignore[assignment]
    free_memory(prepared.ctx.base.device)
    procs = []
    for i in range(n):
        cmd = [
            sys.executable,
            "-m",
            "lrsweep",
            "worker",
            "--out",
            str(plan.out),
            "--study",
            plan.study.study_name,
            "--trials",
            str(plan.trials),
            "--threads",
            str(threads),
            "--sweep-json",
            sweep_json,
        ]
        if devices:
            cmd += ["--device", devices[i % len(devices)]]
        if timeout:
            cmd += ["--timeout", f"{timeout:.0f}s"]
        if quiet or i > 0:  # one set of progress bars; several would interleave
            cmd.append("-q")
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt as err:
        # Ctrl-C in a terminal reaches the workers too; a signal sent to this process alone
        # (kill -INT, kill -TERM) is passed on after a moment.
        sig = signal.SIGTERM if getattr(err, "exit_code", 130) == 143 else signal.SIGINT
        for p in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.send_signal(sig)
        for p in procs:
            p.wait()
        raise
    finally:
        write_results(plan.study, plan.out, prepared.ctx.config, prepared.storage_url)
    return max(codes)


def load_results(
    out: Path,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """trials.parquet, curves.parquet and their metadata, rebuilt first when they lag behind
    the storage (the source of truth), or merged from the workers' part files when there is
    no storage to read."""
    if storage is not None or (out / JOURNAL_FILE).exists():
        backend = open_storage(out, storage)
        try:
            study = optuna.load_study(study_name=study_name, storage=backend)
        except KeyError:
            raise StudyError(f"no study named {study_name!r} in the storage") from None
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        current: dict[int, str] = {}
        if (out / TRIALS_FILE).exists():
            frame, _ = read_parquet(out / TRIALS_FILE)
            current = dict(zip(frame["number"], frame["state"], strict=True))
        if current != states or not (out / CURVES_FILE).exists():
            logger.info("results in %s lag the study: rebuilding them", out)
            write_results(study, out, config_mod.from_dict(study.user_attrs["config"]), storage)
    elif (out / PARTS_DIR).is_dir():
        _merge_parts(out)
    if not (out / TRIALS_FILE).exists():
        raise StudyError(
            f"{out}: no sweep here (no {JOURNAL_FILE}, {TRIALS_FILE} or "
            f"{PARTS_DIR}/); run lrsweep sweep --out there, or give --storage"
        )
    trials, meta = read_parquet(out / TRIALS_FILE)
    curves, _ = read_parquet(out / CURVES_FILE)
    return trials, curves, meta


def _merge_parts(out: Path) -> None:
    from lrsweep.results import write_parquet

    for name in (TRIALS_FILE, CURVES_FILE):
        parts = sorted((out / PARTS_DIR).glob(f"*/{name}"))
        if not parts:
            continue
        frames, meta = zip(*(read_parquet(p) for p in parts), strict=True)
        merged = pd.concat(frames, ignore_index=True)
        keys = ["number"] if name == TRIALS_FILE else ["number", "step"]
        merged = merged.drop_duplicates(keys, keep="last").sort_values(keys)
        write_parquet(merged.reset_index(drop=True), out / name, meta[-1])
