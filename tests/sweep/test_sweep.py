from __future__ import annotations

import dataclasses
import gc
import weakref
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from lrsweep.config import DEFAULT_STUDY, RangeTestConfig
from lrsweep.errors import StudyError
from lrsweep.find import load_find
from lrsweep.horizon import (
    CALIBRATION_STEPS,
    KNOWN_DATA_DROP,
    PROBE_HELD_OUT,
    known_data,
    lowest_factor,
)
from lrsweep.record import StudyRecord
from lrsweep.results import read_parquet
from lrsweep.suggest import MethodResult, Suggestion
from lrsweep.sweep import plan as plan_mod
from lrsweep.sweep import trial as trial_mod
from lrsweep.sweep import worker as worker_mod
from lrsweep.sweep.collect import load_results
from lrsweep.sweep.plan import execute, prepare_sweep
from lrsweep.sweep.space import peak_lr_bounds, worker_seed
from tests.conftest import run_cli, tiny_config


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


# ---------------------------------------------------------------- pure parts


def _found(rec: float | None, divergence: float | None) -> Suggestion:
    return Suggestion(
        rec,
        (rec / 3, rec * 3) if rec else None,
        divergence,
        {"valley": MethodResult(rec, None if rec else "flat curve")},
        None if rec else "flat curve",
    )


def test_bounds_follow_the_documented_rule() -> None:
    cfg = tiny_config()
    assert peak_lr_bounds(cfg, _found(1e-3, 2e-2)) == pytest.approx((1e-4, 2e-2))
    # Never diverged: up to the highest LR tested.
    assert peak_lr_bounds(cfg, _found(1e-3, None), 1e-1) == pytest.approx((1e-4, 1e-1))
    # A wide interval alone changes nothing; trials past the calibration's length and data
    # the model already knows reach further down, as the interval does for them.
    wide = dataclasses.replace(_found(1e-3, 2e-2), interval=(1e-6, 3e-3))
    assert peak_lr_bounds(cfg, wide) == pytest.approx((1e-4, 2e-2))
    longer = peak_lr_bounds(cfg, wide, steps=10 * CALIBRATION_STEPS)
    assert longer == pytest.approx((1e-4 * 10**-0.75, 2e-2))
    known = peak_lr_bounds(cfg, wide, steps=CALIBRATION_STEPS, best_drop=KNOWN_DATA_DROP / 2)
    assert known == pytest.approx((1e-3 / PROBE_HELD_OUT, 2e-2))
    assert peak_lr_bounds(cfg, wide, best_drop=KNOWN_DATA_DROP) == pytest.approx((1e-4, 2e-2))
    assert peak_lr_bounds(tiny_config("search.peak_lr=[1e-5, 1e-3]"), None) == (1e-5, 1e-3)
    with pytest.raises(StudyError, match="search.peak_lr: the range test gave no"):
        peak_lr_bounds(cfg, _found(None, None))


def test_worker_seeds_differ_per_worker_and_restart() -> None:
    seeds = {worker_seed(0, w, n) for w in ("a:1", "a:2", "b:1") for n in (0, 5)}
    assert len(seeds) == 6
    assert worker_seed(0, "a:1", 5) == worker_seed(0, "a:1", 5)


# ---------------------------------------------------------------- whole sweeps


def test_sweep_runs_the_budget_and_resumes_without_adding_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config()
    prepared = prepare_sweep(cfg, tmp_path, trials=3, progress=False)
    study = execute(prepared, progress=False)
    assert len(_finished(study)) == 3
    # The range test ran first, and its recommendation was the first trial.
    found = load_find(tmp_path)
    assert found is not None
    assert study.trials[0].params["peak_lr"] == pytest.approx(found.recommended_lr)
    assert study.trials[0].user_attrs["origin"] == "range test recommendation"
    # The same budget again: nothing to do. A larger one: only the difference.
    study = execute(prepare_sweep(cfg, tmp_path, trials=3, progress=False), progress=False)
    assert len(study.trials) == 3
    # The planned run stays the study's: a resume that sets another is told so.
    later = ("planned.max_steps=500",)
    prepared = prepare_sweep(None, tmp_path, overrides=later, trials=5, progress=False)
    assert "the study keeps the planned run it was made with" in caplog.text
    study = execute(prepared, progress=False)
    assert len(_finished(study)) == 5 and len(study.trials) == 5
    params = [tuple(t.params.values()) for t in study.trials]
    assert len(set(params)) == len(params)


def test_parquet_matches_the_storage_after_every_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = prepare_sweep(tiny_config(), tmp_path, trials=4, progress=False)
    study = prepared.plan.study
    checked: list[int] = []
    real_write = worker_mod.write_results

    def write_and_check(*args: Any) -> None:
        real_write(*args)
        trials, meta = read_parquet(tmp_path / "trials.parquet")
        curves, _ = read_parquet(tmp_path / "curves.parquet")
        stored = study.get_trials()
        assert trials["number"].tolist() == [t.number for t in stored]
        assert trials["state"].tolist() == [t.state.name for t in stored]
        frozen = stored[-1]
        if frozen.state == TrialState.RUNNING:
            return  # the final write at exit sees no new trial
        row = trials.set_index("number").loc[frozen.number]
        assert row["peak_lr"] == frozen.params["peak_lr"]
        assert row["warmup_steps"] == frozen.user_attrs["warmup_steps"]
        if frozen.state == TrialState.COMPLETE:
            assert row["eval_loss"] == frozen.value
        mine = curves[curves["number"] == frozen.number]
        assert mine["lr"].tolist() == frozen.user_attrs["curve"]["lr"]
        assert meta["config"] == prepared.ctx.config.to_dict()
        checked.append(frozen.number)

    monkeypatch.setattr(worker_mod, "write_results", write_and_check)
    execute(prepared, progress=False)
    # After every trial, and once more at exit.
    assert checked == [0, 1, 2, 3, 3]


def test_trial_lrs_are_transformers_schedule(tmp_path: Path) -> None:
    execute(
        prepare_sweep(tiny_config("sweep.steps=20"), tmp_path, trials=2, progress=False),
        progress=False,
    )
    trials, curves, _ = load_results(tmp_path)
    from lrsweep.schedules import Schedule

    for _, t in trials.iterrows():
        expected = Schedule(t["peak_lr"], 20, t["warmup_fraction"], t["min_lr_ratio"]).lrs()
        assert curves[curves["number"] == t["number"]]["lr"].tolist() == expected
        assert t["warmup_steps"] == -(-t["warmup_fraction"] * 20 // 1)  # ceil


@pytest.mark.parametrize("torch_before_2_8", [False, True])
def test_a_failing_trial_is_recorded_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_before_2_8: bool
) -> None:
    if torch_before_2_8:  # no torch.AcceleratorError: the handler must not raise itself
        monkeypatch.delattr(torch, "AcceleratorError")
    real = plan_mod.run_trial

    def flaky(ctx, trial, schedule, progress=True, watchers=(), start=None):  # type: ignore[no-untyped-def]
        if trial.number == 1:
            raise ValueError("injected failure")
        if trial.number == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(ctx, trial, schedule, progress, watchers, start)

    monkeypatch.setattr(plan_mod, "run_trial", flaky)
    study = execute(
        prepare_sweep(tiny_config(), tmp_path, trials=3, progress=False), progress=False
    )
    states = {t.number: t.state for t in study.trials}
    assert states[1] == TrialState.FAIL and states[2] == TrialState.FAIL
    assert study.trials[1].user_attrs["reason"] == "ValueError: injected failure"
    assert study.trials[2].user_attrs["reason"].startswith("out of memory: CUDA out of memory")
    assert len(_finished(study)) == 3  # FAIL trials do not count against the budget
    trials, _, _ = load_results(tmp_path)
    assert trials.set_index("number").loc[1, "reason"] == "ValueError: injected failure"


def test_a_tracker_that_fails_to_start_fails_its_trial_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its store unreachable once: that trial fails, the adapter still comes off the shared
    base, and the next trials run (they failed with 'the base model still carries an
    adapter' before)."""

    class Flaky:
        def start(self, trial: Any, run: Any) -> None:
            if trial.number == 1:
                raise ConnectionError("tracking server unreachable")

        def step(self, record: Any) -> None:
            pass

        def end(self, model: Any, run: Any, finished: bool) -> None:
            pass

    monkeypatch.setattr(plan_mod, "make_trackers", lambda *a: [Flaky()])
    study = execute(
        prepare_sweep(tiny_config(), tmp_path, trials=3, progress=False), progress=False
    )
    states = [t.state for t in study.trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert study.trials[1].user_attrs["reason"] == "ConnectionError: tracking server unreachable"


def test_nan_trial_is_pruned_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trial_mod.attach_lora

    def poisoned(base, lora, seed):  # type: ignore[no-untyped-def]
        model = real(base, lora, seed)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
        return model

    monkeypatch.setattr(trial_mod, "attach_lora", poisoned)
    study = execute(
        prepare_sweep(
            tiny_config("search.peak_lr=[1e-3, 1e-2]"), tmp_path, trials=1, progress=False
        ),
        progress=False,
    )
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["reason"].startswith("non-finite loss at step 0")


def test_median_pruner_stops_bad_trials(tmp_path: Path) -> None:
    cfg = tiny_config("search.peak_lr=[1e-7, 1e-1]", "sweep.steps=16", "sweep.eval_every=4")
    prepared = prepare_sweep(cfg, tmp_path, trials=6, progress=False)
    study = prepared.plan.study
    for lr in (3e-2, 2e-2, 3e-2, 1e-7, 2e-7):
        study.enqueue_trial({"peak_lr": lr, "warmup_fraction": 0.0, "min_lr_ratio": 0.0})
    execute(prepared, progress=False)
    by_lr = {t.params["peak_lr"]: t for t in study.trials}
    for lr in (1e-7, 2e-7):
        assert by_lr[lr].state == TrialState.PRUNED
        assert by_lr[lr].user_attrs["reason"].startswith("pruned by the median pruner")
        assert len(by_lr[lr].user_attrs["curve"]["lr"]) < 16


def test_a_trial_that_ran_every_step_is_never_pruned(tmp_path: Path) -> None:
    """Its last evaluation is its objective. Here the only one past the pruner's warmup is
    the last (step 6; step 4 is warmup): the worse trials end COMPLETE, not PRUNED."""
    cfg = tiny_config("search.peak_lr=[1e-7, 1e-1]", "sweep.steps=6", "sweep.eval_every=4")
    prepared = prepare_sweep(cfg, tmp_path, trials=6, progress=False)
    for lr in (3e-2, 2e-2, 3e-2, 1e-7, 2e-7, 1e-7):
        prepared.plan.study.enqueue_trial(
            {"peak_lr": lr, "warmup_fraction": 0.0, "min_lr_ratio": 0.0}
        )
    study = execute(prepared, progress=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6


def test_a_budget_of_one_trial_runs_one(tmp_path: Path) -> None:
    """The range test's number is the first trial; the baseline would be a second."""
    study = execute(
        prepare_sweep(tiny_config("sweep.baseline_lr=1e-2"), tmp_path, trials=1, progress=False),
        progress=False,
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_trial_memory_is_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refs: list[weakref.ref[Any]] = []
    attach, make_opt = trial_mod.attach_lora, trial_mod.make_optimizer

    def tracked_attach(*args: Any) -> Any:
        model = attach(*args)
        refs.append(weakref.ref(model))
        return model

    def tracked_optimizer(*args: Any) -> Any:
        opt = make_opt(*args)
        refs.append(weakref.ref(opt))
        return opt

    monkeypatch.setattr(trial_mod, "attach_lora", tracked_attach)
    monkeypatch.setattr(trial_mod, "make_optimizer", tracked_optimizer)
    prepared = prepare_sweep(
        tiny_config("search.peak_lr=[1e-3, 1e-2]"), tmp_path, trials=3, progress=False
    )
    execute(prepared, progress=False)
    gc.collect()
    assert len(refs) == 6
    assert all(ref() is None for ref in refs)  # adapters and optimizers were freed
    # The base model carries no adapter layers afterwards.
    assert not any("lora" in n for n, _ in prepared.ctx.base.model.named_modules())


def test_export_reproduces_the_trial_in_a_trainer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from lrsweep.export import best_trial, training_arguments

    cfg = tiny_config(
        "search.peak_lr=[1e-3, 1e-2]", "search.warmup_fraction=[0.1, 0.3]", "sweep.steps=23"
    )
    execute(prepare_sweep(cfg, tmp_path, trials=2, progress=False), progress=False)
    trials, curves, meta = load_results(tmp_path)
    best = best_trial(trials)
    kwargs = training_arguments(best, cfg)
    # The warmup as the found fraction, which transformers 5 reads as ceil(fraction x steps).
    assert kwargs["warmup_steps"] == best["warmup_fraction"] and kwargs["warmup_steps"] >= 0.1
    assert "optim" not in kwargs  # the Trainer's own AdamW default, or the user's optimizer
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], **kwargs)
    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    lrs = []
    for _ in range(args.max_steps):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == curves[curves["number"] == best["number"]]["lr"].tolist()


def test_dry_run_creates_no_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import ROOT

    tiny = str(ROOT / "studies" / "tiny.toml")

    def dry_run(out: Path, *extra: str) -> tuple[int, str, str]:
        return run_cli(
            capsys, monkeypatch, "sweep", tiny, "--out", str(out), "--dry-run", "-q", *extra
        )

    code, out, err = dry_run(tmp_path)
    assert code == 0, err
    assert out.startswith("Estimate: 4 trials x 12 steps, after the range test")
    probe = RangeTestConfig().runs * RangeTestConfig().run_steps
    assert f"(probe: {probe} optimizer steps" in out
    code, out, _ = dry_run(tmp_path, "--set", "rangetest.seeds=2")
    assert code == 0 and f"(probe: {2 * probe} optimizer steps" in out  # each seed's probe
    # It plans, and writes nothing: no study, and no range test run for the bounds.
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    code, out, err = run_cli(capsys, monkeypatch, "find", tiny, "--out", str(tmp_path), "-q")
    assert code == 0, err
    code, out, err = dry_run(tmp_path)
    assert code == 0 and "s/step" in out and "peak_lr in [" in out, out
    assert not (tmp_path / "study.journal").exists()
    # Trials far longer than the ones the range test was saved for: the bounds reach below a
    # tenth of the number as far as the interval reaches for them.
    found = load_find(tmp_path)
    assert found is not None and found.recommended_lr is not None
    low, high = found.sweep_bounds(2000)
    below = PROBE_HELD_OUT if known_data(found.curve.best_drop) else 10  # the tiny model's is
    assert low == pytest.approx(found.recommended_lr / below * lowest_factor(2000))
    code, out, err = dry_run(tmp_path, "--set", "sweep.steps=2000")
    assert code == 0 and f"peak_lr in [{low:.2e}, {high:.2e}]" in out, out
    # A sweep that would run a range test of its own refuses to replace a different one.
    saved = (tmp_path / "suggestion.json").read_bytes()
    for extra in ((), ("--dry-run",)):
        other = ("--set", "rangetest.runs=4", "-q", *extra)
        code, _, err = run_cli(capsys, monkeypatch, "sweep", tiny, "--out", str(tmp_path), *other)
        assert code == 2 and "another rangetest" in err and err.count("\n") == 1, err
    assert (tmp_path / "suggestion.json").read_bytes() == saved
    assert not (tmp_path / "study.journal").exists()
    code, out, err = dry_run(tmp_path / "fixed", "--set", "search.peak_lr=[1e-4, 1e-2]")
    # Fixed bounds: no range test ran, so no step was timed, and the estimate says so.
    assert code == 0, err
    assert "time per step not measured yet" in out and "nan" not in out


def test_changed_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import ROOT

    tiny = str(ROOT / "studies" / "tiny.toml")
    assert (
        run_cli(capsys, monkeypatch, "sweep", tiny, "--out", str(tmp_path), "--trials", "1", "-q")[
            0
        ]
        == 0
    )
    code, _, err = run_cli(
        capsys, monkeypatch, "sweep", tiny, "--set", "lora.r=2", "--out", str(tmp_path), "-q"
    )
    assert code == 2 and "different lora" in err and err.count("\n") == 1
    # A dry run plans with another budget and leaves the study's own as it was.
    code, out, err = run_cli(
        capsys, monkeypatch, "sweep", tiny, "--out", str(tmp_path), "--trials", "5", "--dry-run"
    )
    assert code == 0 and out.startswith("Estimate: 4 trials"), err  # 5 less the one done
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
    )
    study = optuna.load_study(study_name=DEFAULT_STUDY, storage=journal)
    assert StudyRecord.of(study).trials == 1


def test_one_study_per_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second study in a folder would overwrite the first one's trial-numbered files: it is
    refused before anything runs. Studies of a shared storage each have their own folder."""
    from tests.conftest import ROOT

    def sweep(out: Path, *extra: str) -> tuple[int, str, str]:
        fixed = ("--set", "search.peak_lr=[1e-4, 1e-2]", "--trials", "1", "-q")
        tiny = str(ROOT / "studies" / "tiny.toml")
        return run_cli(capsys, monkeypatch, "sweep", tiny, "--out", str(out), *fixed, *extra)

    first = tmp_path / "first"
    assert sweep(first)[0] == 0
    before = (first / "trials.parquet").read_bytes()
    code, _, err = sweep(first, "--study", "other", "--set", "search.peak_lr=[]")
    assert code == 2 and f"holds study '{DEFAULT_STUDY}'" in err and err.count("\n") == 1, err
    # Nothing ran for it: no range test for its bounds, no study, the files as they were.
    assert not (first / "rangetest.parquet").exists()
    assert (first / "trials.parquet").read_bytes() == before
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(first / "study.journal"))
    )
    assert optuna.get_all_study_names(journal) == [DEFAULT_STUDY]
    shared = str(tmp_path / "shared.journal")
    for name in ("a", "b"):
        code, _, err = sweep(tmp_path / name, "--storage", shared, "--study", name)
        assert code == 0, err


def test_report_reads_past_lagging_results_and_reap_rebuilds_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    execute(prepare_sweep(tiny_config(), tmp_path, trials=3, progress=False), progress=False)
    (tmp_path / "trials.parquet").unlink()
    code, out, err = run_cli(capsys, monkeypatch, "report", str(tmp_path))
    assert code == 0, err
    assert "3 complete" in out or "pruned" in out
    for name in ("sweep_lr.png", "sweep_top5.png", "sweep_progress.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "trials.parquet").exists()  # a report only reads
    code, out, err = run_cli(capsys, monkeypatch, "reap", str(tmp_path))
    assert code == 0 and "No stale trials." in out, err
    trials, _ = read_parquet(tmp_path / "trials.parquet")
    assert len(trials) == 3
    code, out, _ = run_cli(capsys, monkeypatch, "export", str(tmp_path), "--format", "python")
    assert code == 0 and "TrainingArguments(" in out and "warmup_steps=" in out
    assert run_cli(capsys, monkeypatch, "report", str(tmp_path / "none"))[0] == 2


def test_empty_results_have_the_schema(tmp_path: Path) -> None:
    from lrsweep.results import CURVE_COLUMNS, TRIAL_COLUMNS, curves_frame, trials_frame

    assert trials_frame([]).columns.tolist() == list(TRIAL_COLUMNS)
    assert curves_frame([]).columns.tolist() == list(CURVE_COLUMNS)
    assert isinstance(trials_frame([]), pd.DataFrame)


@pytest.mark.parametrize(("sampler", "pruner"), [("random", "hyperband"), ("gp", "none")])
def test_other_samplers_and_pruners(tmp_path: Path, sampler: str, pruner: str) -> None:
    cfg = tiny_config(
        "search.peak_lr=[1e-3, 1e-1]", f"sweep.sampler={sampler}", f"sweep.pruner={pruner}"
    )
    prepared = prepare_sweep(cfg, tmp_path, trials=3, progress=False)
    study = execute(prepared, progress=False)
    assert len(_finished(study)) == 3
    expected = {"random": optuna.samplers.RandomSampler, "gp": optuna.samplers.GPSampler}
    assert isinstance(study.sampler, expected[sampler])
    assert isinstance(
        study.pruner,
        {"hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}[pruner],
    )


def test_a_cause_that_fails_every_trial_stops_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ctx, trial, schedule, progress=True, watchers=(), start=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("batch does not fit")

    monkeypatch.setattr(plan_mod, "run_trial", broken)
    prepared = prepare_sweep(
        tiny_config("search.peak_lr=[1e-3, 1e-2]"), tmp_path, trials=3, progress=False
    )
    with pytest.raises(StudyError, match="5 trials in a row failed .*batch does not fit"):
        execute(prepared, progress=False)
    assert [t.state for t in prepared.plan.study.trials] == [TrialState.FAIL] * 5


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///study.db", "unsupported scheme 'sqlite'"),
        ("redis://user:hunter2@host/0", "unsupported scheme 'redis'"),
        # Connecting is retried for 30 s before it gives up.
        pytest.param(
            "postgresql://user:hunter2@127.0.0.1:1/db", "cannot connect", marks=pytest.mark.slow
        ),
    ],
)
def test_bad_storage_urls_are_one_line_without_the_password(
    tmp_path: Path,
    url: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.conftest import ROOT

    code, _, err = run_cli(
        capsys,
        monkeypatch,
        "sweep",
        str(ROOT / "studies" / "tiny.toml"),
        "--storage",
        url,
        "--out",
        str(tmp_path),
        "--dry-run",
    )
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert "hunter2" not in err


def test_a_trial_out_of_memory_runs_again_with_half_the_micro_batch(tmp_path: Path) -> None:
    from lrsweep.export import best_trial, training_arguments

    cfg = tiny_config("search.peak_lr=[1e-3, 1e-2]", "sweep.steps=8", "sweep.eval_every=4")
    prepared = prepare_sweep(cfg, tmp_path, trials=1, progress=False)
    net = prepared.ctx.base.model
    real_forward = net.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[0] > 2 and net.training:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(*args, **kwargs)

    net.forward = forward  # type: ignore[method-assign]
    study = execute(prepared, progress=False)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["micro_batch_size"] == 2 and trial.user_attrs["grad_accum"] == 2
    assert trial.user_attrs["oom_retries"] == 1
    trials, _, _ = load_results(tmp_path)
    kwargs = training_arguments(best_trial(trials), cfg)
    assert kwargs["per_device_train_batch_size"] == 2
    assert kwargs["gradient_accumulation_steps"] == 2
