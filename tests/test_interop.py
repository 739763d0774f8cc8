"""The user's own training config in (``--from``) and out (``export --format``, ``--into``):
transformers / TRL, Axolotl, LLaMA-Factory and llama.cpp, each config written the way its
docs show."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lrsweep import config as config_mod
from lrsweep.errors import ConfigError
from lrsweep.interop import Planned, fill, read_run, schedule_keys
from lrsweep.interop.edit import edit_json, edit_yaml, yaml_scalar
from lrsweep.interop.llamacpp import flags
from lrsweep.interop.llamafactory import cli_overrides
from tests.conftest import run_cli


# As Axolotl's examples/llama-3/lora-1b.yml writes one (the model and data made local).
AXOLOTL = """\
base_model: tiny
# optionally might have model_type or tokenizer_type
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: false

datasets:
  - path: alpaca.jsonl
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/lora-out

sequence_len: 64
sample_packing: false

adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true

gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002  # the usual LoRA default

train_on_inputs: false
bf16: auto
tf32: false
gradient_checkpointing: true
logging_steps: 1
flash_attention: false
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
"""

# As LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml writes one.
LLAMAFACTORY = """\
### model
model_name_or_path: tiny
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: alpaca_demo
template: default
cutoff_len: 64
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/tiny/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

# As TRL's docs write a `trl sft --config` file.
TRL = """\
model_name_or_path: tiny
dataset_name: alpaca.jsonl
learning_rate: 2.0e-4
max_steps: 300
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
gradient_checkpointing: false
max_length: 64
eos_token: <|im_end|>
logging_steps: 25
eval_strategy: steps
eval_steps: 100
use_peft: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: all-linear
output_dir: tiny-SFT
"""

# The tools' documented schedule keys: what an export may write into their files.
AXOLOTL_KEYS = {
    "learning_rate",
    "lr_scheduler",
    "cosine_min_lr_ratio",
    "warmup_steps",
    "warmup_ratio",
    "max_steps",
    "num_epochs",
    "loraplus_lr_ratio",
}
LLAMAFACTORY_KEYS = {
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "max_steps",
    "num_train_epochs",
    "loraplus_lr_ratio",
}


def _alpaca(folder: Path, n: int = 40) -> Path:
    path = folder / "alpaca.jsonl"
    rows = [
        {
            "instruction": f"Add {i} and {i + 1}.",
            "input": "" if i % 2 else "Show the sum only.",
            "output": f"The sum is {2 * i + 1}.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _llamafactory_folder(folder: Path) -> Path:
    data = folder / "data"
    data.mkdir()
    _alpaca(data)
    (data / "dataset_info.json").write_text(
        json.dumps({"alpaca_demo": {"file_name": "alpaca.jsonl"}, "hub": {"hf_hub_url": "a/b"}})
    )
    path = folder / "llama3_lora_sft.yaml"
    path.write_text(LLAMAFACTORY)
    return path


def cosine_formula(step: int, planned: Planned, total: int) -> float:
    """DESIGN.md's schedule, written out: linear warmup over ceil(f x T), cosine to r x p."""
    p, r = planned.peak_lr, planned.min_lr_ratio
    warmup = math.ceil(planned.warmup_fraction * total)
    if step < warmup:
        return p * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return p * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


PLANNED = Planned(3e-4, 0.1, 0.2, max_steps=250)


# ---------------------------------------------------------------- text edits


def test_a_yaml_edit_changes_only_the_schedule_lines() -> None:
    text = (
        "# my run\nlearning_rate: 0.0002  # the usual\nwarmup_ratio: 0.1\nlr_scheduler: cosine\n"
    )
    text += "datasets:\n  - path: a\n    type: alpaca\nseed: 42\n"
    new = edit_yaml(text, {"learning_rate": 1e-05, "warmup_steps": 25}, ("warmup_ratio",), "x")
    assert new.splitlines()[:2] == ["# my run", "learning_rate: 1.0e-05  # the usual"]
    assert "warmup_ratio" not in new and new.endswith("# x\nwarmup_steps: 25\n")
    before, after = yaml.safe_load(text), yaml.safe_load(new)
    assert after.pop("learning_rate") == 1e-05 and after.pop("warmup_steps") == 25
    del before["learning_rate"], before["warmup_ratio"]
    assert after == before
    # What was not touched is byte for byte the same.
    assert "datasets:\n  - path: a\n    type: alpaca\nseed: 42\n" in new


@pytest.mark.parametrize("value", [1e-05, 2.5e-4, 0.1, 3, True, "cosine", {"min_lr_rate": 0.1}])
def test_yaml_scalars_read_back_as_the_same_value(value: Any) -> None:
    assert yaml.safe_load(f"k: {yaml_scalar(value)}")["k"] == value


def test_a_json_edit_keeps_the_rest_of_the_text() -> None:
    text = '{\n    "output_dir": "out",\n    "warmup_ratio": 0.03,\n    "learning_rate": 2e-4\n}\n'
    new = edit_json(text, {"learning_rate": 1e-3, "max_steps": 50}, ("warmup_ratio",))
    assert json.loads(new) == {"output_dir": "out", "learning_rate": 1e-3, "max_steps": 50}
    assert new.startswith('{\n    "output_dir": "out",\n    "learning_rate": 0.001')
    assert new.endswith('"max_steps": 50\n}\n')
    with pytest.raises(ConfigError):
        edit_json("[1, 2]", {"a": 1})


EPOCHS_EXPORT = ({"warmup_ratio": 0.2, "num_epochs": 2.0}, ("warmup_steps", "max_steps"))


@pytest.mark.parametrize(
    "text",
    [
        '{"base_model": "x", "warmup_ratio": 0.1, "warmup_steps": 10, "max_steps": 100}',
        '{"warmup_steps": 10, "max_steps": 100}',
        '{\n  "base_model": "x",\n  "warmup_steps": 10,\n  "max_steps": 100\n}\n',
        '{\n  "warmup_steps": 10,\n  "max_steps": 100,\n  "base_model": "x"\n}\n',
        '{"warmup_steps": 10, "base_model": "x", "max_steps": 100}',
    ],
)
def test_removing_adjacent_keys_of_a_json_config_keeps_it_json(text: str) -> None:
    """An epochs export removes warmup_steps and max_steps: at the end, alone or anywhere."""
    values, remove = EPOCHS_EXPORT
    kept = {k: v for k, v in json.loads(text).items() if k not in remove}
    assert json.loads(edit_json(text, values, remove)) == {**kept, **values}
    assert json.loads(edit_json(text, {}, remove)) == kept


def test_an_axolotl_json_config_takes_an_epochs_export(tmp_path: Path) -> None:
    raw = yaml.safe_load(AXOLOTL)
    del raw["warmup_steps"]
    path = tmp_path / "lora.json"
    path.write_text(json.dumps({**raw, "warmup_steps": 10, "max_steps": 100}, indent=2))
    filled = json.loads(fill(path, Planned(3e-4, 0.1, 0.2, epochs=2.0), "lrsweep"))
    values, _ = schedule_keys("axolotl", Planned(3e-4, 0.1, 0.2, epochs=2.0))
    assert filled == {**raw, **values}


def test_a_json_edit_that_would_not_parse_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard: each removed entry as its own span (overlapping ones) breaks the text, and
    the edit says so instead of returning it."""
    from lrsweep.interop import edit

    monkeypatch.setattr(edit, "_runs", lambda indices: [(n, n) for n in indices])
    with pytest.raises(ConfigError, match="not valid JSON"):
        edit_json('{"a": 1, "warmup_steps": 10, "max_steps": 100}', *EPOCHS_EXPORT)


# ---------------------------------------------------------------- config in


def test_an_axolotl_config_is_read_into_the_study(tmp_path: Path) -> None:
    _alpaca(tmp_path)
    path = tmp_path / "lora-1b.yml"
    path.write_text(AXOLOTL)
    run = read_run(path)
    assert run.tool == "axolotl"
    cfg = config_mod.load(None, run.overrides())
    assert cfg.model.path == "tiny" and cfg.model.gradient_checkpointing
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seq_len) == (2, 2, 64)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == ["all-linear"]
    assert cfg.data.path == str(tmp_path / "alpaca.jsonl")
    assert cfg.data.format == "prompt_completion" and cfg.data.train_on == "answers"
    assert cfg.planned.epochs == 1.0 and cfg.sweep.epochs == 1.0
    # The 8-bit optimizer takes AdamW's steps: no note. Keys that change nothing: no note.
    assert run.notes == []


def test_a_llamafactory_config_is_read_through_its_dataset_info(tmp_path: Path) -> None:
    path = _llamafactory_folder(tmp_path)
    run = read_run(path)
    assert run.tool == "llamafactory"
    cfg = config_mod.load(None, run.overrides())
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16, ["all-linear"])
    assert cfg.data.path == str(tmp_path / "data" / "alpaca.jsonl")
    assert cfg.planned.epochs == 3.0 and cfg.train.dtype == "auto"
    assert run.notes == []
    hub = path.with_name("hub.yaml")
    hub.write_text(LLAMAFACTORY.replace("dataset: alpaca_demo", "dataset: hub,alpaca_demo"))
    run = read_run(hub)
    assert run.values["data.path"] == "a/b" and run.notes == [
        "dataset: lrsweep measures on the first of 2 (hub)"
    ]


def test_a_trl_config_is_read_and_what_lrsweep_cannot_honour_is_one_line_a_key(
    tmp_path: Path,
) -> None:
    _alpaca(tmp_path)
    path = tmp_path / "sft.yaml"
    path.write_text(TRL + "optim: sgd\nneftune_noise_alpha: 5\n")
    run = read_run(path)
    assert run.tool == "transformers"
    cfg = config_mod.load(None, run.overrides())
    assert cfg.lora.target_modules == ["all-linear"] and cfg.lora.r == 32
    assert cfg.planned.max_steps == 300 and cfg.sweep.steps == 300
    assert cfg.data.path == str(tmp_path / "alpaca.jsonl")
    assert run.notes == [
        "eos_token: not read by lrsweep; its measurement runs without it",
        "neftune_noise_alpha: not read by lrsweep; its measurement runs without it",
        "optim: sgd is not AdamW; lrsweep measures with AdamW, so its LR may not carry",
    ]


def test_alpaca_rows_are_prompt_completion(tmp_path: Path) -> None:
    from lrsweep.data.reading import read_data

    data = read_data(config_mod.DataConfig(path=str(_alpaca(tmp_path))))
    assert data.format == "prompt_completion"
    assert (data.rows[0].prompt, data.rows[0].completion) == (
        "Add 0 and 1.\nShow the sum only.",
        "The sum is 1.",
    )
    assert data.rows[1].prompt == "Add 1 and 2."


def test_a_hub_dataset_id_goes_through_datasets_and_offline_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lrsweep.data.reading import read_data
    from lrsweep.errors import DataError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load the Hub dataset nobody-here/no-such-set"):
        read_data(config_mod.DataConfig(path="nobody-here/no-such-set"))


def test_all_linear_is_peft_s_own_spelling() -> None:
    from lrsweep.models import attach_lora, detach_lora, load_base_model

    cfg = config_mod.load(None, ["model.path=tiny", "lora.target_modules=all-linear"])
    assert cfg.lora.target_modules == ["all-linear"]
    base = load_base_model(cfg.model, cfg.train, 0)
    model = attach_lora(base, cfg.lora, 0)
    # ...layers.0.self_attn.q_proj.lora_A.default.weight: the module is 4th from the end.
    adapted = {n.split(".")[-4] for n, _ in model.named_parameters() if ".lora_A." in n}
    detach_lora(model)
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ConfigError, match="stands alone"):
        config_mod.load(None, ["lora.target_modules=['all-linear', 'q_proj']"])


# ---------------------------------------------------------------- config out


def _trainer_lrs(args: Any, total: int) -> list[float]:
    from transformers import Trainer

    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return lrs


@pytest.mark.parametrize("planned", [PLANNED, Planned(3e-4, 0.1, 0.2, epochs=2.0)])
def test_the_transformers_keys_run_the_planned_schedule_in_training_arguments_and_sft_config(
    tmp_path: Path, planned: Planned
) -> None:
    from transformers import TrainingArguments
    from trl import SFTConfig

    values, _ = schedule_keys("transformers", planned)
    total = planned.max_steps or 180  # what a Trainer counts for 2 epochs of its data
    for cls in (TrainingArguments, SFTConfig):
        args = cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, **values)
        lrs = _trainer_lrs(args, total)
        assert lrs == pytest.approx([cosine_formula(s, planned, total) for s in range(total)])
    assert lrs == pytest.approx(planned.schedule(total).lrs())


def test_an_axolotl_export_is_its_documented_schedule_and_keys() -> None:
    values, remove = schedule_keys("axolotl", PLANNED)
    assert set(values) <= AXOLOTL_KEYS and remove == ("warmup_ratio",)
    # Axolotl's get_cosine_schedule_with_min_lr: step / max(1, W) in warmup, then
    # (1 - r) * 0.5 * (1 + cos(pi * progress)) + r, with W the warmup_steps given.
    w, r, total = values["warmup_steps"], values["cosine_min_lr_ratio"], values["max_steps"]
    for step in range(total):
        if step < w:
            factor = step / max(1, w)
        else:
            factor = (1 - r) * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w))) + r
        assert values["learning_rate"] * factor == pytest.approx(
            cosine_formula(step, PLANNED, total)
        )
    epochs, remove = schedule_keys("axolotl", Planned(3e-4, 0.1, 0.2, epochs=2.0))
    assert epochs["warmup_ratio"] == 0.1 and epochs["num_epochs"] == 2.0
    assert "warmup_steps" in remove and "max_steps" in remove
    with pytest.raises(ConfigError, match="no wsd schedule"):
        schedule_keys("axolotl", Planned(3e-4, 0.1, 0.2, "wsd", 0.2, max_steps=100))


def test_a_llamafactory_export_runs_in_transformers_training_arguments(tmp_path: Path) -> None:
    """LLaMA-Factory passes these keys to transformers' TrainingArguments unchanged."""
    from transformers import TrainingArguments

    values, _ = schedule_keys("llamafactory", PLANNED)
    assert set(values) <= LLAMAFACTORY_KEYS
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **values)
    lrs = _trainer_lrs(args, PLANNED.max_steps)
    assert lrs == pytest.approx([cosine_formula(s, PLANNED, 250) for s in range(250)])
    line = cli_overrides(PLANNED)
    assert line.startswith("llamafactory-cli train config.yaml learning_rate=0.0003 ")
    assert "'lr_scheduler_kwargs={\"min_lr_rate\":0.2}'" in line and "warmup_steps=25" in line


def test_a_linear_schedule_replaces_the_floor_of_a_llamafactory_file(tmp_path: Path) -> None:
    """A file's min_lr_rate left under a linear schedule stops transformers' scheduler."""
    from transformers import TrainingArguments

    linear = Planned(3e-4, 0.1, 0.0, "linear", max_steps=50)
    values, removed = schedule_keys("llamafactory", linear)
    user = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}
    merged = {k: v for k, v in {**user, **values}.items() if k not in removed}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **merged)
    lrs = _trainer_lrs(args, 50)
    assert lrs[5] == pytest.approx(3e-4) and lrs[-1] < 3e-4 / 40


def test_llama_cpp_gets_the_peak_and_floor_and_is_told_what_it_cannot_run() -> None:
    command, lost = flags(Planned(3e-4, 0.1, 0.2, epochs=2.0), 0.01)
    assert command == (
        "llama-finetune -lr 0.0003 -epochs 2 -lr-min 6e-05 -decay-epochs 2 -wd 0.01"
    )
    assert any("warmup" in line for line in lost) and any("geometric" in line for line in lost)


@pytest.mark.parametrize("family", ["cosine", "wsd", "linear"])
def test_llama_cpp_is_told_a_decay_to_0_is_a_constant_lr_there(family: str) -> None:
    """llama-finetune's LR is -lr throughout without a positive -lr-min (lr_opt::get_lr)."""
    planned = Planned(2e-4, 0.1, 0.0, family, 0.2 if family == "wsd" else 0.0, epochs=2.0)
    command, lost = flags(planned, 0.0)
    assert command == "llama-finetune -lr 0.0002 -epochs 2"
    assert [line for line in lost if "decay" in line] == [
        f"{family} decay to 0: llama-finetune's LR is constant at -lr without a positive "
        "-lr-min (its decay halves toward -lr-min, never to 0)"
    ]
    _, lost = flags(Planned(2e-4, 0.1, 0.0, "constant", epochs=2.0), 0.0)
    assert not any("decay" in line for line in lost)


@pytest.mark.parametrize("tool", ["axolotl", "llamafactory", "trl"])
def test_a_round_trip_changes_nothing_but_the_schedule_keys(tmp_path: Path, tool: str) -> None:
    _alpaca(tmp_path)
    if tool == "llamafactory":
        path = _llamafactory_folder(tmp_path)
    else:
        path = tmp_path / f"{tool}.yml"
        path.write_text({"axolotl": AXOLOTL, "trl": TRL}[tool])
    before = yaml.safe_load(path.read_text())
    filled = fill(path, PLANNED, "lrsweep")
    after = yaml.safe_load(filled)
    written, removed = schedule_keys(read_run(path).tool, PLANNED)
    for key in {*written, *removed}:
        before.pop(key, None)
        after.pop(key, None)
    assert after == before
    # Every line that is not a schedule key is still there, in order.
    keys = {*written, *removed}
    kept = [ln for ln in path.read_text().splitlines() if ln.split(":")[0] not in keys]
    assert [ln for ln in filled.splitlines() if ln.split(":")[0] not in keys][: len(kept)] == kept
    # Read back, the study is the same but for the planned length.
    again = tmp_path / f"again-{path.name}"
    again.write_text(filled)
    first, second = read_run(path).values, read_run(again).values
    for values in (first, second):
        for key in ("planned.source", "planned.max_steps", "planned.epochs"):
            values.pop(key, None)
        values.pop("sweep.steps", None), values.pop("sweep.epochs", None)
    assert first == second


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("tool", ["axolotl", "llamafactory", "trl"])
def test_find_from_the_user_s_config_then_export_into_it(
    tmp_path: Path,
    tool: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    _alpaca(tmp_path, 80)
    if tool == "llamafactory":
        path = _llamafactory_folder(tmp_path)
    else:
        path = tmp_path / f"{tool}.yml"
        path.write_text({"axolotl": AXOLOTL, "trl": TRL}[tool])
    small = ["--set", "rangetest.runs=3", "--set", "rangetest.run_steps=2"]
    small += ["--set", "data.eval_blocks=4", "--set", "train.device=cpu"]
    code, out, err = run_cli(
        capsys, monkeypatch, "find", "--from", str(path), "--out", "f", "-q", *small
    )
    assert code == 0, err
    suggestion = json.loads((tmp_path / "f" / "suggestion.json").read_text())
    assert suggestion["for_run"]["source"] == str(path.resolve())
    assert suggestion["for_run"]["sequences_per_step"] == 4
    sweep = ["sweep", "--from", str(path), "--out", "s", "-q", "--trials", "1", *small]
    # --set sweep.steps shortens the trials also where the config gives epochs.
    sweep += ["--set", "sweep.steps=6", "--set", "sweep.eval_every=3"]
    code, out, err = run_cli(capsys, monkeypatch, *sweep)
    assert code == 0, err
    code, out, err = run_cli(capsys, monkeypatch, "export", "s", "--into", str(path))
    assert code == 0, err
    planned = "300 steps" if tool == "trl" else ("1 epochs" if tool == "axolotl" else "3 epochs")
    assert f"For a run of {planned}" in err and "trials ran 6 steps" in err
    exported = yaml.safe_load(out)
    assert exported["learning_rate"] != yaml.safe_load(path.read_text())["learning_rate"]
    code, out, err = run_cli(
        capsys, monkeypatch, "export", "s", "--format", "json", "--into", str(path)
    )
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize(
    "case", ["not utf-8", "a date", "bad dataset_info.json", "axolotl's custom format"]
)
def test_a_config_lrsweep_cannot_read_is_one_line_and_exit_2(
    tmp_path: Path,
    case: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "trl.yml"
    if case == "not utf-8":
        path.write_bytes(TRL.encode() + b"# caf\xe9\n")
    elif case == "a date":
        path.write_text(TRL + "seed: 2024-01-01\n")
    elif case == "axolotl's custom format":
        _alpaca(tmp_path)
        path = tmp_path / "lora.yml"
        custom = "    type:\n      field_instruction: instruction\n      field_output: output\n"
        path.write_text(AXOLOTL.replace("    type: alpaca\n", custom))
    else:
        path = _llamafactory_folder(tmp_path)
        (tmp_path / "data" / "dataset_info.json").write_text("{not json")
    code, out, err = run_cli(capsys, monkeypatch, "find", "--from", str(path), "--out", "f")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert {
        "not utf-8": "not UTF-8",
        "a date": "seed: ",
        "bad dataset_info.json": "not valid JSON",
        "axolotl's custom format": "datasets[0].type: a custom format (a mapping) is not one",
    }[case] in err
    assert not (tmp_path / "f").exists()


def test_export_into_reads_only_the_length_of_the_user_s_file(tmp_path: Path) -> None:
    """Where its data is not (no dataset_info.json here), the file still takes a schedule."""
    from lrsweep.interop import read_length

    path = _llamafactory_folder(tmp_path)
    (tmp_path / "data" / "dataset_info.json").unlink()
    with pytest.raises(ConfigError, match="no dataset_info.json"):
        read_run(path)
    expected = yaml.safe_load(LLAMAFACTORY)
    assert read_length(path) == (0, float(expected["num_train_epochs"]))
