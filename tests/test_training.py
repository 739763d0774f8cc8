from __future__ import annotations

import itertools

import pytest
import torch

from lrsweep.context import prepare
from lrsweep.errors import DataError
from lrsweep.models import attach_lora, detach_lora, trainable_state
from lrsweep.training import Loop, Precision, make_optimizer, train
from tests.conftest import tiny_config


CPU = Precision(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def ctx():  # type: ignore[no-untyped-def]
    return prepare(tiny_config("lora.dropout=0.0"))


def _fixed(blocks: torch.Tensor, size: int):  # type: ignore[no-untyped-def]
    """Micro-batches of ``size`` blocks in order, repeating."""
    return (blocks[i : i + size] for i in itertools.cycle(range(0, 8, size)))


def _one_step(ctx, batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return _sgd_step(ctx, _fixed(ctx.blocks.train, batch_size), grad_accum)[0]


def _sgd_step(ctx, batches, grad_accum: int):  # type: ignore[no-untyped-def]
    """The adapter after one SGD step at LR 1 over ``grad_accum`` of ``batches``, and the
    loop's result."""
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        # SGD: the update is the gradient itself, so the comparison is not blurred by Adam's
        # normalisation of near-zero gradients.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        result = train(model, opt, batches, [1.0], Loop(CPU, grad_accum, 1.0), progress=False)
        return trainable_state(model), result
    finally:
        detach_lora(model)


def test_grad_accumulation_matches_the_full_batch(ctx) -> None:  # type: ignore[no-untyped-def]
    whole = _one_step(ctx, batch_size=4, grad_accum=1)
    accumulated = _one_step(ctx, batch_size=2, grad_accum=2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6)


def test_a_micro_batch_with_no_trained_token_adds_nothing(ctx) -> None:  # type: ignore[no-untyped-def]
    """A Trainer's micro-batch whose answers were all cut off (every label -100) adds 0 to
    the step, as the Trainer's summed loss does, not NaN; a step with no trained token at
    all is the data's fault, and says so (every run on those batches would stop there)."""
    ids = ctx.blocks.train[:2]
    trained = {"input_ids": ids, "labels": ids.clone()}
    empty = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    alone, _ = _sgd_step(ctx, iter([trained]), 1)
    both, result = _sgd_step(ctx, iter([trained, empty]), 2)
    assert result.stop_reason is None and torch.isfinite(torch.tensor(result.records[0].loss))
    for name, value in alone.items():
        torch.testing.assert_close(both[name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="step 0: its batches have no trained token"):
        _sgd_step(ctx, iter([empty, empty]), 2)


def test_each_step_uses_its_lr_and_evaluates_on_schedule(ctx) -> None:  # type: ignore[no-untyped-def]
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    seen: list[float] = []
    opt = make_optimizer(model, ctx.config.train)

    def watch(record):  # type: ignore[no-untyped-def]
        seen.append(opt.param_groups[0]["lr"])
        return None

    lrs = [1e-4 * (i + 1) for i in range(7)]
    try:
        result = train(
            model,
            opt,
            _fixed(ctx.blocks.train, 4),
            lrs,
            Loop(CPU, 1, 1.0),
            eval_blocks=ctx.blocks.eval,
            eval_every=3,
            on_step=watch,
            progress=False,
        )
    finally:
        detach_lora(model)
    assert result.stop_reason is None
    assert [r.lr for r in result.records] == lrs == seen
    assert [r.step for r in result.records if r.eval_loss is not None] == [2, 5, 6]
    assert result.records[-1].tokens == 7 * 4 * ctx.config.train.seq_len


def test_gradients_are_clipped_to_max_grad_norm(ctx) -> None:  # type: ignore[no-untyped-def]
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        # Make lora_B non-zero so that every LoRA weight gets a gradient.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        before = trainable_state(model)
        params = [p for p in model.parameters() if p.requires_grad]
        sgd = torch.optim.SGD(params, lr=1.0)
        result = train(
            model,
            sgd,
            _fixed(ctx.blocks.train, 4),
            [1.0],
            Loop(CPU, 1, 0.01),
            progress=False,
        )
        after = trainable_state(model)
    finally:
        detach_lora(model)
    step = torch.cat([(after[k] - before[k]).flatten() for k in before]).norm().item()
    assert result.records[0].grad_norm > 0.01  # the norm before clipping
    assert step == pytest.approx(0.01, rel=1e-3)


def test_non_finite_loss_stops_before_the_update(ctx) -> None:  # type: ignore[no-untyped-def]
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        opt = make_optimizer(model, ctx.config.train)
        result = train(
            model,
            opt,
            _fixed(ctx.blocks.train, 4),
            [1e-3] * 5,
            Loop(CPU, 1, 1.0),
            progress=False,
            on_step=lambda r: _poison(model) if r.step == 1 else None,
        )
        grads = [p.grad for p in model.parameters() if p.requires_grad]
    finally:
        detach_lora(model)
    assert result.stop_reason is not None and result.stop_reason.startswith("non-finite loss")
    assert len(result.records) == 2  # steps 0 and 1 ran; step 2 saw NaN and stopped
    assert all(g is None for g in grads)  # the broken step's gradients were dropped


def _poison(model: torch.nn.Module) -> None:
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_paths_train(ctx, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    # CPU autocast runs the same code path as CUDA: bf16 autocast, fp16 autocast + GradScaler.
    precision = Precision(torch.device("cpu"), dtype)
    assert (precision.scaler is not None) == (dtype == torch.float16)
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        before = trainable_state(model)
        opt = make_optimizer(model, ctx.config.train)
        result = train(
            model,
            opt,
            _fixed(ctx.blocks.train, 4),
            [1e-2] * 3,
            Loop(precision, 2, 1.0),
            eval_blocks=ctx.blocks.eval,
            eval_every=3,
            progress=False,
        )
        after = trainable_state(model)
    finally:
        detach_lora(model)
    assert result.stop_reason is None and result.records[-1].eval_loss is not None
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())  # adapters stay fp32


def test_an_update_the_grad_scaler_skips_does_not_advance_the_schedule(ctx) -> None:  # type: ignore[no-untyped-def]
    """float16: a scale so large that the first step's gradients overflow, then one that
    fits. The Trainer steps its scheduler only after an update, so a trial's second step runs
    at the first step's LR again; a range test's LRs go on (a ramp's must increase)."""
    lrs = {}
    for hold in (True, False):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)
        precision = Precision(torch.device("cpu"), torch.float16, scaler)
        model = attach_lora(ctx.base, ctx.config.lora, seed=0)
        try:
            result = train(
                model,
                make_optimizer(model, ctx.config.train),
                _fixed(ctx.blocks.train, 4),
                [1e-3, 2e-3, 3e-3],
                Loop(precision, 1, 1.0),
                progress=False,
                hold_on_skip=hold,
            )
        finally:
            detach_lora(model)
        assert scaler.get_scale() == 2.0**10  # one overflow, then no more
        lrs[hold] = [r.lr for r in result.records]
    assert lrs == {True: [1e-3, 1e-3, 2e-3], False: [1e-3, 2e-3, 3e-3]}


def test_tokens_count_what_was_trained_on_not_padding(ctx) -> None:  # type: ignore[no-untyped-def]
    """A padded batch (an instruction batch, a Trainer's) counts its real tokens only, so
    that tokens and tokens/s are not inflated by padding."""
    ids = ctx.blocks.train[:2].clone()
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # the first sequence is 10 tokens, the rest padding
    batch = {"input_ids": ids, "attention_mask": mask}
    model = attach_lora(ctx.base, ctx.config.lora, seed=0)
    try:
        result = train(
            model,
            make_optimizer(model, ctx.config.train),
            itertools.repeat(batch),
            [1e-3, 1e-3],
            Loop(CPU, 1, 1.0),
            progress=False,
        )
    finally:
        detach_lora(model)
    per_step = 10 + ids.shape[1]
    assert [r.tokens for r in result.records] == [per_step, 2 * per_step]
