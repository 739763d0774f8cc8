"""``lrsweep find``: the range test on a fresh LoRA adapter, its suggestion and its files.

Data flow: config -> context (model + data) -> rangetest -> suggest -> results -> report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lrsweep
from lrsweep import config as config_mod
from lrsweep.config import StudyConfig
from lrsweep.context import Context, prepare
from lrsweep.data import batches
from lrsweep.models import attach_lora, detach_lora
from lrsweep.rangetest import RangeTestCurve, run_probes, run_range_test
from lrsweep.results import read_parquet, write_json, write_parquet
from lrsweep.suggest import Suggestion, suggest, suggest_probe
from lrsweep.training import make_optimizer


logger = logging.getLogger(__name__)

RANGETEST_FILE = "rangetest.parquet"
SUGGESTION_FILE = "suggestion.json"
PLOT_FILE = "rangetest.png"


@dataclass
class FindResult:
    """What ``lrsweep find`` produces: the curve, the suggestion and the config behind them."""

    curve: RangeTestCurve
    suggestion: Suggestion
    config: StudyConfig
    out: Path | None = None

    @property
    def recommended_lr(self) -> float | None:
        return self.suggestion.recommended_lr

    def metadata(self) -> dict[str, Any]:
        return {
            "version": lrsweep.__version__,
            "config": self.config.to_dict(),
            "suggestion": self.suggestion.to_dict(),
            "stop_reason": self.curve.stop_reason,
            "seconds_per_step": self.curve.seconds_per_step,
            "start_loss": self.curve.start_loss,
            "optimizer_steps": self.curve.optimizer_steps,
        }

    def save(self, out: Path) -> None:
        """Write rangetest.parquet, suggestion.json and rangetest.png into ``out``."""
        from lrsweep.report import plot_rangetest

        out.mkdir(parents=True, exist_ok=True)
        write_parquet(self.curve.frame(), out / RANGETEST_FILE, self.metadata())
        write_json(self.suggestion.to_dict(), out / SUGGESTION_FILE)
        ylabel = {
            "probe": "held-out loss at the end of each fixed-LR run",
            "eval": "held-out loss after each step",
            "train": "training loss",
        }["probe" if self.curve.mode == "probe" else self.config.rangetest.signal]
        plot_rangetest(
            self.curve.frame(), self.suggestion, out / PLOT_FILE, ylabel, self.curve.start_loss
        )
        self.out = out


def suggestion_of(curve: RangeTestCurve, config: StudyConfig) -> Suggestion:
    if curve.mode == "probe":
        assert curve.start_loss is not None
        return suggest_probe(curve.lrs, curve.losses, curve.start_loss)
    return suggest(curve.lrs, curve.losses, diverge_factor=config.rangetest.diverge_factor)


def run_find(ctx: Context, progress: bool = True) -> FindResult:
    """The range test on a fresh adapter over ``ctx``'s base model; the base is left clean."""
    cfg = ctx.config
    model = attach_lora(ctx.base, cfg.lora, cfg.seed)
    try:
        optimizer = make_optimizer(model, cfg.train)
        common: dict[str, Any] = {
            "grad_accum": cfg.train.grad_accum,
            "max_grad_norm": cfg.train.max_grad_norm,
            "precision": ctx.precision,
            "eval_batch_size": 2 * cfg.train.batch_size,
            "progress": progress,
        }
        data = batches(ctx.blocks.train, cfg.train.batch_size, cfg.seed)
        run = run_probes if cfg.rangetest.mode == "probe" else run_range_test
        curve = run(model, optimizer, data, cfg.rangetest, probe=ctx.blocks.eval, **common)
    finally:
        detach_lora(model)
    return FindResult(curve, suggestion_of(curve, cfg), cfg)


def find_lr(
    study: StudyConfig | str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    out: str | Path | None = None,
    progress: bool = True,
) -> FindResult:
    """Run the LR range test described by a study (a config, a TOML path, or the defaults).

    With ``out``, the three result files are written there. Example::

        result = lrsweep.find_lr("studies/tiny.toml", overrides=["rangetest.steps=40"])
        print(result.recommended_lr, result.suggestion.interval)
    """
    cfg = study if isinstance(study, StudyConfig) else config_mod.load(study, overrides)
    if isinstance(study, StudyConfig) and overrides:
        cfg = config_mod.from_dict(config_mod.apply_overrides(cfg.to_dict(), overrides))
    result = run_find(prepare(cfg), progress=progress)
    if out is not None:
        result.save(Path(out))
    return result


def load_find(out: Path) -> FindResult | None:
    """The range test saved in ``out``, or None when there is none."""
    path = out / RANGETEST_FILE
    if not path.exists():
        return None
    frame, meta = read_parquet(path)
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
        run_losses=frame["run_losses"].map(list).tolist() if "run_losses" in frame else None,
    )
    return FindResult(
        curve, Suggestion.from_dict(meta["suggestion"]), config_mod.from_dict(meta["config"]), out
    )
