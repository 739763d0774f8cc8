"""After the sweep: confirmation with fresh seeds, the kept adapter, schedule families,
LoRA+, live tracking and the report's recommendation, on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from optuna.trial import TrialState

from lrsweep.find import find_lr
from lrsweep.sweep import plan as plan_mod
from lrsweep.sweep.collect import load_results
from lrsweep.sweep.plan import execute, prepare_sweep
from tests.conftest import run_cli, tiny_config


FIXED = "search.peak_lr=[1e-3, 3e-2]"


def _trainer_lrs(args: Any, model: torch.nn.Module, optimizer: Any = None) -> list[list[float]]:
    """Every parameter group's LR at each step of a Trainer built from the export."""
    from transformers import Trainer

    trainer = Trainer(model=model, args=args, optimizers=(optimizer, None))
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    lrs = []
    for _ in range(args.max_steps):
        lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return lrs


# ---------------------------------------------------------------- 1 and 6: seeds, report


def test_confirmation_runs_resume_and_the_report_says_what_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(
        "search.peak_lr=[1e-4, 3e-2]",
        "sweep.confirm_top=2",
        "sweep.confirm_seeds=2",
        "sweep.baseline_lr=2e-4",
        "sweep.pruner=none",
    )
    find_lr(cfg, out=tmp_path, progress=False)  # the first trial is its recommendation
    prepared = prepare_sweep(cfg, tmp_path, trials=3, progress=False)
    assert "3 trials + 4 confirmation runs" in prepared.estimate()
    # The third confirmation run is interrupted: it is queued again with its seed.
    real, calls = plan_mod.run_trial, []

    def interrupted(ctx, trial, schedule, progress=True, watchers=(), start=None):  # type: ignore[no-untyped-def]
        if "confirms" in trial.user_attrs:
            calls.append(trial.number)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(ctx, trial, schedule, progress, watchers, start)

    monkeypatch.setattr(plan_mod, "run_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(prepared, progress=False)
    study = execute(prepare_sweep(None, tmp_path, progress=False), progress=False)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    confirmations = [t for t in done if "confirms" in t.user_attrs]
    assert len(done) == 7 and len(confirmations) == 4
    originals = [t for t in done if "confirms" not in t.user_attrs]
    top = sorted(originals, key=lambda t: t.value)[:2]
    got = {(t.user_attrs["confirms"], t.user_attrs["seed"]) for t in confirmations}
    assert got == {(t.number, s) for t in top for s in (1, 2)}
    assert study.trials[1].user_attrs["origin"] == "common default 0.0002"
    assert study.trials[1].params["peak_lr"] == 2e-4
    # The seed reached the run: the same schedule trains differently.
    by_number = {t.number: t for t in study.trials}
    for t in confirmations:
        assert t.params == by_number[t.user_attrs["confirms"]].params
        assert t.value != by_number[t.user_attrs["confirms"]].value
    trials, _, _ = load_results(tmp_path)
    assert trials["confirms"].notna().sum() == 4 + 1  # the interrupted one, as FAIL

    capsys.readouterr()
    code, out, err = run_cli(capsys, monkeypatch, "report", str(tmp_path))
    assert code == 0, err
    head = out.split("\n")[0]
    assert head.startswith("Use: cosine schedule, peak LR") and "over 3 seeds" in head
    assert "the seed noise of one run is" in head
    first_guess = "the range test's first guess (trial 0"
    assert first_guess in head or "(trial 0, the range test recommendation)" in head
    assert "the common default (trial 1" in head
    assert "Configurations over seeds" in out
    code, out, err = run_cli(capsys, monkeypatch, "export", str(tmp_path))
    assert code == 0 and "best mean eval loss" in err and "runner-up" in err
    means = {
        t.number: sum(
            c.value for c in done if t.number in (c.number, c.user_attrs.get("confirms"))
        )
        for t in top
    }
    assert f"trial {min(means, key=means.__getitem__)}:" in err


# ---------------------------------------------------------------- 2: adapters


def test_the_best_adapter_is_kept_and_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel

    from lrsweep.models import load_base_model
    from lrsweep.training import Precision, evaluate

    cfg = tiny_config(FIXED, "sweep.save_adapters=best", "sweep.pruner=none")
    prepared = prepare_sweep(cfg, tmp_path, trials=3, progress=False)
    study = execute(prepared, progress=False)
    best = study.best_trial
    link = tmp_path / "adapters" / "best"
    assert link.is_symlink() and link.resolve().name == f"trial-{best.number}"
    assert [p.name for p in (tmp_path / "adapters").glob("trial-*")] == [f"trial-{best.number}"]
    assert (link / "adapter_config.json").is_file()
    # The modes any new file gets (the umask), not mkdtemp's private ones.
    from lrsweep.results import umask

    assert link.resolve().stat().st_mode & 0o777 == 0o777 & ~umask()
    assert {p.stat().st_mode & 0o777 for p in link.resolve().iterdir()} == {0o666 & ~umask()}
    # Loadable with peft on a fresh base: the same eval loss as the trial.
    base = load_base_model(cfg.model, cfg.train, cfg.seed)
    model = PeftModel.from_pretrained(base.model, str(link))
    loss = evaluate(model, prepared.ctx.blocks.eval, 8, Precision(base.device, base.dtype))
    assert loss == pytest.approx(best.value, abs=1e-5)
    code, out, err = run_cli(capsys, monkeypatch, "export", str(tmp_path), "--adapter")
    assert code == 0, err
    assert str(link.resolve()) in out and f"trial {best.number}" in out and " KB" in out


def test_all_adapters_are_kept(tmp_path: Path) -> None:
    cfg = tiny_config(FIXED, "sweep.save_adapters=all", "sweep.pruner=none")
    study = execute(prepare_sweep(cfg, tmp_path, trials=2, progress=False), progress=False)
    names = sorted(p.name for p in (tmp_path / "adapters").glob("trial-*"))
    assert names == [f"trial-{t.number}" for t in study.trials]
    assert (tmp_path / "adapters" / "best").resolve().name == f"trial-{study.best_trial.number}"
    assert not list((tmp_path / "adapters").glob(".*"))  # no temporary folder left


# ---------------------------------------------------------------- 3: schedule families


@pytest.mark.parametrize("family", ["cosine", "linear", "constant", "wsd"])
def test_each_schedule_family_exports_to_a_trainer(tmp_path: Path, family: str) -> None:
    from transformers import TrainingArguments

    from lrsweep.export import recommendation, training_arguments

    cfg = tiny_config(
        FIXED,
        f"search.schedule=['{family}']",
        "search.warmup_fraction=[0.1, 0.3]",
        "search.min_lr_ratio=[0.1, 0.3]",
        "sweep.steps=23",
    )
    execute(prepare_sweep(cfg, tmp_path, trials=1, progress=False), progress=False)
    trials, curves, _ = load_results(tmp_path)
    best = recommendation(trials).best.row
    assert best["schedule"] == family
    kwargs = training_arguments(best, cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], **kwargs)
    lrs = [g[0] for g in _trainer_lrs(args, torch.nn.Linear(2, 2))]
    ours = curves[curves["number"] == best["number"]]["lr"].tolist()
    assert lrs == ours
    if family == "constant":
        assert ours[-1] == best["peak_lr"]
    if family == "linear":
        assert ours[-1] < ours[math.ceil(kwargs["warmup_steps"] * len(ours))] / 10


def test_the_export_states_the_dtype_the_trials_ran_in(tmp_path: Path) -> None:
    import dataclasses

    from lrsweep.export import recommendation, training_arguments

    cfg = tiny_config(FIXED, "train.dtype=bfloat16")
    execute(prepare_sweep(cfg, tmp_path, trials=1, progress=False), progress=False)
    trials, _, _ = load_results(tmp_path)
    best = recommendation(trials).best.row
    assert best["dtype"] == "bfloat16"
    # A study's "auto" is bf16 or fp16 only on CUDA, at run time: the export says what ran.
    auto = cfg.replace(train=dataclasses.replace(cfg.train, dtype="auto"))
    assert training_arguments(best, auto)["bf16"] is True


def test_the_schedule_family_is_a_search_dimension(tmp_path: Path) -> None:
    cfg = tiny_config(FIXED, "search.schedule=['cosine', 'linear']", "sweep.sampler=random")
    study = execute(prepare_sweep(cfg, tmp_path, trials=4, progress=False), progress=False)
    assert {t.params["schedule"] for t in study.trials} <= {"cosine", "linear"}
    trials, _, _ = load_results(tmp_path)
    assert trials["schedule"].tolist() == [t.params["schedule"] for t in study.trials]
    linear = trials[trials["schedule"] == "linear"]
    assert (linear["min_lr"] == 0).all()  # linear decays to 0: no floor


@pytest.mark.parametrize(
    ("families", "floor_searched"),
    [(["linear"], False), (["constant", "linear"], False), (["linear", "wsd"], True)],
)
def test_min_lr_ratio_is_searched_only_for_families_with_a_floor(
    tmp_path: Path, families: list[str], floor_searched: bool
) -> None:
    cfg = tiny_config(FIXED, f"search.schedule={families}", "sweep.sampler=random")
    study = execute(prepare_sweep(cfg, tmp_path, trials=2, progress=False), progress=False)
    assert all(("min_lr_ratio" in t.params) == floor_searched for t in study.trials)


# ---------------------------------------------------------------- 4: LoRA+


@pytest.mark.parametrize("built_at", ["lrsweep", "user"])
def test_loraplus_b_groups_get_ratio_times_the_lr(tiny: Any, built_at: str) -> None:
    """lrsweep's LoRA+ optimizer, and one a user built with peft at their own LR (a
    Trainer's, in hf.find_lr): every step, B's groups at 16x the loop's LR, A's at it."""
    import dataclasses

    from peft.optimizers import create_loraplus_optimizer

    from lrsweep.context import prepare
    from lrsweep.data import batches
    from lrsweep.models import attach_lora, detach_lora
    from lrsweep.training import Loop, make_optimizer, train

    ctx = prepare(tiny)
    model = attach_lora(ctx.base, tiny.lora, 0)
    try:
        if built_at == "lrsweep":
            optimizer = make_optimizer(
                model, dataclasses.replace(tiny.train, loraplus_lr_ratio=16)
            )
        else:
            optimizer = create_loraplus_optimizer(
                model, torch.optim.AdamW, lr=3e-4, loraplus_lr_ratio=16
            )
        names = {id(p): n for n, p in model.named_parameters()}
        seen: list[list[float]] = []
        lrs = [1e-3, 2e-3, 5e-4]
        train(
            model,
            optimizer,
            batches(ctx.blocks.train, 4, 0),
            lrs,
            Loop.of(tiny.train, ctx.precision),
            on_step=lambda r: seen.append([g["lr"] for g in optimizer.param_groups]) and None,
            progress=False,
        )
        checked = 0
        for step, lr in enumerate(lrs):
            for group, got in zip(optimizer.param_groups, seen[step], strict=True):
                kinds = {"lora_B" in names[id(p)] for p in group["params"]}
                if kinds:
                    assert got == pytest.approx(16 * lr if kinds == {True} else lr, rel=1e-12)
                    checked += 1
        assert checked == 2 * len(lrs)  # the A group and the B group, at every step
    finally:
        detach_lora(model)


def test_hf_sweep_gives_the_trainer_the_trials_loraplus_optimizer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from lrsweep import hf
    from lrsweep.context import prepare
    from lrsweep.models import attach_lora, detach_lora
    from tests.test_hf import Blocks

    ctx = prepare(tiny_config())
    adapters: list[Any] = []
    seen: list[tuple[float, list[float]]] = []

    def make_trainer(overrides: dict[str, Any]) -> Trainer:
        if adapters:
            detach_lora(adapters.pop())
        adapters.append(attach_lora(ctx.base, ctx.config.lora, 0))
        args = TrainingArguments(use_cpu=True, per_device_train_batch_size=4, **overrides)
        return Trainer(
            model=adapters[-1],
            args=args,
            train_dataset=Blocks(ctx.blocks.train),
            eval_dataset=Blocks(ctx.blocks.eval),
        )

    real = hf.loraplus_optimizer

    def spy(trainer: Trainer, ratio: float) -> Any:
        optimizer = real(trainer, ratio)
        seen.append((ratio, [g["lr"] for g in optimizer.param_groups]))
        return optimizer

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hf, "loraplus_optimizer", spy)
            study = hf.sweep(
                make_trainer,
                tmp_path,
                max_steps=4,
                peak_lr=(1e-3, 1e-2),
                loraplus_lr_ratio=(4, 16),
                trials=2,
                eval_every=2,
                confirm_top=0,
                progress=False,
            )
    finally:
        for model in adapters:
            detach_lora(model)
    for trial, (ratio, lrs) in zip(study.trials, seen, strict=True):
        assert ratio == trial.params["loraplus_lr_ratio"] and 4 <= ratio <= 16
        peak = trial.params["peak_lr"]
        assert lrs[0] == peak and lrs[2] == pytest.approx(ratio * peak)
    trials, _, _ = load_results(tmp_path)
    assert trials["loraplus_lr_ratio"].tolist() == [r for r, _ in seen]


def test_loraplus_is_searched_and_the_export_builds_the_same_optimizer(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from lrsweep.export import recommendation, to_python, training_arguments
    from lrsweep.models import attach_lora, detach_lora

    # With LoRA on the embeddings too: peft gives their group an absolute LR of its own.
    embeddings = "lora.target_modules=['q_proj', 'v_proj', 'embed_tokens']"
    cfg = tiny_config(FIXED, "search.loraplus_lr_ratio=[4, 32]", "sweep.steps=10", embeddings)
    prepared = prepare_sweep(cfg, tmp_path, trials=2, progress=False)
    study = execute(prepared, progress=False)
    assert all(4 <= t.params["loraplus_lr_ratio"] <= 32 for t in study.trials)
    trials, curves, _ = load_results(tmp_path)
    best = recommendation(trials).best.row
    ratio = best["loraplus_lr_ratio"]
    kwargs = training_arguments(best, cfg)
    snippet = to_python(kwargs, best)
    assert "create_loraplus_optimizer(" in snippet and f"loraplus_lr_ratio={ratio!r}" in snippet
    peft_model = attach_lora(prepared.ctx.base, cfg.lora, cfg.seed)
    try:
        scope: dict[str, Any] = {"peft_model": peft_model}
        exec(snippet, scope)  # noqa: S102 - the exported snippet, as a user pastes it
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], **kwargs)
        groups = _trainer_lrs(args, peft_model, scope["optimizer"])
    finally:
        detach_lora(peft_model)
    ours = curves[curves["number"] == best["number"]]["lr"].tolist()
    assert [g[0] for g in groups] == pytest.approx(ours, rel=1e-12)  # the A matrices
    assert [g[2] for g in groups] == pytest.approx([ratio * lr for lr in ours], rel=1e-12)
    assert [g[1] for g in groups] == pytest.approx([1e-6 * lr for lr in ours], rel=1e-12)


def test_the_range_test_honours_loraplus(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from lrsweep import find as find_mod

    made: list[Any] = []
    real = find_mod.measure

    def spy(model, optimizer, *args, **kwargs):  # type: ignore[no-untyped-def]
        made.append([g["lr"] for g in optimizer.param_groups])
        return real(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(find_mod, "measure", spy)
    find_lr(tiny_config("train.loraplus_lr_ratio=8", "rangetest.runs=3"), progress=False)
    assert made[0][0] == 1.0 and made[0][2] == 8.0  # B's group: 8 x the schedule's LR


def test_a_missing_tracker_or_dashboard_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from tests.conftest import ROOT

    real = importlib.util.find_spec
    missing = {"mlflow", "optuna_dashboard"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    args = ("sweep", str(ROOT / "studies" / "tiny.toml"), "--out", str(tmp_path / "s"), "-q")
    code, _, err = run_cli(capsys, monkeypatch, *args, "--set", "sweep.report_to=['mlflow']")
    assert code == 2 and "mlflow is not installed" in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()
    code, _, err = run_cli(capsys, monkeypatch, "dashboard", str(tmp_path))
    assert code == 2 and "optuna-dashboard is not installed" in err and err.count("\n") == 1


def test_new_keys_are_checked() -> None:
    from lrsweep.errors import ConfigError

    for override, message in [
        ("search.schedule=['cosine', 'step']", "search.schedule: unknown"),
        ("search.schedule=[]", "search.schedule: must name"),
        ("train.loraplus_lr_ratio=0", "train.loraplus_lr_ratio: must be positive"),
        ("search.loraplus_lr_ratio=[0, 4]", "search.loraplus_lr_ratio: bounds must be positive"),
        ("sweep.confirm_top=-1", "sweep.confirm_top: must be at least 0"),
        ("sweep.save_adapters=some", "sweep.save_adapters: must be best, all or none"),
        ("sweep.report_to=['neptune']", "sweep.report_to: unknown"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(override)


def test_a_worse_adapter_saved_meanwhile_never_replaces_a_better_one(tmp_path: Path) -> None:
    """Two workers: B finds no best yet and saves its adapter; while it saves, A finishes a
    better trial and points the link at it. B must then leave A's adapter the best."""
    import optuna

    from lrsweep.context import prepare
    from lrsweep.models import attach_lora, detach_lora
    from lrsweep.schedules import Schedule
    from lrsweep.sweep import adapters
    from lrsweep.sweep.trial import TrialRun
    from lrsweep.training import StepRecord

    ctx = prepare(tiny_config("sweep.save_adapters=best"))
    study = optuna.create_study()

    def keeper_and_run(loss: float) -> tuple[adapters.AdapterKeeper, TrialRun]:
        keeper = adapters.AdapterKeeper(tmp_path, ctx.config, ctx.base.tokenizer)
        run = TrialRun(Schedule(1e-3, 1, 0.0, 0.1))
        run.records.append(StepRecord(0, 1e-3, 5.0, 1.0, 8, 0.1, 0.1, eval_loss=loss))
        keeper.start(study.ask(), run)
        return keeper, run

    model = attach_lora(ctx.base, ctx.config.lora, 0)
    try:
        (a, run_a), (b, run_b) = keeper_and_run(1.0), keeper_and_run(2.0)
        save = adapters.save_adapter

        def a_finishes_meanwhile(*args: Any) -> Path:
            folder = save(*args)
            adapters.save_adapter = save
            a.end(model, run_a, finished=True)
            return folder

        adapters.save_adapter = a_finishes_meanwhile
        try:
            b.end(model, run_b, finished=True)
        finally:
            adapters.save_adapter = save
    finally:
        detach_lora(model)
    folder = tmp_path / "adapters"
    assert (folder / "best").resolve().name == "trial-0"
    assert sorted(p.name for p in folder.glob("trial-*")) == ["trial-0"]
