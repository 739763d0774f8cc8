"""What `lrsweep export` writes for other trainers besides the schedule: the shape, precision
and adapter the trial ran, and what a format cannot carry."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from lrsweep.export import planned_run, render
from tests.conftest import tiny_config


def _trial(**extra: object) -> pd.Series:
    """A 4-bit trial that ran out of memory at micro-batch 4 and went on at 2 x 2, in bf16."""
    return pd.Series(
        {
            "number": 3,
            "eval_loss": 2.5,
            "peak_lr": 2e-4,
            "total_steps": 100,
            "warmup_fraction": 0.05,
            "min_lr_ratio": 0.1,
            "schedule": "cosine",
            "loraplus_lr_ratio": 1.0,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "dtype": "bfloat16",
            **extra,
        }
    )


def test_axolotl_and_llamafactory_get_the_shape_precision_and_quantisation_that_ran() -> None:
    trial = _trial()
    for quantization, load in (("4bit", "load_in_4bit"), ("8bit", "load_in_8bit")):
        config = tiny_config(f"model.quantization={quantization}")
        planned, _ = planned_run(trial, config)
        axolotl = yaml.safe_load(render("axolotl", trial, config, planned)[0])
        # Axolotl quantises a QLoRA base only with load_in_4bit set too.
        assert axolotl["adapter"] == ("qlora" if quantization == "4bit" else "lora")
        assert axolotl[load] is True
        assert (axolotl["micro_batch_size"], axolotl["gradient_accumulation_steps"]) == (2, 2)
        assert axolotl["bf16"] is True and "fp16" not in axolotl
        factory = yaml.safe_load(render("llamafactory", trial, config, planned)[0])
        assert factory["quantization_bit"] == int(quantization[0])
        assert (
            factory["per_device_train_batch_size"],
            factory["gradient_accumulation_steps"],
        ) == (
            2,
            2,
        )
        assert factory["bf16"] is True
    plain = tiny_config()
    axolotl = yaml.safe_load(render("axolotl", trial, plain, planned_run(trial, plain)[0])[0])
    assert axolotl["adapter"] == "lora" and not {"load_in_4bit", "load_in_8bit"} & axolotl.keys()


def test_loraplus_written_into_a_trainer_file_says_it_is_not_there(tmp_path: Path) -> None:
    """TrainingArguments has no LoRA+ key: exporting into such a file says so (Axolotl's and
    LLaMA-Factory's files take loraplus_lr_ratio itself)."""
    config = tiny_config()
    into = tmp_path / "sft.yaml"
    into.write_text("model_name_or_path: x\nlearning_rate: 1.0e-5\nmax_steps: 500\n")
    for ratio, said in ((16.0, True), (1.0, False)):
        trial = _trial(loraplus_lr_ratio=ratio)
        planned, _ = planned_run(trial, config, into=into)
        text, notes = render("yaml", trial, config, planned, into=into)
        assert yaml.safe_load(text)["learning_rate"] == 2e-4
        assert any("LoRA+" in n and "sft.yaml" in n for n in notes) == said
    axolotl = tmp_path / "ax.yaml"
    axolotl.write_text("base_model: x\nlearning_rate: 1.0e-5\nmax_steps: 500\n")
    trial = _trial(loraplus_lr_ratio=16.0)
    text, notes = render(
        "yaml", trial, config, planned_run(trial, config, into=axolotl)[0], axolotl
    )
    assert yaml.safe_load(text)["loraplus_lr_ratio"] == 16.0 and notes == []
