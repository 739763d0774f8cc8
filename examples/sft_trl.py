"""The use case end to end with TRL: an SFTTrainer built the usual way (a model path, chat rows
that SFTTrainer tokenises itself, the loss on the assistant answers, LoRA through
``peft_config=``). lrsweep finds the LR on that trainer, sweeps the warmup + cosine schedule
over SFTTrainers built the same way, exports the best schedule, and a final SFTTrainer trains
with ``SFTConfig(**export)``.

    python examples/sft_trl.py          # the bundled SmolLM2-135M-Instruct (minutes on 2 cores)
    python examples/sft_trl.py --tiny   # a tiny random Llama with a byte tokenizer (seconds)

With your own model, pass its Hub ID or folder as ``model`` and your dataset as the rows.
Needs ``pip install "lrsweep[trl]"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

from lrsweep import hf
from lrsweep.config import from_dict
from lrsweep.export import best_trial, training_arguments
from lrsweep.sweep.collect import load_results


# ChatML with {% generation %} markers around each answer and its end of turn: what TRL's
# assistant_only_loss needs (most stock templates lack them; see the README).
CHATML = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_rows(n: int) -> list[dict[str, Any]]:
    """A small chat task: sums, answered with the number."""
    rows = []
    for i in range(n):
        a, b = (7 * i) % 50, (13 * i + 5) % 50
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]
        rows.append({"messages": messages})
    return rows


def as_prompt_completion(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chats as conversational prompt-completion rows: SFTTrainer then trains on the final
    answer (completion_only_loss) with any chat template, markers or not."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def tiny_model(folder: Path) -> None:
    """A tiny random Llama and a byte-level ChatML tokenizer, saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def bundled_model(folder: Path) -> None:
    """The bundled SmolLM2-135M-Instruct as a plain model folder (converted once)."""
    from lrsweep.config import ModelConfig, TrainConfig
    from lrsweep.models import load_base_model, write_cache

    base = load_base_model(ModelConfig(path="bundled"), TrainConfig(device="cpu"))
    # A GGUF-loaded config names no architecture; SFTTrainer(model=path) picks its class by it.
    base.model.config.architectures = [type(base.model).__name__]
    write_cache(base.model, base.tokenizer, folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny random model")
    parser.add_argument("--out", type=Path, default=Path("runs/sft_trl"))
    opts = parser.parse_args(argv)
    model = opts.out / ("tiny-model" if opts.tiny else "smollm2")
    if not (model / "config.json").exists():
        (tiny_model if opts.tiny else bundled_model)(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = chat_rows(16 + 8 * 21)  # 21 batches of 8: the whole run within one epoch
    if opts.tiny:  # the tiny template has generation markers: train on the assistant turns
        loss_flags = {"assistant_only_loss": True}
    else:  # SmolLM2's has none: the final answer of each chat as the completion
        rows, loss_flags = as_prompt_completion(rows), {}
    train_set, eval_set = Dataset.from_list(rows[16:]), Dataset.from_list(rows[:16])
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    steps = 20 if opts.tiny else 60
    seed = 0
    gpu = torch.cuda.is_available()
    settings: dict[str, Any] = {
        "output_dir": str(opts.out / "trainer"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "max_length": 128,
        "learning_rate": 2e-4,
        "max_steps": steps,
        "use_cpu": not gpu,
        "bf16": gpu and torch.cuda.is_bf16_supported(),
        "gradient_checkpointing": False,
        "report_to": "none",
        # The sweep's seed: `lrsweep export` writes it, so the export's run repeats the trial.
        "seed": seed,
        **loss_flags,
    }

    def make_trainer(**overrides: Any) -> SFTTrainer:
        # The model as a path: every trainer loads a fresh base and puts a fresh adapter on
        # it (peft_config), so trials never share an adapter.
        return SFTTrainer(
            model=str(model),
            args=SFTConfig(**{**settings, **overrides}),
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=lora,
        )

    # 1. The range test on the user's SFTTrainer (probe mode: it has an eval set).
    found = hf.find_lr(make_trainer(), out=opts.out / "find")
    lr = found.recommended_lr
    print(f"range test: recommended {lr:.2e}, diverges at {found.suggestion.divergence_lr}")

    # 2. A sweep whose trials are SFTTrainers built the same way.
    high = found.suggestion.divergence_lr or max(found.curve.lrs)
    hf.sweep(
        lambda overrides: make_trainer(**overrides),
        opts.out / "sweep",
        max_steps=steps,
        peak_lr=(lr / 10, high),
        trials=3,
        eval_every=steps // 2,
        seed=seed,
        confirm_top=0,  # a real sweep re-runs its best configurations with fresh seeds
    )

    # 3. Export the best schedule (the same as `lrsweep export runs/sft_trl/sweep`).
    trials, _, meta = load_results(opts.out / "sweep")
    best = best_trial(trials)
    export = training_arguments(best, from_dict(meta["config"]))
    print("best schedule:", json.dumps(export))

    # 4. Train with it: the export goes straight into SFTConfig. Seeded as hf.sweep seeds each
    # trial before calling make_trainer (the adapter is made in SFTTrainer's constructor, before
    # it seeds itself), this run is the best trial again.
    set_seed(seed)
    trainer = make_trainer(**export)
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    print(f"final eval loss: {loss:.4f} (trial {int(best['number'])}: {best['eval_loss']:.4f})")
    return {
        "recommended_lr": lr,
        "trials": len(trials),
        "learning_rate": float(best["peak_lr"]),
        "export": export,
        "final_eval_loss": loss,
        "trial_eval_loss": float(best["eval_loss"]),
    }


if __name__ == "__main__":
    main()
