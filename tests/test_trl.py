"""lrsweep on TRL's SFTTrainer built the usual way: its own dataset processing (chat and
prompt-completion rows, ``assistant_only_loss`` / ``completion_only_loss``, packing), LoRA
through ``peft_config=``, SFTConfig. A tiny random Llama with a byte-level ChatML tokenizer
keeps every test to seconds."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import LlamaForCausalLM, TrainerCallback

# Not skipped when missing: `make setup` installs lrsweep[trl] (through the dev extra).
from trl import SFTConfig, SFTTrainer

from lrsweep import hf
from lrsweep.export import best_trial, training_arguments
from lrsweep.models import trainable_state
from lrsweep.schedules import Schedule
from lrsweep.sweep.collect import load_results
from lrsweep.training import Loop, train
from tests.conftest import ROOT, chat_tokenizer, run_cli, tiny_llama


# ChatML with generation markers around each assistant answer and its end of turn, which
# TRL's assistant_only_loss needs (it renders exactly as conftest's CHATML).
MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LORA = LoraConfig(
    r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
)


def chat_rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        turns = [
            {"role": "user", "content": f"Add {i} and {i + 3}."},
            {"role": "assistant", "content": f"{2 * i + 3}"},
        ]
        if i % 3 == 0:
            turns = [{"role": "system", "content": "Be brief."}, *turns]
        rows.append({"messages": turns})
    return rows


def pc_rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"{i} + {i + 3} =", "completion": f" {2 * i + 3}"} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return chat_tokenizer(MARKED)


@pytest.fixture(scope="module")
def base(tokenizer: Any) -> LlamaForCausalLM:
    return tiny_llama(tokenizer, hidden=32)


def sft_config(tmp: Path, **kw: Any) -> SFTConfig:
    settings: dict[str, Any] = {
        "output_dir": str(tmp / "sft"),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_length": 128,
        "disable_tqdm": True,
        "save_strategy": "no",
        **kw,
    }
    return SFTConfig(**settings)


def sft_trainer(
    base: LlamaForCausalLM, tokenizer: Any, rows: list[dict[str, Any]], args: SFTConfig
) -> SFTTrainer:
    return SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_list(rows[8:]),
        eval_dataset=Dataset.from_list(rows[:8]),
        processing_class=tokenizer,
        peft_config=LORA,
    )


def unload(trainer: SFTTrainer) -> None:
    """Take the trainer's adapter off the shared base (peft wrapped the base in place)."""
    model = trainer.model
    if isinstance(model, PeftModel):
        model.unload()


CASES = {
    "chat, assistant_only_loss": (chat_rows, {"assistant_only_loss": True}),
    "prompt-completion, completion_only_loss": (pc_rows, {}),
    "chat, packed (padding-free)": (chat_rows, {"assistant_only_loss": True, "packing": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_lrsweeps_loss_is_sfttrainers_loss(
    base: LlamaForCausalLM, tokenizer: Any, tmp_path: Path, case: str
) -> None:
    """TRL's collator puts -100 on every token but the answers, so lrsweep's step loss on the
    trainer's batches (model(**batch).loss, token-weighted) is SFTTrainer's own loss."""
    make_rows, flags = CASES[case]
    trainer = sft_trainer(base, tokenizer, make_rows(40), sft_config(tmp_path, **flags))
    try:
        batch = next(iter(trainer.get_train_dataloader()))
        labels = batch["labels"]
        if "packed" in case:
            assert "position_ids" in batch and labels.shape[0] == 1
        # Only the answers and their end of turn are trained, nothing of the prompts.
        for row in labels:
            trained = tokenizer.decode(row[row != -100])
            assert re.fullmatch(r"( ?\d+<\|im_end\|>\n?)+", trained), trained
        model = trainer.model
        model.train()
        loop = Loop(hf.precision_of(trainer), 1, 0.0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        ours = train(model, optimizer, iter([batch]), [0.0], loop, progress=False).records[0]
        with torch.no_grad():
            theirs = trainer.compute_loss(model, dict(batch)).item()
        assert ours.loss == pytest.approx(theirs, rel=1e-5)
    finally:
        unload(trainer)


def _rng() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


@pytest.mark.parametrize(("mode", "packing"), [("ramp", False), ("probe", False), ("probe", True)])
def test_find_lr_leaves_the_sfttrainer_as_it_was(
    base: LlamaForCausalLM, tokenizer: Any, tmp_path: Path, mode: str, packing: bool
) -> None:
    args = sft_config(
        tmp_path, assistant_only_loss=True, gradient_accumulation_steps=2, packing=packing
    )
    trainer = sft_trainer(base, tokenizer, chat_rows(40), args)
    try:
        model = trainer.model
        assert trainer.optimizer is None
        weights = trainable_state(model)
        rng = _rng()
        length = {"steps": 10} if mode == "ramp" else {"runs": 3}
        result = hf.find_lr(
            trainer, mode=mode, start_lr=1e-4, end_lr=1.0, progress=False, **length
        )
        assert len(result.curve.lrs) == (10 if mode == "ramp" else 3)
        assert result.config.train.grad_accum == 2
        assert trainer.optimizer is None  # it had none: it still has none
        assert trainer.model is model and model.training
        for name, value in trainable_state(model).items():
            assert torch.equal(value, weights[name]), name
        after = _rng()
        assert torch.equal(after[0], rng[0]) and after[1] == rng[1]
        assert np.array_equal(after[2], rng[2])

        # With an optimizer that has state, as after some training: kept exactly.
        trainer.create_optimizer()
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.compute_loss(model, dict(batch)).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        weights = trainable_state(model)
        state = {
            k: {n: t.clone() for n, t in v.items()}
            for k, v in trainer.optimizer.state_dict()["state"].items()
        }
        hf.find_lr(trainer, mode=mode, start_lr=1e-4, end_lr=1.0, progress=False, **length)
        for name, value in trainable_state(model).items():
            assert torch.equal(value, weights[name]), name
        for key, value in trainer.optimizer.state_dict()["state"].items():
            for n, t in value.items():
                assert torch.equal(t, state[key][n])
        # And it still trains as SFTTrainer does.
        trainer.args.max_steps = 2
        trainer.train()
        assert trainer.state.global_step == 2
    finally:
        unload(trainer)


def _has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


class _Start(TrainerCallback):
    """Each trial's adapter when its training begins: LoRA B (zero when fresh) and A."""

    def __init__(self, trainer: SFTTrainer, seen: list[tuple[float, float]]) -> None:
        self.trainer, self.seen = trainer, seen

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        weights = trainable_state(self.trainer.model)
        b = sum(float(w.abs().sum()) for n, w in weights.items() if "lora_B" in n)
        a = sum(float(w.sum()) for n, w in weights.items() if "lora_A" in n)
        self.seen.append((b, a))


def test_sweep_and_export_on_sfttrainer(
    base: LlamaForCausalLM,
    tokenizer: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = chat_rows(40)
    adapters: list[PeftModel] = []
    starts: list[tuple[float, float]] = []

    def make_trainer(overrides: dict[str, Any]) -> SFTTrainer:
        # One shared base: the previous trial's adapter comes off before the next goes on
        # (hf.sweep drops trainer.model after the trial, so the adapter is kept here).
        while adapters:
            adapters.pop().unload()
        assert not _has_lora(base)
        args = sft_config(
            tmp_path,
            assistant_only_loss=True,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            seed=0,
            max_length=96,
            **overrides,
        )
        trainer = sft_trainer(base, tokenizer, rows, args)
        trainer.add_callback(_Start(trainer, starts))
        adapters.append(trainer.model)
        return trainer

    try:
        study = hf.sweep(
            make_trainer,
            tmp_path / "sweep",
            max_steps=10,
            peak_lr=(1e-3, 1e-1),
            trials=3,
            eval_every=5,
            confirm_top=0,  # the three trials only: best_trial below is the export's pick
            progress=False,
        )
    finally:
        while adapters:
            adapters.pop().unload()
    assert not _has_lora(base)
    # A fresh adapter in every trial, the same one (hf.sweep seeds before make_trainer).
    assert len(starts) == 3 and all(b == 0.0 for b, _ in starts)
    assert len({a for _, a in starts}) == 1
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 3
    trials, curves, meta = load_results(tmp_path / "sweep")
    assert meta["config"]["train"]["batch_size"] == 2
    # The adapter and length the trials ran (SFTTrainer's peft_config, SFTConfig's max_length),
    # which export writes for Axolotl and LLaMA-Factory.
    assert meta["config"]["train"]["seq_len"] == 96
    lora = meta["config"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (4, 8, 0.0)
    assert lora["target_modules"] == ["q_proj", "v_proj"]
    assert meta["config"]["train"]["grad_accum"] == 2
    for _, t in trials.iterrows():
        expected = Schedule(t["peak_lr"], 10, t["warmup_fraction"], t["min_lr_ratio"]).lrs()
        got = curves[curves["number"] == t["number"]]["lr"].tolist()
        assert len(got) >= 5 and got == expected[: len(got)]

    # `lrsweep export` loads into SFTConfig and gives the trial's LR at every step.
    capsys.readouterr()
    code, out, err = run_cli(
        capsys, monkeypatch, "export", str(tmp_path / "sweep"), "--format", "json"
    )
    assert code == 0, err
    kwargs = json.loads(out)
    assert kwargs == training_arguments(best_trial(trials), _config(meta))
    args = SFTConfig(output_dir=str(tmp_path / "final"), report_to="none", use_cpu=True, **kwargs)
    assert not args.bf16 and not args.fp16  # the trial ran in float32, not SFTConfig's bf16
    assert args.per_device_train_batch_size == 2 and args.gradient_accumulation_steps == 2
    trainer = sft_trainer(base, tokenizer, rows, args)
    try:
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        lrs = []
        for _ in range(args.max_steps):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
    finally:
        unload(trainer)
    best = best_trial(trials)
    assert (
        lrs == Schedule(best["peak_lr"], 10, best["warmup_fraction"], best["min_lr_ratio"]).lrs()
    )
    recorded = curves[curves["number"] == best["number"]]["lr"].tolist()
    assert len(recorded) == 10 and lrs == recorded  # the best trial ran to the end


def _config(meta: dict[str, Any]) -> Any:
    from lrsweep.config import from_dict

    return from_dict(meta["config"])


@pytest.mark.slow
def test_sft_trl_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/sft_trl.py: find -> sweep -> export -> SFTConfig(**export) -> train."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import sft_trl

    summary = sft_trl.main(["--tiny", "--out", str(tmp_path)])
    assert summary["trials"] == 3
    assert summary["export"]["learning_rate"] == summary["learning_rate"]
    # The export's run is the best trial again: same adapter start, data order and schedule.
    assert summary["final_eval_loss"] == pytest.approx(summary["trial_eval_loss"], abs=1e-4)
