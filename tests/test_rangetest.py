from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from lrsweep.config import RangeTestConfig
from lrsweep.context import prepare
from lrsweep.data import batches
from lrsweep.errors import ConfigError
from lrsweep.models import attach_lora, detach_lora, trainable_state
from lrsweep.rangetest import (
    RangeTestCurve,
    combine_seeds,
    probe_lrs,
    run_probes,
    run_range_test,
)
from lrsweep.schedules import ramp
from lrsweep.suggest import probe_as_good, probe_diverged, suggest_probe
from lrsweep.training import Loop, Precision, make_optimizer, train
from tests.conftest import tiny_config


CPU = Precision(torch.device("cpu"), torch.float32)


@pytest.fixture
def trained():  # type: ignore[no-untyped-def]
    """A tiny LoRA model a few steps into training, so the optimizer has state."""
    ctx = prepare(tiny_config())
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    opt = make_optimizer(model, ctx.config.train)
    train(
        model,
        opt,
        batches(ctx.blocks.train, 4, seed=0),
        [1e-3] * 3,
        Loop(CPU, 1, 1.0),
        progress=False,
    )
    yield ctx, model, opt
    detach_lora(model)


def _state(model, opt):  # type: ignore[no-untyped-def]
    return (
        trainable_state(model),
        {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()},
        [g["lr"] for g in opt.param_groups],
        torch.get_rng_state(),
        random.getstate(),
        # The whole state: the key array changes only every 624 draws, the position each draw.
        np.random.get_state(),
    )


def _assert_same(a, b) -> None:  # type: ignore[no-untyped-def]
    weights_a, opt_a, lrs_a, rng_a, py_a, np_a = a
    weights_b, opt_b, lrs_b, rng_b, py_b, np_b = b
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name  # bit-identical
    for key in opt_a:
        for n in opt_a[key]:
            assert torch.equal(opt_a[key][n], opt_b[key][n])
    assert lrs_a == lrs_b
    assert torch.equal(rng_a, rng_b) and py_a == py_b
    assert np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and np_a[2:] == np_b[2:]


def test_range_test_leaves_weights_optimizer_and_rng_as_they_were(trained) -> None:  # type: ignore[no-untyped-def]
    ctx, model, opt = trained
    before = _state(model, opt)
    cfg = RangeTestConfig(start_lr=1e-4, end_lr=1.0, steps=15)
    curve = run_range_test(
        model,
        opt,
        batches(ctx.blocks.train, 4, seed=1),
        cfg,
        Loop(CPU, 1, 1.0),
        probe=ctx.blocks.eval,
        progress=False,
    )
    assert len(curve.lrs) == 15
    assert curve.lrs == pytest.approx(ramp(1e-4, 1.0, 15))
    _assert_same(before, _state(model, opt))


def test_range_test_restores_state_when_it_fails_midway(trained) -> None:  # type: ignore[no-untyped-def]
    ctx, model, opt = trained
    before = _state(model, opt)
    source = batches(ctx.blocks.train, 4, seed=1)

    def failing():  # type: ignore[no-untyped-def]
        for i, batch in enumerate(source):
            if i == 6:
                raise RuntimeError("disk vanished")
            yield batch

    with pytest.raises(RuntimeError, match="disk vanished"):
        run_range_test(
            model,
            opt,
            failing(),
            RangeTestConfig(steps=20),
            Loop(CPU, 1, 1.0),
            probe=ctx.blocks.eval,
            progress=False,
        )
    _assert_same(before, _state(model, opt))


def test_range_test_stops_at_a_non_finite_loss(trained) -> None:  # type: ignore[no-untyped-def]
    ctx, model, opt = trained
    before = _state(model, opt)
    source = batches(ctx.blocks.train, 4, seed=1)

    def poisoning():  # type: ignore[no-untyped-def]
        for i, batch in enumerate(source):
            if i == 8:  # the weights turn to NaN before step 8
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(
                        float("nan")
                    )
            yield batch

    curve = run_range_test(
        model,
        opt,
        poisoning(),
        RangeTestConfig(steps=40, signal="train"),
        Loop(CPU, 1, 1.0),
        progress=False,
    )
    assert curve.stop_reason is not None and curve.stop_reason.startswith("non-finite")
    assert len(curve.lrs) == 9 and np.isnan(curve.losses[-1])
    assert curve.frame().columns.tolist() == [
        "step",
        "lr",
        "loss",
        "smoothed_loss",
        "train_loss",
        "tokens",
        "seconds",
    ]
    _assert_same(before, _state(model, opt))


def _probes(ctx, model, opt, cfg: RangeTestConfig):  # type: ignore[no-untyped-def]
    return run_probes(
        model,
        opt,
        batches(ctx.blocks.train, 4, seed=1),
        cfg,
        Loop(CPU, 1, 1.0),
        probe=ctx.blocks.eval,
        eval_every=2,
        progress=False,
    )


def test_probe_runs_start_alike_and_leave_no_trace(trained) -> None:  # type: ignore[no-untyped-def]
    ctx, model, opt = trained
    before = _state(model, opt)
    wide = _probes(
        ctx, model, opt, RangeTestConfig(start_lr=1e-3, end_lr=1e-1, runs=3, run_steps=4)
    )
    _assert_same(before, _state(model, opt))
    # Another set of LRs: each run starts from the same state on the same batches, so a run's
    # loss depends on its own LR only, not on the runs before it.
    narrow = _probes(
        ctx, model, opt, RangeTestConfig(start_lr=1e-2, end_lr=1e0, runs=3, run_steps=4)
    )
    assert wide.lrs[1:] == pytest.approx(narrow.lrs[:2])
    assert wide.losses[1:] == narrow.losses[:2]
    # eval every 2 of 4 steps
    assert [r[:2] for r in wide.run_losses[1:]] == narrow.run_losses[:2]
    assert len(wide.run_losses[0]) == 2 and wide.run_losses[0][-1] == wide.losses[0]
    assert wide.mode == "probe" and wide.start_loss is not None
    assert all(loss < wide.start_loss for loss in wide.losses)


def test_probe_goes_up_to_divergence_and_down_to_the_interval_s_edge(trained) -> None:  # type: ignore[no-untyped-def]
    ctx, model, opt = trained
    cfg = RangeTestConfig(start_lr=1e-3, end_lr=1e3, runs=7, run_steps=3)
    curve = _probes(ctx, model, opt, cfg)
    assert curve.stop_reason is not None and "diverged" in curve.stop_reason
    assert curve.lrs == sorted(curve.lrs) and len(curve.lrs) < 7
    start, best = curve.start_loss, min(curve.losses)
    assert probe_diverged(curve.losses[-1], start, best)
    # Downwards it stopped at the first run out of the interval: 1e-3 never ran.
    assert curve.lrs[0] > cfg.start_lr and not probe_as_good(curve.losses[0], start, best)
    assert all(probe_as_good(v, start, best) for v in curve.losses[1 : curve.losses.index(best)])
    # The runs it skipped change nothing: with the 1e-3 run added (each run depends on its own
    # LR only), the suggestion is the same.
    low = _probes(
        ctx, model, opt, RangeTestConfig(start_lr=1e-4, end_lr=1e-2, runs=3, run_steps=3)
    )
    assert low.lrs[1] == pytest.approx(1e-3)
    full = suggest_probe([low.lrs[1], *curve.lrs], [low.losses[1], *curve.losses], start)
    assert suggest_probe(curve.lrs, curve.losses, start) == full


def test_probe_lrs_hold_then_fall_to_the_first_trials_floor() -> None:
    assert probe_lrs(1e-3, 3, 0) == [1e-3] * 3
    lrs = probe_lrs(1e-3, 2, 3)
    assert lrs[:2] == [1e-3, 1e-3] and lrs[-1] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(7e-4) and lrs[3] == pytest.approx(4e-4)


def test_cosine_probe_runs_are_the_first_trials_schedule_in_miniature() -> None:
    lrs = probe_lrs(1e-3, 12, 0, "cosine")
    # transformers' warmup: ceil(5 % of 12) = 1 step at LR 0, then the peak, then cosine.
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert 1e-4 < lrs[-1] < 1.2e-4  # towards the first trial's floor, a tenth


def test_cosine_probe_refuses_a_cooldown() -> None:
    with pytest.raises(ConfigError, match="rangetest.cooldown_steps"):
        RangeTestConfig(run_schedule="cosine", cooldown_steps=2)
    with pytest.raises(ConfigError, match="rangetest.run_schedule"):
        RangeTestConfig(run_schedule="linear")
    with pytest.raises(ConfigError, match="rangetest.seeds: must be at least 1"):
        RangeTestConfig(seeds=0)


def test_probe_cooldown_runs_on_from_the_fixed_lr_steps(trained) -> None:  # type: ignore[no-untyped-def]
    ctx, model, opt = trained
    before = _state(model, opt)
    cfg = RangeTestConfig(start_lr=1e-3, end_lr=1e-1, runs=3, run_steps=4, run_schedule="constant")
    fixed = _probes(ctx, model, opt, cfg)
    cooled = _probes(ctx, model, opt, dataclasses.replace(cfg, cooldown_steps=2))
    _assert_same(before, _state(model, opt))
    # The same 4 fixed-LR steps on the same batches, then 2 more, scored at the end.
    assert [r[:2] for r in cooled.run_losses] == fixed.run_losses
    assert all(len(r) == 3 for r in cooled.run_losses)
    assert cooled.losses == [r[-1] for r in cooled.run_losses] != fixed.losses
    assert cooled.spent_steps == 3 * 6


def _curve(lrs: list[float], losses: list[float], stop: str | None = None) -> RangeTestCurve:
    return RangeTestCurve(
        lrs,
        losses,
        losses,
        losses,
        [10 * (i + 1) for i in range(len(lrs))],
        [1.0 * (i + 1) for i in range(len(lrs))],
        stop,
        0.5,
        "probe",
        3 * len(lrs),
        3.0,
    )


def test_seeds_combine_on_the_lrs_they_all_ran() -> None:
    # Each seed went out from the middle to its own edges: the first diverged at 1e-1.
    a = _curve([1e-4, 1e-3, 1e-2, 1e-1], [2.9, 2.7, 2.8, 3.5], "diverged at lr 0.1")
    b = _curve([1e-3, 1e-2, 1e-1, 1.0], [2.8, 2.6, 2.9, 4.0], "diverged at lr 1")
    both = combine_seeds([a, b])
    assert both.lrs == [1e-3, 1e-2, 1e-1]
    assert both.seed_losses == [[2.7, 2.8], [2.8, 2.6], [3.5, 2.9]]
    assert both.losses == pytest.approx([2.75, 2.7, 3.2])
    assert both.stop_reason == "diverged at lr 0.1" and both.optimizer_steps == 24
    # Both seeds' runs at each LR kept (10 tokens each), cumulative.
    assert both.tokens == [20, 40, 60] and both.seconds == [2.0, 4.0, 6.0]
    assert combine_seeds([a]) is a
