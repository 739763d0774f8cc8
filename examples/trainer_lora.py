"""The use case end to end, in a user's own transformers code.

A causal LM with a LoRA adapter and a Trainer; lrsweep finds the LR on that Trainer, sweeps the
warmup + cosine schedule over Trainers built the same way, exports the best schedule, and a
final Trainer trains with the export.

    python examples/trainer_lora.py          # the bundled SmolLM2-135M (minutes on 2 CPU cores)
    python examples/trainer_lora.py --tiny   # a tiny random model (a minute)

With your own model, replace ``load_model`` with ``AutoModelForCausalLM.from_pretrained(...)``
and the datasets with yours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from lrsweep import hf
from lrsweep.config import DataConfig, ModelConfig, TrainConfig
from lrsweep.data import load_blocks
from lrsweep.export import best_trial, training_arguments
from lrsweep.models import load_base_model
from lrsweep.sweep.collect import load_results


class Blocks(Dataset):  # type: ignore[type-arg]
    """Packed token blocks as a causal-LM dataset."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny random model")
    parser.add_argument("--out", type=Path, default=Path("runs/example"))
    opts = parser.parse_args()
    train_cfg = TrainConfig(seq_len=32 if opts.tiny else 128, batch_size=4, device="cpu")
    base = load_base_model(ModelConfig(path="tiny" if opts.tiny else "bundled"), train_cfg)
    blocks = load_blocks(
        DataConfig(max_tokens=20_000 if opts.tiny else 100_000, eval_blocks=16),
        train_cfg,
        base.tokenizer,
        seed=0,
    )
    train_set, eval_set = Blocks(blocks.train), Blocks(blocks.eval)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    steps = 40 if opts.tiny else 60

    def fresh_model() -> Any:
        # A fresh adapter each time: take the previous one off the shared base first.
        if hasattr(base.model, "peft_config"):
            base.model = base.model.unload()
        model = get_peft_model(base.model, lora)
        base.model = model
        return model

    def make_trainer(**overrides: Any) -> Trainer:
        args = TrainingArguments(
            **{
                "output_dir": str(opts.out / "trainer"),
                "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 8,
                "use_cpu": True,
                "report_to": [],
                "learning_rate": 1e-4,
                "max_steps": steps,
                **overrides,
            }
        )
        return Trainer(
            model=fresh_model(), args=args, train_dataset=train_set, eval_dataset=eval_set
        )

    # 1. The range test on the user's Trainer.
    found = hf.find_lr(make_trainer(), out=opts.out / "find")
    lr = found.recommended_lr
    print(f"range test: recommended {lr:.2e}, diverges at {found.suggestion.divergence_lr}")

    # 2. A sweep whose trials are Trainers built the same way.
    high = found.suggestion.divergence_lr or max(found.curve.lrs)
    hf.sweep(
        lambda overrides: make_trainer(**overrides),
        opts.out / "sweep",
        max_steps=steps,
        peak_lr=(lr / 10, high),
        trials=4,
        eval_every=steps // 4,
    )

    # 3. Export the best schedule (the same as `lrsweep export runs/example/sweep`).
    trials, _, meta = load_results(opts.out / "sweep")
    from lrsweep.config import from_dict

    kwargs = training_arguments(best_trial(trials), from_dict(meta["config"]))
    print("best schedule:", json.dumps(kwargs))

    # 4. Train with it in a plain Trainer.
    trainer = make_trainer(
        **{
            k: v
            for k, v in kwargs.items()
            if k
            in (
                "learning_rate",
                "lr_scheduler_type",
                "lr_scheduler_kwargs",
                "warmup_steps",
                "max_steps",
                "max_grad_norm",
                "seed",
            )
        }
    )
    trainer.train()
    print(f"final eval loss: {trainer.evaluate()['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
