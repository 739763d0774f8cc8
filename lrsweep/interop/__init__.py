"""The user's own training config, in and out: TrainingArguments / SFTConfig (and TRL's CLI
file), Axolotl, LLaMA-Factory and llama.cpp's llama-finetune.

In: :func:`read_run` reads a JSON or YAML file of one of those tools into lrsweep's study keys
(model, data, batch shape, LoRA, precision, the planned length) and one line for each key
that changes training but that lrsweep cannot honour. Out: each tool's module turns a
:class:`Planned` schedule into that tool's keys (:func:`schedule_keys`); :func:`fill` writes
them into a copy of the user's file, every other byte as it was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrsweep.errors import ConfigError
from lrsweep.interop.edit import edit_json, edit_yaml
from lrsweep.schedules import Schedule


# What lrsweep export writes: TrainingArguments / SFTConfig (json, yaml, python), then the
# other tools.
FORMATS = ("json", "yaml", "python", "axolotl", "llamafactory", "llamafactory-cli", "llamacpp")


@dataclass(frozen=True)
class Planned:
    """The found schedule carried to the planned run: the same peak, warmup fraction, floor
    and family, over the planned length (``max_steps``, or ``epochs`` when the steps are not
    known until the tool counts its data)."""

    peak_lr: float
    warmup_fraction: float
    min_lr_ratio: float
    family: str = "cosine"
    decay_fraction: float = 0.0  # wsd only
    loraplus_lr_ratio: float | None = None
    max_steps: int = 0
    epochs: float = 0.0

    def __post_init__(self) -> None:
        if (self.max_steps > 0) == (self.epochs > 0):
            raise ValueError("a planned run has max_steps or epochs, one of them")

    def schedule(self, total_steps: int | None = None) -> Schedule:
        """The schedule over ``total_steps`` (default: ``max_steps``)."""
        steps = total_steps or self.max_steps
        if not steps:
            raise ValueError("the planned run is given in epochs: pass its total steps")
        return Schedule(
            self.peak_lr,
            steps,
            self.warmup_fraction,
            self.min_lr_ratio,
            self.family,
            self.decay_fraction,
        )

    @property
    def length(self) -> str:
        return f"{self.max_steps} steps" if self.max_steps else f"{self.epochs:g} epochs"


@dataclass
class UserRun:
    """A user's config read into lrsweep: ``values`` by lrsweep key (``train.batch_size``),
    ``notes`` one line per key lrsweep cannot honour."""

    tool: str
    source: Path
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> list[str]:
        """``section.key=value`` lines, as ``--set`` takes them (values as TOML)."""
        return [f"{key}={_toml(value)}" for key, value in self.values.items()]


def _plain(value: Any) -> bool:
    """Whether ``value`` is what _toml writes (YAML also gives dates and mappings)."""
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value).__name__)


def load_file(path: Path) -> tuple[dict[str, Any], str]:
    """A config file's mapping and its text (JSON by its suffix or first brace, else YAML)."""
    if not path.is_file():
        raise ConfigError(f"--from {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # json and yaml raise their own types
        raise ConfigError(f"{path}: not valid JSON or YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of config keys")
    return raw, text


def detect(raw: dict[str, Any]) -> str:
    """Which tool a config is for, from the keys only that tool uses."""
    if "base_model" in raw:
        return "axolotl"
    if {"stage", "finetuning_type", "cutoff_len", "lora_rank", "lora_target"} & raw.keys():
        return "llamafactory"
    return "transformers"


def _module(tool: str) -> Any:
    from lrsweep.interop import axolotl, llamafactory, transformers

    return {"transformers": transformers, "axolotl": axolotl, "llamafactory": llamafactory}[tool]


def read_length(path: Path) -> tuple[int, float]:
    """The planned length of the user's config (max_steps, else epochs), read alone: writing
    a schedule into a copy needs neither its data nor its model."""
    raw, _ = load_file(path)
    tool = detect(raw)
    run = UserRun(tool, path)
    length(run, raw.get("max_steps"), raw.get(*_module(tool).EPOCHS))
    return run.values.get("planned.max_steps", 0), run.values.get("planned.epochs", 0.0)


def read_run(path: Path) -> UserRun:
    """Read the user's config into lrsweep's study keys."""
    raw, _ = load_file(path)
    tool = detect(raw)
    run = UserRun(tool, path)
    _module(tool).read(raw, path.parent, run)
    run.values["planned.source"] = str(path.resolve())
    return run


def schedule_keys(tool: str, planned: Planned) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The keys that make ``tool`` run ``planned``, and the keys to remove (the other
    spelling of the same setting, such as warmup_steps beside warmup_ratio)."""
    return _module(tool).schedule_keys(planned)


def fill(path: Path, planned: Planned, note: str) -> str:
    """The text of the user's config with the planned schedule written in, all else kept."""
    raw, text = load_file(path)
    values, remove = schedule_keys(detect(raw), planned)
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return edit_json(text, values, remove)
    return edit_yaml(text, values, remove, note)


# ---------------------------------------------------------------- helpers for the readers


Setter = Callable[[Any], Any]


def map_keys(
    raw: dict[str, Any],
    run: UserRun,
    mapping: dict[str, tuple[str, Setter] | str],
    ignored: tuple[str, ...],
    handled: tuple[str, ...],
) -> None:
    """Copy the mapped keys of ``raw`` into ``run.values``; a key that is neither mapped, nor
    ``handled`` by the tool's reader (the schedule lrsweep decides, the length), nor one that
    does not change training (``ignored``: names or prefixes) gets a note."""
    for key, value in raw.items():
        if value is None or key in handled:
            continue
        target = mapping.get(key)
        if target is None:
            if not key.startswith(ignored):
                run.notes.append(f"{key}: not read by lrsweep; its measurement runs without it")
            continue
        name, convert = (target, _same) if isinstance(target, str) else target
        converted = convert(value)
        if name and converted is not None:
            if not _plain(converted):
                raise ConfigError(
                    f"{key}: {value!r} is not a number, string, true/false or list of them"
                )
            run.values[name] = converted


# The AdamW settings and the seed, under the same names in all three tools.
ADAMW_KEYS: dict[str, Any] = {
    "max_grad_norm": "train.max_grad_norm",
    "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "adam_epsilon": "train.adam_epsilon",
    "seed": "seed",
}


def _same(value: Any) -> Any:
    return value


def batch_defaults(arguments: type) -> dict[str, Any]:
    """The batch shape a TrainingArguments class (or a subclass: TRL's SFTConfig,
    Seq2SeqTrainingArguments) trains with where a file does not say."""
    fields = arguments.__dataclass_fields__  # type: ignore[attr-defined]
    return {
        "train.batch_size": fields["per_device_train_batch_size"].default,
        "train.grad_accum": fields["gradient_accumulation_steps"].default,
    }


def tool_defaults(run: UserRun, values: dict[str, Any]) -> None:
    """The tool's own value of each study key its file leaves out (by lrsweep key): the run it
    trains, where lrsweep's defaults would measure another batch shape, length or LoRA."""
    for key, value in values.items():
        run.values.setdefault(key, value)


def length(run: UserRun, max_steps: Any, epochs: Any) -> None:
    """The planned length (max_steps wins, as in transformers) and the sweep's trials as long."""
    if isinstance(max_steps, int) and max_steps > 0:
        run.values["planned.max_steps"] = max_steps
        run.values["sweep.steps"] = max_steps
    elif isinstance(epochs, (int, float)) and epochs > 0 and math.isfinite(epochs):
        run.values["planned.epochs"] = float(epochs)
        run.values["sweep.epochs"] = float(epochs)


def dtype(bf16: Any, fp16: Any) -> str | None:
    if bf16 is True:
        return "bfloat16"
    if fp16 is True:
        return "float16"
    return None


def set_dtype(run: UserRun, raw: dict[str, Any]) -> None:
    if (value := dtype(raw.get("bf16"), raw.get("fp16"))) is not None:
        run.values["train.dtype"] = value


def optimizer(run: UserRun, key: str, value: Any) -> None:
    """lrsweep measures with torch's AdamW; an 8-bit, paged or fused AdamW takes the same
    steps, any other optimizer does not."""
    if value is None:
        return
    name = str(value).lower()
    if "adamw" not in name:
        run.notes.append(
            f"{key}: {value} is not AdamW; lrsweep measures with AdamW, so its LR may not carry"
        )


# Keys of every tool that do not change what a step does: where and how often to log, save
# and evaluate, the hub, distributed launch, data loading workers.
IGNORED = (
    "output_dir",
    "overwrite_output_dir",
    "logging",
    "log_",
    "save_",
    "saves_",
    "eval",
    "do_",
    "per_device_eval",
    "report_to",
    "run_name",
    "push_to_hub",
    "hub_",
    "resume_from_checkpoint",
    "dataloader_",
    "ddp_",
    "deepspeed",
    "fsdp",
    "local_rank",
    "disable_tqdm",
    "plot_loss",
    "wandb_",
    "mlflow_",
    "use_mps_device",
    "trust_remote_code",
    "tf32",
    "seed",
    "data_seed",
    "torch_compile",
    "remove_unused_columns",
    "label_names",
    "include_",
    "prediction_loss_only",
    "use_cpu",
    "dataset_num_proc",
    "preprocessing_num_workers",
    "overwrite_cache",
    "model_revision",
    "dataset_config",
    "dataset_test_split",
    "val_size",
    "test_datasets",
    "debug",
    "strict",
    "special_tokens",
    "val_set_size",
    "group_by_length",
    "loss_watchdog",
    "early_stopping",
    "lora_model_dir",
    "max_samples",
)
