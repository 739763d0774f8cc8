"""What lrsweep stores in an Optuna study, typed. This is the one module that reads or writes
the user attributes of a trial or a study; everything else sees a :class:`TrialRecord` or a
:class:`StudyRecord`.

The attribute names are those lrsweep 0.1.0 wrote, so that studies made by it still load
(``tests/fixtures/sweep-0.1.0`` is one). Optuna calls are not retried here: callers that talk to
a database wrap them in ``storage.retry`` (a whole write is idempotent).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial, Trial

    from lrsweep.schedules import Schedule
    from lrsweep.training import StepRecord

# Why a trial was queued (its ``origin``).
FIRST_ORIGIN = "range test recommendation"
BASELINE_ORIGIN = "common default"
CONFIRMATION_ORIGIN = "confirmation"


@dataclass(frozen=True)
class Curve:
    """Every optimizer step of a trial: the LR it used, its training loss, the eval loss
    measured after it (None where there was no evaluation)."""

    lr: list[float]
    loss: list[float]
    eval_loss: list[float | None]


@dataclass(frozen=True)
class TrialRecord:
    """Every fact lrsweep stores on a trial. The first four are set when it is queued, the
    rest when it ends (None: not known, or not stored by the runner)."""

    origin: str | None = None  # why it was queued: FIRST_ORIGIN, BASELINE_ORIGIN, ...
    confirms: int | None = None  # a confirmation run: the number of the trial it repeats
    seed: int | None = None  # a confirmation run's own seed; once run, the seed it ran with
    retry_of: int | None = None  # a retry of a trial whose worker died
    warmup_steps: int | None = None
    min_lr: float | None = None
    min_lr_ratio: float | None = None
    schedule: str | None = None
    loraplus_lr_ratio: float | None = None
    total_steps: int | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    tokens: int | None = None
    seconds: float | None = None
    peak_memory_mb: float | None = None
    reason: str | None = None
    worker: str | None = None
    micro_batch_size: int | None = None  # the shape that ran, after out-of-memory retries
    grad_accum: int | None = None
    oom_retries: int | None = None
    oom_reason: str | None = None
    dtype: str | None = None  # the compute dtype that ran (train.dtype "auto" resolved)
    curve: Curve | None = None

    @classmethod
    def of(cls, trial: FrozenTrial | Trial) -> TrialRecord:
        """The record of a trial (keys that lrsweep does not know are left out)."""
        return cls.from_attrs(trial.user_attrs)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TrialRecord:
        values = {k: v for k, v in attrs.items() if k in _FIELDS}
        if isinstance(values.get("curve"), dict):
            values["curve"] = Curve(**values["curve"])
        return cls(**values)

    @classmethod
    def ended(
        cls,
        queued: TrialRecord,
        schedule: Schedule,
        records: list[StepRecord],
        **facts: Any,
    ) -> TrialRecord:
        """What a trial recorded when it ended: its schedule as run, its evaluations and
        curve, and ``facts`` (seconds, reason, seed, worker, the shape that ran, ...)."""
        evals = [(r.step, r.eval_loss) for r in records if r.eval_loss is not None]
        finite = [(s, v) for s, v in evals if math.isfinite(v)]
        best_step, best = min(finite, key=lambda e: e[1]) if finite else (None, None)
        return dataclasses.replace(
            queued,
            warmup_steps=schedule.warmup_steps,
            min_lr=schedule.min_lr,
            min_lr_ratio=schedule.floor_ratio,
            schedule=schedule.family,
            total_steps=schedule.total_steps,
            best_eval_loss=best,
            best_step=best_step,
            tokens=records[-1].tokens if records else 0,
            curve=Curve(
                [r.lr for r in records], [r.loss for r in records], [r.eval_loss for r in records]
            ),
            **facts,
        )

    def attrs(self) -> dict[str, Any]:
        """The user attributes, by their stored names; unknown (None) facts are not stored."""
        out = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = dataclasses.asdict(value) if isinstance(value, Curve) else value
        return out

    @property
    def is_confirmation(self) -> bool:
        return self.confirms is not None

    def seed_or(self, study_seed: int) -> int:
        """The seed of the trial's adapter init, data order and dropout: a confirmation run's
        own, else the study's. The one rule every runner uses."""
        return int(self.seed) if self.seed is not None else study_seed

    def retry(self, number: int) -> TrialRecord:
        """The record a retry of trial ``number`` is queued with: what made the trial what it
        is (its origin; a confirmation run's target and seed)."""
        return TrialRecord(self.origin, self.confirms, self.seed, retry_of=number)


_FIELDS = tuple(f.name for f in dataclasses.fields(TrialRecord))


def is_confirmation(trial: FrozenTrial | Trial) -> bool:
    return "confirms" in trial.user_attrs


def write(trial: Trial, record: TrialRecord) -> None:
    """Store ``record`` on a running trial."""
    for key, value in record.attrs().items():
        trial.set_user_attr(key, value)


def queue(study: optuna.Study, params: dict[str, Any], record: TrialRecord) -> None:
    """Enqueue a trial with fixed parameters and what is known of it before it runs."""
    study.enqueue_trial(params, user_attrs=record.attrs())


def store_reason(backend: optuna.storages.BaseStorage, trial_id: int, reason: str) -> None:
    """Why a trial failed, written through the storage (for a trial this process does not
    run: a dead worker's)."""
    backend.set_trial_user_attr(trial_id, "reason", reason)


@dataclass(frozen=True)
class StudyRecord:
    """What lrsweep stores on a study: its config, the peak-LR bounds of its search, its
    budget of finished trials, and the version that made it (written last: a study without
    one is still being created)."""

    config: dict[str, Any] | None = None
    peak_lr_bounds: tuple[float, float] | None = None
    trials: int | None = None
    lrsweep_version: str | None = None

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        attrs = study.user_attrs
        bounds = attrs.get("peak_lr_bounds")
        return cls(
            attrs.get("config"),
            (float(bounds[0]), float(bounds[1])) if bounds else None,
            attrs.get("trials"),
            attrs.get("lrsweep_version"),
        )

    @property
    def complete(self) -> bool:
        return self.lrsweep_version is not None


def write_study(study: optuna.Study, **values: Any) -> None:
    """Store some of :class:`StudyRecord`'s facts on ``study`` (in the order given)."""
    known = {f.name for f in dataclasses.fields(StudyRecord)}
    for key, value in values.items():
        assert key in known, key
        study.set_user_attr(key, list(value) if isinstance(value, tuple) else value)
