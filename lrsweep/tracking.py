"""Live tracking of every trial: ``sweep.report_to = ["tensorboard", "mlflow", "wandb"]``.

Each tracker is a trial watcher (see ``lrsweep.sweep.trial.TrialWatcher``) that logs a trial's
parameters when it starts and its training loss, LR and eval loss at every step while it
runs, through the tracker's own library: TensorBoard's ``SummaryWriter`` (event files in
``OUT/tensorboard/trial-<n>``), ``mlflow`` (one run per trial, in the tracking URI that mlflow
is set up with, tagged with the study) and ``wandb`` (one run per trial, grouped under the
study). The metrics have the names transformers' Trainer gives them in TensorBoard and W&B
(``train/loss``, ``train/learning_rate``, ``eval/loss``), so a sweep's trials sit beside the
user's own runs; the project (W&B project, MLflow experiment) is ``sweep.project``, else the
one transformers would use (``WANDB_PROJECT``, ``MLFLOW_EXPERIMENT_NAME``), else the study's
name. None is installed by default (``pip install 'lrsweep[tensorboard]'`` etc.); a missing
one is a one-line error before anything trains.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsweep.errors import ConfigError
from lrsweep.record import TrialRecord
from lrsweep.results import TENSORBOARD_DIR


if TYPE_CHECKING:
    from optuna.trial import Trial
    from peft import PeftModel

    from lrsweep.sweep.trial import TrialRun
    from lrsweep.training import StepRecord

# The module each tracker needs (torch.utils.tensorboard needs the tensorboard package).
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(names: list[str]) -> None:
    """Refuse, in one line, a tracker whose package is not installed."""
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(
                f"sweep.report_to: {name} is not installed; pip install 'lrsweep[{name}]'"
            )


def trial_params(trial: Trial, run: TrialRun) -> dict[str, Any]:
    """What a tracker shows for a trial: its sampled parameters and schedule as run."""
    schedule = run.schedule
    queued = TrialRecord.of(trial)
    return {
        **trial.params,
        "trial": trial.number,
        "schedule": schedule.family,
        "warmup_steps": schedule.warmup_steps,
        "min_lr_ratio": schedule.floor_ratio,
        "total_steps": schedule.total_steps,
        "loraplus_lr_ratio": run.loraplus_lr_ratio,
        "seed": queued.seed,
        "confirms": queued.confirms,
    }


def _metrics(record: StepRecord) -> dict[str, float]:
    metrics = {"train/loss": record.loss, "train/learning_rate": record.lr}
    if record.eval_loss is not None:
        metrics["eval/loss"] = record.eval_loss
    return metrics


class TensorBoardTracker:
    def __init__(self, out: Path) -> None:
        self.root = out / TENSORBOARD_DIR
        self.writer: Any = None
        self.params: dict[str, Any] = {}

    def start(self, trial: Trial, run: TrialRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.root / f"trial-{trial.number}"))
        self.params = {k: v for k, v in trial_params(trial, run).items() if v is not None}
        self.writer.add_text("params", "\n".join(f"{k}: {v}" for k, v in self.params.items()))

    def step(self, record: StepRecord) -> None:
        for key, value in _metrics(record).items():
            self.writer.add_scalar(key, value, record.step)
        if record.eval_loss is not None:
            self.writer.flush()

    def end(self, model: PeftModel, run: TrialRun, finished: bool) -> None:
        evals = [r.eval_loss for r in run.records if r.eval_loss is not None]
        if finished and evals:
            hparams = {k: v for k, v in self.params.items() if isinstance(v, (int, float, str))}
            self.writer.add_hparams(hparams, {"hparam/eval_loss": evals[-1]}, run_name=".")
        self.writer.close()


class MlflowTracker:
    def __init__(self, study: str, project: str) -> None:
        self.study = study
        self.project = project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or study

    def start(self, trial: Trial, run: TrialRun) -> None:
        import mlflow

        mlflow.set_experiment(self.project)
        mlflow.start_run(run_name=f"trial-{trial.number}", tags={"lrsweep.study": self.study})
        mlflow.log_params(trial_params(trial, run))

    def step(self, record: StepRecord) -> None:
        import mlflow

        mlflow.log_metrics(_metrics(record), step=record.step)

    def end(self, model: PeftModel, run: TrialRun, finished: bool) -> None:
        import mlflow

        mlflow.end_run(status="FINISHED" if finished else "KILLED")


class WandbTracker:
    def __init__(self, study: str, project: str) -> None:
        self.study = study
        self.project = project or os.environ.get("WANDB_PROJECT") or study
        self.run: Any = None

    def start(self, trial: Trial, run: TrialRun) -> None:
        import wandb

        self.run = wandb.init(
            project=self.project,
            group=self.study,
            name=f"trial-{trial.number}",
            config=trial_params(trial, run),
            reinit="finish_previous",
        )

    def step(self, record: StepRecord) -> None:
        self.run.log(_metrics(record), step=record.step)

    def end(self, model: PeftModel, run: TrialRun, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def make_trackers(names: list[str], out: Path, study: str, project: str = "") -> list[Any]:
    """One watcher per name of ``sweep.report_to``."""
    check_trackers(names)
    made: dict[str, Callable[[], Any]] = {"tensorboard": lambda: TensorBoardTracker(out)}
    made |= {
        "mlflow": lambda: MlflowTracker(study, project),
        "wandb": lambda: WandbTracker(study, project),
    }
    return [made[name]() for name in names]
