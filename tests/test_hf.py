"""The Trainer integration: lrsweep on the user's own transformers.Trainer."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from lrsweep import hf
from lrsweep.config import LoraSettings
from lrsweep.context import Context, prepare
from lrsweep.data import batches
from lrsweep.errors import ConfigError, StudyError
from lrsweep.models import attach_lora, detach_lora, trainable_state
from lrsweep.schedules import Schedule
from lrsweep.sweep.collect import load_results
from lrsweep.training import Loop, make_optimizer, train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def ctx() -> Context:
    return prepare(tiny_config("lora.dropout=0.0"))


class Blocks(Dataset):  # type: ignore[type-arg]
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class InOrder(IterableDataset):  # type: ignore[type-arg]
    """The exact block order of lrsweep's own loop (a Trainer does not shuffle these)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int, n: int) -> None:
        self.args = blocks, batch_size, seed, n

    def __iter__(self):  # type: ignore[no-untyped-def]
        blocks, batch_size, seed, n = self.args
        for _, batch in zip(range(n), batches(blocks, batch_size, seed), strict=False):
            for block in batch:
                yield {"input_ids": block, "labels": block}


def _args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        disable_tqdm=True,
        save_strategy="no",
        **kw,
    )


@pytest.mark.parametrize("mode", ["ramp", "probe"])
def test_find_lr_leaves_the_trainer_as_it_was(ctx: Context, tmp_path: Path, mode: str) -> None:
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        trainer = Trainer(
            model=model,
            args=_args(tmp_path, gradient_accumulation_steps=2),
            train_dataset=Blocks(ctx.blocks.train),
            eval_dataset=Blocks(ctx.blocks.eval),
        )
        trainer.create_optimizer()
        # An optimizer with state, as after some training.
        model(input_ids=ctx.blocks.train[:2], labels=ctx.blocks.train[:2]).loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        weights = trainable_state(model)
        state = {
            k: {n: t.clone() for n, t in v.items()}
            for k, v in trainer.optimizer.state_dict()["state"].items()
        }
        # Each mode's own length; the other mode's is refused, naming the key and the mode.
        # The probe twice: its second seed runs on the Trainer's next batches.
        length = {"steps": 12} if mode == "ramp" else {"runs": 3, "seeds": 2}
        other = {"runs": 3} if mode == "ramp" else {"steps": 12}
        with pytest.raises(ConfigError, match=f"has no effect in {mode} mode"):
            hf.find_lr(trainer, mode=mode, progress=False, **other)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="probe_batches="):
            hf.find_lr(trainer, mode=mode, progress=False, probe_blocks=2)
        result = hf.find_lr(
            trainer,
            start_lr=1e-4,
            end_lr=1.0,
            mode=mode,
            out=tmp_path / "f",
            progress=False,
            **length,  # type: ignore[arg-type]
        )
        assert result.curve.mode == mode
        assert len(result.curve.lrs) == (12 if mode == "ramp" else 3)
        if mode == "probe":
            seed_losses = result.curve.seed_losses
            assert seed_losses is not None and all(a != b for a, b in seed_losses)
            assert set(result.suggestion.methods) >= {"seed 0", "seed 1"}
        assert (tmp_path / "f" / "suggestion.json").exists()
        assert result.config.train.grad_accum == 2
        # The number is for the Trainer's own run: 3 epochs (its default) of 4 x 2 rows.
        run = result.for_run()
        assert run["source"] == "the Trainer's arguments" and run["epochs"] == 3.0
        assert run["steps"] == math.ceil(3 * len(ctx.blocks.train) / 8)
        for name, value in trainable_state(model).items():
            assert torch.equal(value, weights[name])
        for key, value in trainer.optimizer.state_dict()["state"].items():
            for n, t in value.items():
                assert torch.equal(t, state[key][n])
    finally:
        detach_lora(model)


def test_find_lr_without_optimizer_leaves_none(ctx: Context, tmp_path: Path) -> None:
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        trainer = Trainer(
            model=model,
            args=_args(tmp_path, max_steps=500),
            train_dataset=Blocks(ctx.blocks.train),
        )
        result = hf.find_lr(trainer, steps=10, progress=False)
        assert trainer.optimizer is None
        # max_steps wins over the epochs, as in the Trainer.
        assert result.for_run()["steps"] == 500 and result.for_run()["epochs"] == 0
        assert result.config.rangetest.signal == "train"  # no eval set: training loss
        with pytest.raises(StudyError, match="eval_dataset"):
            hf.find_lr(trainer, steps=10, mode="probe", progress=False)
    finally:
        detach_lora(model)


def test_native_loop_and_trainer_agree(ctx: Context, tmp_path: Path) -> None:
    """Same model, data order, seed and schedule for 20 optimizer steps: the same LR at every
    step, and losses within 1e-4 (float32; README states the tolerance)."""
    schedule = Schedule(3e-3, 20, 0.1, 0.1)
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        native = train(
            model,
            make_optimizer(model, ctx.config.train),
            batches(ctx.blocks.train, 4, seed=0),
            schedule.lrs(),
            Loop(hf.Precision(torch.device("cpu"), torch.float32), 2, 1.0),
            progress=False,
        )
    finally:
        detach_lora(model)
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        overrides = hf.training_overrides(
            schedule, eval_every=100, output_dir=tmp_path / "t", keep_checkpoints=False
        )
        overrides.update(eval_strategy="no", gradient_accumulation_steps=2)
        trainer = Trainer(
            model=model,
            args=_args(
                tmp_path,
                **{
                    k: v
                    for k, v in overrides.items()
                    if k not in ("report_to", "disable_tqdm", "save_strategy", "output_dir")
                },
            ),
            train_dataset=InOrder(ctx.blocks.train, 4, 0, 40),
        )
        lrs: list[float] = []

        from transformers import TrainerCallback

        class Lr(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
                lrs.append(trainer.lr_scheduler.get_last_lr()[0])

        trainer.add_callback(Lr())
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    finally:
        detach_lora(model)
    assert lrs == [r.lr for r in native.records] == schedule.lrs()
    assert len(losses) == 20
    for ours, theirs in zip([r.loss for r in native.records], losses, strict=True):
        assert math.isclose(ours, theirs, abs_tol=1e-4), (ours, theirs)


def _trainer_maker(
    ctx: Context,
    adapters: list[Any],
    *callbacks: TrainerCallback,
    eval_dataset: Any = "blocks",
    **changed: Any,
) -> Any:
    """hf.sweep's make_trainer on the tiny model: a fresh adapter on the shared base for every
    trial, the last one taken off first (peft stacks adapters on a base that still has one).
    ``changed``: TrainingArguments that a careless make_trainer puts over the overrides."""

    def make_trainer(overrides: dict[str, Any]) -> Trainer:
        if adapters:
            detach_lora(adapters.pop())
        model = attach_lora(ctx.base, ctx.config.lora, seed=0)
        adapters.append(model)
        args = TrainingArguments(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            per_device_eval_batch_size=8,
            use_cpu=True,
            report_to="none",  # the user's own, next to the overrides
            **{**overrides, **changed},
        )
        return Trainer(
            model=model,
            args=args,
            train_dataset=Blocks(ctx.blocks.train),
            eval_dataset=Blocks(ctx.blocks.eval) if eval_dataset == "blocks" else eval_dataset,
            callbacks=list(callbacks),
        )

    return make_trainer


def test_sweep_runs_the_users_trainer(ctx: Context, tmp_path: Path) -> None:
    adapters: list[Any] = []
    seeds: list[int] = []

    class SeedOf(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seeds.append(args.seed)

    make_trainer = _trainer_maker(ctx, adapters, SeedOf())
    settings: dict[str, Any] = dict(max_steps=12, peak_lr=(1e-3, 1e-1), eval_every=4)
    settings.update(confirm_top=1, confirm_seeds=1, progress=False)
    try:
        study = hf.sweep(make_trainer, tmp_path, trials=3, **settings)
        # Called again without trials=, the study keeps its budget: nothing left to run.
        again = hf.sweep(make_trainer, tmp_path, **settings)
        assert len(again.trials) == len(study.trials) == 4
    finally:
        for model in adapters:
            detach_lora(model)
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 4
    trials, curves, meta = load_results(tmp_path)
    assert len(trials) == 4 and meta["config"]["model"]["path"] == "trainer"
    # Every trial ran with the study's seed (the one the export writes), the best trial again
    # with a new one: the Trainer's data order and dropout too. The first step's loss (before
    # any update, LoRA's B at zero) depends on nothing else.
    (confirmation,) = trials[trials["confirms"].notna()].itertuples()
    assert seeds == [42, 42, 42, 1] and confirmation.seed == 1
    first = curves[curves["step"] == 0].set_index("number")["loss"]
    originals = first.drop(confirmation.number)
    assert originals.nunique() == 1 and first[confirmation.number] != originals.iloc[0]
    # The study describes the user's TrainingArguments, so the export reproduces them.
    assert meta["config"]["train"]["batch_size"] == 2
    assert meta["config"]["lora"]["r"] == ctx.config.lora.r != LoraSettings().r
    assert meta["config"]["train"]["grad_accum"] == 2
    for _, t in trials.iterrows():
        expected = Schedule(t["peak_lr"], 12, t["warmup_fraction"], t["min_lr_ratio"]).lrs()
        got = curves[curves["number"] == t["number"]]["lr"].tolist()
        assert len(got) >= 4 and got == expected[: len(got)]
        evals = curves[(curves["number"] == t["number"]) & curves["eval_loss"].notna()]
        assert evals["step"].tolist()[0] == 3  # evaluated after 4 steps
    # What a trial of lrsweep's own loop records: tokens (4 rows a step) and memory.
    assert (trials["tokens"] >= 4 * ctx.config.train.seq_len).all()
    assert (trials["peak_memory_mb"] > 0).all()
    # No checkpoints or trial folders left behind.
    assert not any((tmp_path / "trials").glob("*/*"))


@pytest.mark.parametrize(
    ("eval_dataset", "changed", "said"),
    [
        (None, {}, "make_trainer(overrides) raised ValueError"),
        ({"a": 1, "b": 2}, {}, "2 eval datasets (a, b)"),
        ("blocks", {"logging_strategy": "no"}, "did not log every step"),
        ("blocks", {"logging_strategy": "epoch"}, "did not log every step"),
        ("blocks", {"eval_delay": 100}, "did not log every step"),
    ],
)
def test_a_trainer_that_cannot_score_a_trial_stops_the_sweep_at_its_first(
    ctx: Context, tmp_path: Path, eval_dataset: Any, changed: dict[str, Any], said: str
) -> None:
    adapters: list[Any] = []
    make_trainer = _trainer_maker(ctx, adapters, eval_dataset=eval_dataset, **changed)
    try:
        with pytest.raises(StudyError, match=re.escape(said)):
            hf.sweep(
                make_trainer,
                tmp_path,
                max_steps=12,
                peak_lr=(1e-3, 1e-1),
                eval_every=4,
                trials=3,
                progress=False,
            )
    finally:
        for model in adapters:
            detach_lora(model)
    trials, _, _ = load_results(tmp_path)
    assert trials["state"].tolist() == ["FAIL"]  # one trial, not five


def test_find_lr_refuses_what_it_cannot_measure_or_save(ctx: Context, tmp_path: Path) -> None:
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    train = Blocks(ctx.blocks.train[:3])
    try:
        two = Trainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=train,
            eval_dataset={"a": Blocks(ctx.blocks.eval), "b": Blocks(ctx.blocks.eval)},
        )
        with pytest.raises(StudyError, match="2 eval datasets"):
            hf.find_lr(two, progress=False)
        # 3 rows, batches of 4 without the last one: no batch at all (it used to spin).
        empty = Trainer(
            model=model,
            args=_args(tmp_path, dataloader_drop_last=True),
            train_dataset=train,
            eval_dataset=Blocks(ctx.blocks.eval),
        )
        with pytest.raises(StudyError, match="yields no batch"):
            hf.find_lr(empty, mode="ramp", steps=10, progress=False)
        (tmp_path / "afile").write_text("")
        fine = Trainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=train,
            eval_dataset=Blocks(ctx.blocks.eval),
        )
        with pytest.raises(StudyError, match="afile is a file"):
            hf.find_lr(fine, out=tmp_path / "afile" / "find", progress=False)
    finally:
        detach_lora(model)


def test_a_diverging_trainer_trial_is_stopped_as_lrsweep_s_own_are() -> None:
    """The tiny model's loss saturates instead of diverging, so the Trainer's log is fed here."""
    from transformers import TrainerControl, TrainerState

    from lrsweep.config import SweepConfig
    from lrsweep.sweep.trial import TrialRun

    run = TrialRun(Schedule(1e-3, 10, 0.0, 0.1))
    watch = hf._Watch(None, None, run, SweepConfig(diverge_factor=2.0), prune=True)  # type: ignore[arg-type]
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate([3.0, 3.5, 5.0, 9.0, 20.0, 40.0, 80.0], start=1):
        state.global_step = step
        watch.on_log(None, state, control, logs={"loss": loss})
        if control.should_training_stop:
            break
    assert run.reason is not None and run.reason.startswith("diverged at step")
    assert len(run.records) < 7
