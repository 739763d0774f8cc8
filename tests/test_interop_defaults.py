"""``--from``: what the user's tool runs where its file says nothing (its defaults for the batch
shape, sequence length and LoRA), and TRL's loss mask per data format."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from lrsweep import config as config_mod
from lrsweep.interop import read_run
from tests.test_interop import LLAMAFACTORY, _alpaca, _llamafactory_folder


def _study(path: Path) -> config_mod.StudyConfig:
    return config_mod.load(None, read_run(path).overrides())


def _messages(folder: Path) -> Path:
    path = folder / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Add {i}."},
                {"role": "assistant", "content": "Ok."},
            ]
        }
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- the tools' defaults


def test_a_trl_file_leaving_the_batch_and_lora_out_gets_trl_s(tmp_path: Path) -> None:
    """A `trl sft` file of model, data and length only: SFTConfig's batch and max_length and
    the LoRA of TRL's CLI (ModelConfig), not lrsweep's 4 x 128 tokens."""
    from trl import ModelConfig, SFTConfig

    _alpaca(tmp_path)
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: tiny\ndataset_name: alpaca.jsonl\nmax_steps: 50\n")
    cfg = _study(path)
    sft, cli = SFTConfig.__dataclass_fields__, ModelConfig.__dataclass_fields__
    assert cfg.train.batch_size == sft["per_device_train_batch_size"].default
    assert cfg.train.grad_accum == sft["gradient_accumulation_steps"].default
    assert cfg.train.seq_len == sft["max_length"].default
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == tuple(
        cli[f"lora_{k}"].default for k in ("r", "alpha", "dropout")
    )
    # What the file says wins.
    path.write_text(path.read_text() + "per_device_train_batch_size: 2\nmax_length: 64\n")
    cfg = _study(path)
    assert (cfg.train.batch_size, cfg.train.seq_len) == (2, 64)


def test_without_trl_installed_its_defaults_are_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    _alpaca(tmp_path)
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: tiny\ndataset_name: alpaca.jsonl\nlora_r: 8\n")
    run = read_run(path)
    assert "train.seq_len" not in run.values and run.values["lora.r"] == 8
    assert run.notes == [
        "max_length, lora_alpha, lora_dropout: not in the file, and TRL is not installed here "
        "to read its defaults; lrsweep measures with the study's (pip install 'lrsweep[trl]')"
    ]


def test_a_training_arguments_file_leaves_length_and_lora_to_the_study(tmp_path: Path) -> None:
    """TrainingArguments keys alone: the Trainer's batch shape; the sequence length and LoRA
    are the user's own code's, so the study's stay."""
    from transformers import TrainingArguments

    path = tmp_path / "args.json"
    path.write_text('{"output_dir": "out", "learning_rate": 1e-4, "max_steps": 20}')
    run = read_run(path)
    fields = TrainingArguments.__dataclass_fields__
    assert run.values["train.batch_size"] == fields["per_device_train_batch_size"].default
    assert run.values["train.grad_accum"] == fields["gradient_accumulation_steps"].default
    assert not {"train.seq_len", "lora.r", "lora.alpha", "lora.dropout", "data.train_on"} & set(
        run.values
    )


def test_an_axolotl_file_leaving_keys_out_gets_axolotl_s_defaults(tmp_path: Path) -> None:
    """Axolotl's config reference: micro_batch_size 1, gradient_accumulation_steps 1,
    sequence_len 512, lora_dropout 0.0; with batch_size, the missing one of the other two
    is derived from it."""
    _alpaca(tmp_path)
    path = tmp_path / "lora.yml"
    head = "base_model: tiny\ndatasets:\n  - path: alpaca.jsonl\n    type: alpaca\n"
    head += "adapter: lora\nlora_r: 8\nlora_alpha: 16\nlearning_rate: 0.0002\n"
    path.write_text(head)
    cfg = _study(path)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seq_len) == (1, 1, 512)
    assert cfg.lora.dropout == 0.0
    path.write_text(head + "micro_batch_size: 2\nbatch_size: 16\n")
    run = read_run(path)
    assert (run.values["train.batch_size"], run.values["train.grad_accum"]) == (2, 8)
    assert run.notes == []
    path.write_text(head + "gradient_accumulation_steps: 4\nbatch_size: 16\n")
    assert _study(path).train.batch_size == 4


def test_a_llamafactory_file_leaving_keys_out_gets_llamafactory_s_defaults(
    tmp_path: Path,
) -> None:
    """LLaMA-Factory's hparams: cutoff_len 2048, lora_rank 8, lora_alpha rank x 2,
    lora_dropout 0.0; the batch shape of transformers' Seq2SeqTrainingArguments."""
    from transformers import Seq2SeqTrainingArguments

    path = _llamafactory_folder(tmp_path)
    left_out = ("lora_rank:", "cutoff_len:", "per_device_train_batch_size:", "gradient_acc")
    lines = [ln for ln in LLAMAFACTORY.splitlines() if not ln.startswith(left_out)]
    path.write_text("\n".join(lines) + "\n")
    cfg = _study(path)
    fields = Seq2SeqTrainingArguments.__dataclass_fields__
    assert cfg.train.batch_size == fields["per_device_train_batch_size"].default
    assert cfg.train.grad_accum == fields["gradient_accumulation_steps"].default
    assert cfg.train.seq_len == 2048
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.0)
    path.write_text(path.read_text() + "lora_rank: 32\n")
    assert _study(path).lora.alpha == 64


# ---------------------------------------------------------------- TRL's loss mask


@pytest.mark.parametrize(
    ("keys", "train_on"),
    [
        ({}, "completions"),
        ({"assistant_only_loss": False}, "completions"),
        ({"completion_only_loss": True}, "completions"),
        ({"completion_only_loss": False}, "all"),
        ({"assistant_only_loss": True}, "answers"),
        ({"assistant_only_loss": True, "completion_only_loss": False}, "answers"),
    ],
)
def test_trl_s_loss_mask_is_its_keys_for_either_data_format(
    tmp_path: Path, keys: dict[str, Any], train_on: str
) -> None:
    """SFTTrainer trains on the answers of either format with assistant_only_loss, on every
    token with completion_only_loss false, and by default on the completion of
    prompt-completion rows and every token of messages rows (``completions``; the masks
    themselves are compared with TRL's in tests/data/test_trl_masks.py)."""
    rows = _messages(tmp_path)
    path = tmp_path / "sft.yaml"
    text = f"model_name_or_path: tiny\ndataset_name: {rows.name}\nmax_steps: 50\n"
    path.write_text(text + "".join(f"{k}: {str(v).lower()}\n" for k, v in keys.items()))
    assert _study(path).data.train_on == train_on and read_run(path).notes == []
