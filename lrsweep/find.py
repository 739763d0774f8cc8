"""``lrsweep find``: the range test on a fresh LoRA adapter, its suggestion and its files.

Data flow: config -> context (model + data) -> rangetest -> suggest -> results; the plot is
drawn afterwards from the saved files (``lrsweep.report``). ``lrsweep.hf.find_lr`` runs the
same :func:`measure` on a user's Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lrsweep import config as config_mod
from lrsweep.config import RANGETEST_KEYS, RangeTestConfig, StudyConfig
from lrsweep.context import Context, prepare
from lrsweep.horizon import CALIBRATION_STEPS, carry, planned_steps
from lrsweep.rangetest import RangeTestCurve, combine_seeds, run_probes, run_range_test
from lrsweep.results import check_writable, read_find, write_find
from lrsweep.suggest import Suggestion, suggest, suggest_probe, suggest_probe_seeds
from lrsweep.training import Batch, Loop
from lrsweep.version import __version__


if TYPE_CHECKING:
    import pandas as pd

    from lrsweep.data import Examples
    from lrsweep.oom import Attempt


logger = logging.getLogger(__name__)


@dataclass
class FindResult:
    """What ``lrsweep find`` produces: the curve, the suggestion and the config behind them."""

    curve: RangeTestCurve
    suggestion: Suggestion
    config: StudyConfig
    out: Path | None = None
    train_sequences: int = 0  # the training set's size, which turns epochs into steps

    @property
    def recommended_lr(self) -> float | None:
        return self.suggestion.recommended_lr

    def for_run(self) -> dict[str, Any]:
        """The fine-tune the number is for: the planned run, else the sweep's trial, with the
        batch shape and rank both share."""
        cfg = self.config
        planned, train = cfg.planned, cfg.train
        steps, epochs = planned.max_steps, planned.epochs
        source = planned.source or "the study's planned run"
        if not (steps or epochs):
            steps, epochs = (0, cfg.sweep.epochs) if cfg.sweep.epochs else (cfg.sweep.steps, 0.0)
            source = "the study's sweep settings"
        per_step = train.batch_size * train.grad_accum
        return {
            "max_steps": steps,
            "epochs": epochs,
            "steps": planned_steps(steps, epochs, self.train_sequences, per_step),
            "calibrated_steps": CALIBRATION_STEPS,
            "sequences_per_step": per_step,
            "seq_len": train.seq_len,
            "lora_r": cfg.lora.r,
            "source": source,
        }

    def sweep_bounds(self, steps: int | None = None) -> tuple[float, float]:
        """The peak-LR bounds ``lrsweep sweep`` takes from this range test for trials of
        ``steps`` optimizer steps (default: the run it is for;
        :func:`lrsweep.sweep.space.peak_lr_bounds`): ``hf.sweep``'s ``peak_lr``. A
        StudyError when the range test gave no recommendation."""
        from lrsweep.sweep.space import peak_lr_bounds

        steps = self.for_run()["steps"] if steps is None else steps
        highest = max(self.curve.lrs)
        return peak_lr_bounds(self.config, self.suggestion, highest, steps, self.curve.best_drop)

    def carried(self) -> FindResult:
        """This result with its curve's suggestion carried to the run it is for
        (:meth:`for_run`, :func:`lrsweep.horizon.carry`). Always from the curve, so that a
        result carried once and again is carried once."""
        steps = self.for_run()["steps"]
        measured = suggestion_of(self.curve, self.config.rangetest)
        return dataclasses.replace(self, suggestion=carry(measured, steps, self.curve.best_drop))

    def metadata(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "config": self.config.to_dict(),
            "suggestion": self.suggestion.to_dict(),
            "stop_reason": self.curve.stop_reason,
            "seconds_per_step": self.curve.seconds_per_step,
            "start_loss": self.curve.start_loss,
            "optimizer_steps": self.curve.optimizer_steps,
            "train_sequences": self.train_sequences,
        }


def measure(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    config: RangeTestConfig,
    loop: Loop,
    *,
    probe: torch.Tensor | Examples | Sequence[Batch] | None,
    progress: bool = True,
) -> tuple[RangeTestCurve, Suggestion]:
    """The range test of ``config.mode`` on ``model`` and its suggestion; the model and
    optimizer are left exactly as they were. A probe of ``config.seeds`` > 1 repeats on the
    next batches of ``batches`` (the adapter's init stays: it is the caller's)."""
    if config.mode == "probe":
        assert probe is not None, "probe mode scores on held-out batches"
        curve = combine_seeds(
            [
                run_probes(model, optimizer, batches, config, loop, probe=probe, progress=progress)
                for _ in range(config.seeds)
            ]
        )
    else:
        curve = run_range_test(
            model, optimizer, batches, config, loop, probe=probe, progress=progress
        )
    return curve, suggestion_of(curve, config)


def suggestion_of(curve: RangeTestCurve, config: RangeTestConfig) -> Suggestion:
    """The suggestion of a measured range test: its mode's rule on its curve."""
    if config.mode == "ramp":
        return suggest(
            curve.lrs,
            curve.losses,
            diverge_factor=config.diverge_factor,
            smoothing=config.smoothing,
        )
    assert curve.start_loss is not None
    if curve.seed_losses is not None:
        return suggest_probe_seeds(curve.lrs, curve.seed_losses, curve.start_loss)
    return suggest_probe(curve.lrs, curve.losses, curve.start_loss)


def run_find(ctx: Context, progress: bool = True, start: Attempt | None = None) -> FindResult:
    """The range test on a fresh adapter over ``ctx``'s base model; the base is left clean.
    Out of memory, it starts again with half the micro-batch (``lrsweep.oom``), from
    ``start`` when the shape that fits is known (``lrsweep.memory.check_memory``)."""
    from lrsweep.oom import run_with_retry

    def attempt_run(attempt: Attempt) -> tuple[RangeTestCurve, Suggestion]:
        return _measure_once(ctx, attempt, progress)

    measured, _ = run_with_retry(
        attempt_run, ctx.config.train, device=ctx.base.device, start=start
    )
    return FindResult(*measured, ctx.config, train_sequences=len(ctx.blocks.train)).carried()


def _measure_once(
    ctx: Context, attempt: Attempt, progress: bool
) -> tuple[RangeTestCurve, Suggestion]:
    """The range test once, a fresh adapter and batch order for each of the probe's seeds."""
    from lrsweep.data import batches
    from lrsweep.models import attach_lora, detach_lora
    from lrsweep.training import make_optimizer

    cfg = ctx.config
    seeds = cfg.rangetest.seeds if cfg.rangetest.mode == "probe" else 1
    one = dataclasses.replace(cfg.rangetest, seeds=1)
    curves = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        model = attach_lora(ctx.base, cfg.lora, seed)
        try:
            data = attempt.batches(batches(ctx.blocks.train, cfg.train.batch_size, seed))
            optimizer = make_optimizer(model, cfg.train)
            loop = Loop.of(attempt.train, ctx.precision)
            curve, _ = measure(
                model, optimizer, data, one, loop, probe=ctx.blocks.eval, progress=progress
            )
            curves.append(curve)
        finally:
            detach_lora(model)
    curve = combine_seeds(curves)
    return curve, suggestion_of(curve, cfg.rangetest)


def save_find(result: FindResult, out: Path) -> None:
    """rangetest.parquet and suggestion.json in ``out`` (the plot is drawn from them)."""
    suggestion = {**result.suggestion.to_dict(), "for_run": result.for_run()}
    write_find(out, result.curve.frame(), suggestion, result.metadata())
    result.out = out


def save_and_draw(result: FindResult, out: Path) -> None:
    """The files of a range test that a user asked for, and its plot drawn from them."""
    from lrsweep.report import plot_find

    save_find(result, out)
    plot_find(out)


def find_lr(
    study: StudyConfig | str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | Path | None = None,
    progress: bool = True,
) -> FindResult:
    """Run the LR range test described by a study (a config, a TOML path, or the defaults).

    With ``out``, the three result files are written there. Example::

        result = lrsweep.find_lr("studies/tiny.toml", overrides=["rangetest.runs=5"])
        print(result.recommended_lr, result.suggestion.interval)
    """
    cfg = study if isinstance(study, StudyConfig) else config_mod.load(study, overrides)
    if isinstance(study, StudyConfig) and overrides:
        cfg = config_mod.from_dict(config_mod.apply_overrides(cfg.to_dict(), overrides))
    if out is not None:  # before minutes of measuring, not after
        check_writable(Path(out), "out=")
    result = run_find(prepare(cfg), progress=progress)
    if out is not None:
        save_and_draw(result, Path(out))
    return result


def _lists(frame: pd.DataFrame, column: str) -> list[list[float]] | None:
    return frame[column].map(list).tolist() if column in frame else None


def load_find(out: Path, config: StudyConfig | None = None) -> FindResult | None:
    """The range test saved in ``out``, or None when there is none (or, with ``config``,
    when it was made with a different model, data, LoRA, training or range test)."""
    saved = read_find(out)
    if saved is None:
        return None
    frame, meta = saved
    stored = config_mod.from_stored(meta["config"])
    if config is not None and config_mod.differences(stored, config, RANGETEST_KEYS):
        return None
    curve = RangeTestCurve(
        lrs=frame["lr"].tolist(),
        losses=frame["loss"].tolist(),
        smoothed=frame["smoothed_loss"].tolist(),
        train_losses=frame["train_loss"].tolist(),
        tokens=frame["tokens"].tolist(),
        seconds=frame["seconds"].tolist(),
        stop_reason=meta.get("stop_reason"),
        seconds_per_step=meta["seconds_per_step"],
        mode=meta["config"]["rangetest"].get("mode", "ramp"),
        start_loss=meta.get("start_loss"),
        spent_steps=meta.get("optimizer_steps", 0),
        run_losses=_lists(frame, "run_losses"),
        seed_losses=_lists(frame, "seed_losses"),
    )
    suggestion = Suggestion.from_dict(meta["suggestion"])
    return FindResult(curve, suggestion, stored, out, meta.get("train_sequences", 0))
