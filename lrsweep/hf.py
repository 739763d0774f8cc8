"""transformers.Trainer integration: the range test and the sweep on the user's own Trainer.

``find_lr(trainer)`` runs lrsweep's range test on the Trainer's model, data loader, collator,
gradient accumulation, precision and clipping, and leaves the Trainer, its model weights and
its optimizer exactly as they were. ``sweep(make_trainer, ...)`` runs an lrsweep study whose
trials are the user's Trainers, the schedule applied through TrainingArguments.

Example::

    from lrsweep import hf

    result = hf.find_lr(trainer, out="runs/find")
    study = hf.sweep(lambda overrides: make_trainer(**overrides), "runs/sweep",
                     max_steps=200, peak_lr=result.sweep_bounds(200))
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback

from lrsweep import record
from lrsweep.config import (
    DEFAULT_STUDY,
    LORAPLUS_EMBEDDING_FACTOR,
    DataConfig,
    LoraSettings,
    ModelConfig,
    PlannedConfig,
    RangeTestConfig,
    SearchConfig,
    StudyConfig,
    SweepConfig,
    TrainConfig,
    check_mode_keys,
)
from lrsweep.errors import StudyError, first_line
from lrsweep.find import FindResult, measure, save_and_draw
from lrsweep.memory import free_memory, peak_memory_mb, reset_peak_memory
from lrsweep.rangetest import RngState
from lrsweep.record import StudyRecord, TrialRecord
from lrsweep.results import check_writable
from lrsweep.schedules import Schedule
from lrsweep.sweep.trial import Runner, TrialRun, diverged, report_eval
from lrsweep.training import Batch, Loop, Precision, StepRecord


logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import optuna
    from optuna.trial import Trial
    from transformers import Trainer, TrainingArguments

    from lrsweep.sweep.worker import SweepPlan


def precision_of(trainer: Trainer) -> Precision:
    args = trainer.args
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return Precision(args.device, dtype)


def _train_config(trainer: Trainer) -> TrainConfig:
    """What a Trainer's updates depend on, in lrsweep's terms (for metadata and export); the
    sequence length is SFTConfig's max_length (a plain Trainer has none: the default stays)."""
    args = trainer.args
    max_length = getattr(args, "max_length", None)
    return TrainConfig(
        **({"seq_len": max_length} if isinstance(max_length, int) and max_length >= 8 else {}),
        batch_size=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon,
        device=str(args.device.type),
        dtype=precision_of(trainer).dtype_name,
    )


def _lora_of(model: Any) -> LoraSettings:
    """The LoRA adapter of a Trainer's model (its active peft LoraConfig) in lrsweep's terms,
    for the study's metadata and the export; the defaults where it has none."""
    configs = getattr(model, "peft_config", None) or {}
    active = getattr(model, "active_adapter", "default")
    peft = configs.get(active if isinstance(active, str) else "default")
    if peft is None or not hasattr(peft, "lora_alpha"):
        return LoraSettings()
    targets = peft.target_modules
    targets = [targets] if isinstance(targets, str) else sorted(targets or [])
    return LoraSettings(
        r=int(peft.r),
        alpha=int(peft.lora_alpha),
        dropout=float(peft.lora_dropout),
        target_modules=targets or LoraSettings().target_modules,
        rslora=bool(peft.use_rslora),
    )


def _config_of(trainer: Trainer, rangetest: RangeTestConfig) -> StudyConfig:
    name = getattr(getattr(trainer.model, "config", None), "name_or_path", "") or "trainer"
    return StudyConfig(
        seed=trainer.args.seed,
        model=ModelConfig(path=f"trainer:{name}"),
        data=DataConfig(path="trainer"),
        lora=_lora_of(trainer.model),
        train=_train_config(trainer),
        rangetest=rangetest,
        planned=_planned_of(trainer.args),
    )


def _planned_of(args: TrainingArguments) -> PlannedConfig:
    """The Trainer's run: its max_steps when set (they win over epochs, as in transformers)."""
    if args.max_steps > 0:
        return PlannedConfig(max_steps=args.max_steps, source="the Trainer's arguments")
    return PlannedConfig(epochs=float(args.num_train_epochs), source="the Trainer's arguments")


def _cycle(loader: Any) -> Iterator[Batch]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # else this would spin for ever
            raise StudyError(
                "the Trainer's train dataloader yields no batch (fewer rows than a batch, "
                "with dataloader_drop_last?): give it more training rows"
            )


def _one_eval_set(trainer: Trainer) -> None:
    """lrsweep scores on one eval loss; a dict of eval sets logs ``eval_<name>_loss`` each."""
    if isinstance(trainer.eval_dataset, dict):
        raise StudyError(
            f"the Trainer has {len(trainer.eval_dataset)} eval datasets "
            f"({', '.join(map(str, trainer.eval_dataset))}); lrsweep scores on one: pass "
            "eval_dataset=<one of them>"
        )


def _rangetest_config(
    trainer: Trainer, mode: str | None, settings: dict[str, Any]
) -> RangeTestConfig:
    if taken := {"signal", "probe_blocks"} & settings.keys():
        raise TypeError(
            f"hf.find_lr() sets {sorted(taken)} itself: the signal from the Trainer's "
            "eval_dataset and mode=, the probe batches with probe_batches="
        )
    _one_eval_set(trainer)
    signal = "eval" if trainer.eval_dataset is not None else "train"
    mode = mode or ("probe" if signal == "eval" else "ramp")
    if mode == "probe" and signal == "train":
        raise StudyError(
            "find_lr(mode='probe') scores on held-out data: give the Trainer an "
            "eval_dataset, or use mode='ramp'"
        )
    check_mode_keys(mode, settings)
    return RangeTestConfig(mode=mode, signal=signal, **settings)


def find_lr(
    trainer: Trainer,
    *,
    mode: str | None = None,
    probe_batches: int = 2,
    out: str | Path | None = None,
    progress: bool = True,
    **settings: Any,
) -> FindResult:
    """The LR range test on ``trainer``'s model and data; the Trainer is left as it was.

    ``mode`` is ``probe`` (short runs at peak LRs, each scored on the first ``probe_batches``
    batches of the Trainer's eval set; the default when it has one) or ``ramp`` (scored on
    those batches after every step, or by the training loss when there is no eval set; the
    default then). ``settings`` are any other ``[rangetest]`` keys (``start_lr``,
    ``end_lr``, ``steps``, ``spacing``, ``runs``, ``run_steps``, ...), with the same
    defaults as a study file. The suggestion is for the Trainer's own run (its
    ``max_steps``, else ``num_train_epochs`` over its training set; ``result.for_run()``):
    a longer one than the range test's calibration widens the interval down
    (:mod:`lrsweep.horizon`).
    """
    cfg = _rangetest_config(trainer, mode, settings)
    cfg = dataclasses.replace(cfg, probe_blocks=probe_batches)
    if out is not None:  # before minutes of measuring, not after
        check_writable(Path(out), "out=")
    args, model = trainer.args, trainer.model
    assert model is not None, "find_lr needs the Trainer's model"
    # A data loader's iterator draws its seed from the global generators: keep the RNG state
    # the Trainer would have started from.
    rng = RngState.now()
    had_optimizer = trainer.optimizer is not None
    was_training = model.training
    probe = None
    if cfg.signal == "eval":
        probe = list(itertools.islice(trainer.get_eval_dataloader(), probe_batches))
        if not probe:
            raise StudyError("the Trainer's eval dataloader yields no batch: give it eval rows")
    loop = Loop(
        precision_of(trainer),
        args.gradient_accumulation_steps,
        args.max_grad_norm,
        args.per_device_eval_batch_size,
    )
    # The Trainer's own optimizer (its class, parameter groups and weight decay); the
    # range test restores its state afterwards.
    optimizer = trainer.create_optimizer()
    try:
        batches = _cycle(trainer.get_train_dataloader())
        curve, suggestion = measure(
            model, optimizer, batches, cfg, loop, probe=probe, progress=progress
        )
    finally:
        model.train(was_training)
        if not had_optimizer:
            trainer.optimizer = None
        rng.restore()
    dataset = trainer.train_dataset
    sequences = len(dataset) if isinstance(dataset, Sized) else 0
    result = FindResult(curve, suggestion, _config_of(trainer, cfg), None, sequences).carried()
    if out is not None:
        save_and_draw(result, Path(out))
    return result


def training_overrides(
    schedule: Schedule, eval_every: int, output_dir: Path, keep_checkpoints: bool
) -> dict[str, Any]:
    """TrainingArguments keyword arguments that make a Trainer run ``schedule`` and log what
    a trial records: every step's loss and tokens, the eval loss every ``eval_every`` steps."""
    return {
        **schedule.trainer_kwargs(),
        "eval_strategy": "steps",
        "eval_steps": eval_every,
        "logging_strategy": "steps",
        "logging_steps": 1,
        # What lrsweep's own loop counts as a step's tokens.
        "include_num_input_tokens_seen": "non_padding",
        "save_strategy": "steps" if keep_checkpoints else "no",
        "output_dir": str(output_dir),
        "disable_tqdm": True,
    }


class _Watch(TrainerCallback):
    """Records each step's LR and loss, reports eval losses, stops pruned and diverged trials
    (the rules of lrsweep's own trials)."""

    def __init__(
        self, trainer: Trainer, trial: Trial, run: TrialRun, sweep: SweepConfig, prune: bool
    ) -> None:
        self.trainer, self.trial, self.run, self.sweep = trainer, trial, run, sweep
        self.prune = prune
        self.start = time.perf_counter()
        self.lr = math.nan
        self.losses: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        scheduler = self.trainer.lr_scheduler
        assert scheduler is not None  # the Trainer makes it before the first step
        self.lr = float(scheduler.get_last_lr()[0])

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            elapsed = time.perf_counter() - self.start
            step, loss = state.global_step - 1, float(logs["loss"])
            grad_norm = float(logs.get("grad_norm", math.nan))
            tokens = int(state.num_input_tokens_seen)
            self.run.records.append(
                StepRecord(step, self.lr, loss, grad_norm, tokens, elapsed, elapsed)
            )
            self.losses.append(loss)
            if reason := diverged(self.losses, self.sweep.diverge_factor):
                self.run.reason = reason
                control.should_training_stop = True

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
    ) -> None:
        loss = float((metrics or {}).get("eval_loss", math.nan))
        if self.run.records:
            self.run.records[-1].eval_loss = loss
        if self.run.reason:  # diverged: reported no further
            return
        self.run.reason = report_eval(
            self.trial, loss, state.global_step, state.max_steps, self.sweep.pruner, self.prune
        )
        if self.run.reason:
            control.should_training_stop = True


def _trainer_runner(
    make_trainer: Callable[[dict[str, Any]], Trainer],
    on_trainer: Callable[[Trainer], None],
    out: Path,
    sweep: SweepConfig,
    keep_checkpoints: bool,
    device: torch.device,
    seed: int,
) -> Runner:
    def run(trial: Trial, schedule: Schedule) -> TrialRun:
        folder = out / "trials" / str(trial.number)
        queued = TrialRecord.of(trial)
        ratio = trial.params.get("loraplus_lr_ratio")
        result = TrialRun(schedule, ratio)
        trial_seed = queued.seed_or(seed)
        overrides = training_overrides(schedule, sweep.eval_every, folder, keep_checkpoints)
        # Seeded before the Trainer is built: an adapter made in its constructor (TRL's
        # peft_config=) starts from the same weights in every trial and in the export's run.
        set_seed(trial_seed)
        try:
            trainer = make_trainer(overrides)
        except Exception as err:
            # The user's code, before any training: it would fail every trial alike.
            what = f"{type(err).__name__}: {first_line(err)}"
            raise StudyError(f"make_trainer(overrides) raised {what}") from err
        if trainer.args.learning_rate != schedule.peak_lr:
            raise StudyError(
                "make_trainer(overrides) must pass the overrides on to "
                "TrainingArguments(**overrides)"
            )
        _one_eval_set(trainer)
        on_trainer(trainer)
        result.dtype = precision_of(trainer).dtype_name
        if ratio is not None:
            trainer.optimizer = loraplus_optimizer(trainer, ratio)
        watch = _Watch(trainer, trial, result, sweep, not queued.is_confirmation)
        trainer.add_callback(watch)
        # lrsweep prints one line per trial; the Trainer's per-step log lines would bury it.
        trainer.remove_callback(PrinterCallback)
        try:
            if queued.is_confirmation:
                # The Trainer seeded itself with args.seed when it was built, not again at
                # train(), where its data order and dropout draw from the global RNGs: seeded
                # here, a confirmation run gets its own data order and dropout.
                trainer.args.seed = trial_seed
                set_seed(trial_seed)
            reset_peak_memory(device)
            trainer.train()
            result.peak_memory_mb = peak_memory_mb(device)
        finally:
            trainer.model = None
            del trainer
            free_memory(device)
            if not keep_checkpoints:
                shutil.rmtree(folder, ignore_errors=True)
        _check_logged(result)
        result.seconds = result.records[-1].seconds
        return result

    return run


def _check_logged(run: TrialRun) -> None:
    """A trial records every step and is scored by its last eval loss: a Trainer that logged
    less has had the overrides changed (by make_trainer, a callback, or eval_delay)."""
    steps = [r.step for r in run.records]
    last = run.records[-1].eval_loss if run.records else None
    unscored = run.reason is None and (last is None or math.isnan(last))
    if not steps or steps != list(range(len(steps))) or unscored:
        raise StudyError(
            "the Trainer did not log every step's loss and the eval loss after its last "
            "step: make_trainer must pass the overrides on to TrainingArguments unchanged "
            "(logging_strategy, logging_steps, eval_strategy, eval_steps; no eval_delay)"
        )


def loraplus_optimizer(trainer: Trainer, ratio: float) -> torch.optim.Optimizer:
    """peft's LoRA+ AdamW over the Trainer's model with its TrainingArguments' settings; the
    Trainer's scheduler then scales every group, B's at ``ratio`` times A's LR."""
    from peft.optimizers import create_loraplus_optimizer

    args = trainer.args
    return create_loraplus_optimizer(
        trainer.model,  # type: ignore[arg-type]
        torch.optim.AdamW,
        lr=args.learning_rate,
        loraplus_lr_ratio=ratio,
        # An absolute LR for peft, which the Trainer's scheduler then scales like the others.
        loraplus_lr_embedding=LORAPLUS_EMBEDDING_FACTOR * args.learning_rate,
        loraplus_weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )


_SEARCH_KEYS = {f.name for f in dataclasses.fields(SearchConfig)}
# The Trainer keeps its own adapter and trackers (its output_dir, its report_to).
_SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepConfig)} - {
    "steps",
    "epochs",
    "save_adapters",
    "report_to",
}


def _sweep_config(
    seed: int, max_steps: int, peak_lr: tuple[float, float], settings: dict
) -> StudyConfig:
    unknown = set(settings) - _SEARCH_KEYS - _SWEEP_KEYS
    if unknown:
        raise TypeError(f"hf.sweep() got unexpected settings {sorted(unknown)}")
    search: dict[str, Any] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in settings.items() if k in _SEARCH_KEYS
    }
    sweep = {k: v for k, v in settings.items() if k in _SWEEP_KEYS}
    return StudyConfig(
        seed=seed,
        model=ModelConfig(path="trainer"),
        data=DataConfig(path="trainer"),
        search=SearchConfig(**{**search, "peak_lr": list(peak_lr)}),
        sweep=SweepConfig(steps=max_steps, **sweep),
    )


def sweep(
    make_trainer: Callable[[dict[str, Any]], Trainer],
    out: str | Path,
    *,
    max_steps: int,
    peak_lr: tuple[float, float],
    seed: int = 0,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    keep_checkpoints: bool = False,
    progress: bool = True,
    **settings: Any,
) -> optuna.Study:
    """An lrsweep study whose trials are the user's own Trainers.

    ``make_trainer(overrides)`` must build a fresh Trainer (a fresh LoRA adapter) with
    ``TrainingArguments(..., **overrides)``: the overrides carry the trial's peak LR, warmup,
    min_lr, ``max_steps``, evaluation every ``eval_every`` steps and its own output folder,
    which is removed after the trial unless ``keep_checkpoints``. ``settings`` are any
    ``[search]`` or ``[sweep]`` keys (``warmup_fraction``, ``min_lr_ratio``, ``trials``,
    ``eval_every``, ``sampler``, ``pruner``, ...), with the same defaults as a study file.
    Same storage, study, worker loop, result files and report as ``lrsweep sweep``.
    """
    from lrsweep.config import from_stored
    from lrsweep.sweep.worker import run_worker

    out = Path(out)
    check_writable(out, "out=")
    config = _sweep_config(seed, max_steps, peak_lr, settings)
    plan, cfg = _plan(out, config, storage, study_name, settings.get("trials"))
    study = plan.study
    warned: list[bool] = []

    def record_train(trainer: Trainer) -> None:
        # The study's [train] section describes the user's TrainingArguments, so that
        # lrsweep export reproduces their batch size, accumulation and optimizer settings.
        stored = from_stored(StudyRecord.of(study).config or {})
        if trainer.args.seed != stored.seed and not warned:
            warned.append(True)
            logger.warning(
                "the Trainer's seed %d is not hf.sweep's seed %d, which lrsweep export writes: "
                "pass seed=%d to hf.sweep",
                trainer.args.seed,
                stored.seed,
                trainer.args.seed,
            )
        train, lora = _train_config(trainer), _lora_of(trainer.model)
        if (stored.train, stored.lora) != (train, lora):
            record.write_study(study, config=stored.replace(train=train, lora=lora).to_dict())

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner = _trainer_runner(
        make_trainer, record_train, out, cfg.sweep, keep_checkpoints, device, cfg.seed
    )
    run_worker(cfg, plan, runner, device=device, progress=progress)
    return study


def _plan(
    out: Path, cfg: StudyConfig, storage: str | None, study_name: str, trials: int | None
) -> tuple[SweepPlan, StudyConfig]:
    """Join the study or create it through the plan ``lrsweep sweep`` makes; a study joined
    without ``trials`` keeps its budget, as ``lrsweep sweep`` without ``--trials`` does."""
    from lrsweep.sweep.plan import open_study, settle, stored_config

    stored = stored_config(out, storage, study_name)
    if stored is not None:
        # [train] and [lora] come from the user's Trainers (record_train in sweep), not here.
        cfg = cfg.replace(train=stored.train, lora=stored.lora)
    backend, study, joined = open_study(cfg, out, storage, study_name)
    bounds = (float(cfg.search.peak_lr[0]), float(cfg.search.peak_lr[1]))
    return settle(
        backend,
        study,
        joined,
        out,
        url=storage,
        name=study_name,
        bounds=bounds,
        first=None,
        steps=joined.sweep.steps,
        trials=trials,
    )
