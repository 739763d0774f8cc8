"""Tests for lrsweep.oom: the out-of-memory retry, with an injected error on the CPU."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from lrsweep.config import LoraSettings, ModelConfig, TrainConfig
from lrsweep.data import batches
from lrsweep.models import BaseModel, attach_lora, detach_lora, load_base_model
from lrsweep.oom import (
    Attempt,
    OutOfMemory,
    halve,
    is_oom,
    run_with_retry,
    split_batch,
    split_batches,
)
from lrsweep.schedules import Schedule
from lrsweep.training import Loop, Precision, TrainResult, make_optimizer, train


CPU = torch.device("cpu")


def shapes(batch_size: int, grad_accum: int = 1) -> list[tuple[int, int]]:
    train: TrainConfig | None = TrainConfig(batch_size=batch_size, grad_accum=grad_accum)
    out = []
    while train is not None:
        out.append((train.batch_size, train.grad_accum))
        train = halve(train)
    return out


def test_halve_keeps_tokens_per_step() -> None:
    assert shapes(8) == [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert shapes(4, 3) == [(4, 3), (2, 6), (1, 12)]
    assert shapes(6) == [(6, 1), (3, 2), (1, 6)]
    assert shapes(12) == [(12, 1), (6, 2), (3, 4), (1, 12)]
    assert shapes(5, 2) == [(5, 2), (1, 10)]
    assert shapes(1, 4) == [(1, 4)]
    for size in range(1, 40):
        for b, a in shapes(size, 2):
            assert b * a == size * 2 and size % b == 0
    train = TrainConfig(batch_size=4, seq_len=64, max_grad_norm=0.5, device="cpu")
    smaller = halve(train)
    assert smaller == dataclasses.replace(train, batch_size=2, grad_accum=2)


def test_split_batch_tensor_and_mapping() -> None:
    ids = torch.arange(24).reshape(4, 6)
    pieces = split_batch(ids, 2)
    assert [p.shape for p in pieces] == [(2, 6), (2, 6)]
    assert torch.equal(torch.cat(pieces), ids)
    assert split_batch(ids, 1) == [ids]
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[3, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "num_items": 7, "scale": torch.tensor(2.0)}
    parts = split_batch(batch, 4)
    assert len(parts) == 4
    for i, part in enumerate(parts):
        assert torch.equal(part["input_ids"], ids[i : i + 1])
        assert torch.equal(part["attention_mask"], mask[i : i + 1])
        assert part["num_items"] == 7 and part["scale"] is batch["scale"]
    with pytest.raises(ValueError, match="4 rows into 3"):
        split_batch(ids, 3)
    with pytest.raises(ValueError, match="differ in rows"):
        split_batch({"input_ids": ids, "labels": ids[:2]}, 2)
    with pytest.raises(TypeError):
        split_batch([ids], 2)  # type: ignore[arg-type]


def test_split_batches_keeps_order() -> None:
    drawn = [torch.arange(i * 8, i * 8 + 8).reshape(4, 2) for i in range(3)]
    pieces = list(split_batches(iter(drawn), 4))
    assert len(pieces) == 12 and all(p.shape == (1, 2) for p in pieces)
    assert torch.equal(torch.cat(pieces), torch.cat(drawn))
    same = iter(drawn)
    assert split_batches(same, 1) is same
    with pytest.raises(ValueError):
        split_batches(iter(drawn), 0)


def test_is_oom() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ..."))
    assert is_oom(OutOfMemory("still", Attempt(TrainConfig())))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))
    # a CUDA error may leave the context broken: the process stops instead of retrying
    assert not is_oom(torch.AcceleratorError("CUDA error: out of memory"))


def oom(rows: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows")


def test_retry_halves_until_it_fits() -> None:
    seen: list[Attempt] = []
    retried: list[Attempt] = []

    def run(attempt: Attempt) -> str:
        seen.append(attempt)
        if attempt.train.batch_size > 2:
            raise oom(attempt.train.batch_size)
        return "done"

    train = TrainConfig(batch_size=8, grad_accum=2)
    result, used = run_with_retry(run, train, device="cpu", on_retry=retried.append)
    assert result == "done"
    assert [(a.train.batch_size, a.train.grad_accum, a.parts) for a in seen] == [
        (8, 2, 1),
        (4, 4, 2),
        (2, 8, 4),
    ]
    assert retried == seen[1:] and used == seen[-1]
    assert used.retries == 2 and "4 rows" in (used.reason or "")
    assert used.original_batch_size == 8
    assert used.facts() == {
        "micro_batch_size": 2,
        "grad_accum": 8,
        "oom_retries": 2,
        "oom_reason": "CUDA out of memory. Tried to allocate 4 rows",
    }
    first = run_with_retry(lambda a: a.train.batch_size, train, device=CPU)
    assert first == (8, Attempt(train)), "no error, no change"


def test_start_from_a_known_shape() -> None:
    train = TrainConfig(batch_size=8, grad_accum=1)
    calls: list[int] = []

    def run(attempt: Attempt) -> int:
        calls.append(attempt.train.batch_size)
        if attempt.train.batch_size > 1:
            raise oom(attempt.train.batch_size)
        return attempt.retries

    _, known = run_with_retry(run, train, device="cpu")
    assert calls == [8, 4, 2, 1] and known.retries == 3
    calls.clear()
    assert run_with_retry(run, train, device="cpu", start=known) == (3, known)
    assert calls == [1], "the next trial starts where the last one ended"
    with pytest.raises(ValueError, match="not a shape of"):
        run_with_retry(run, TrainConfig(batch_size=4), device="cpu", start=known)


def test_micro_batch_one_failing_reraises() -> None:
    calls: list[int] = []

    def run(attempt: Attempt) -> None:
        calls.append(attempt.train.batch_size)
        raise oom(attempt.train.batch_size)

    with pytest.raises(torch.OutOfMemoryError, match="micro-batch 1 x 12 accumulation") as info:
        run_with_retry(run, TrainConfig(batch_size=4, grad_accum=3), device="cpu")
    assert calls == [4, 2, 1]
    assert isinstance(info.value, OutOfMemory) and info.value.attempt.retries == 2
    assert "after 2 retries (from micro-batch 4)" in str(info.value)


def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    def run(attempt: Attempt) -> None:
        calls.append(attempt.train.batch_size)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        run_with_retry(run, TrainConfig(batch_size=4), device="cpu")
    assert calls == [4]


def test_memory_of_the_failed_attempt_is_freed_before_the_retry() -> None:
    refs: list[weakref.ref[torch.Tensor]] = []

    def run(attempt: Attempt) -> int:
        activations = torch.zeros(attempt.train.batch_size, 1000)
        refs.append(weakref.ref(activations))
        if attempt.train.batch_size > 1:
            raise oom(attempt.train.batch_size)
        return attempt.retries

    def check(attempt: Attempt) -> None:
        assert refs[-1]() is None, "the failed attempt's tensors are still referenced"

    assert run_with_retry(run, TrainConfig(batch_size=2), device="cpu", on_retry=check)[0] == 1


def test_rng_is_put_back_for_the_retry() -> None:
    draws: list[torch.Tensor] = []

    def run(attempt: Attempt) -> None:
        draws.append(torch.rand(3))  # dropout masks, say
        if attempt.train.batch_size > 1:
            raise oom(attempt.train.batch_size)

    torch.manual_seed(7)
    run_with_retry(run, TrainConfig(batch_size=4), device="cpu")
    assert len(draws) == 3 and all(torch.equal(d, draws[0]) for d in draws)


# --- the retry around the real training loop on the tiny model ---


class OOMAbove(nn.Module):
    """The model, but a training forward pass of more than ``rows`` rows runs out of memory
    after the real forward (its dropout draws and activations happened, as in a real OOM);
    evaluation (no grad, twice the micro-batch) fits."""

    def __init__(self, model: nn.Module, rows: int, after_calls: int = 0) -> None:
        super().__init__()
        self.model, self.rows, self.after_calls, self.calls = model, rows, after_calls, 0

    def forward(self, **inputs: torch.Tensor) -> object:
        out = self.model(**inputs)
        self.calls += 1
        rows = inputs["input_ids"].shape[0]
        if torch.is_grad_enabled() and rows > self.rows and self.calls > self.after_calls:
            raise oom(rows)
        return out


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_base_model(ModelConfig(path="tiny"), TrainConfig(device="cpu"), seed=0)


def _run(
    base: BaseModel,
    blocks: torch.Tensor,
    attempt: Attempt,
    limit: int | None = None,
    after_calls: int = 0,
) -> TrainResult:
    """One attempt as a trial runner would write it: a fresh adapter and optimizer, the
    batches drawn anew at the original batch size and split for the attempt."""
    torch.manual_seed(0)
    peft = attach_lora(base, LoraSettings(r=4, dropout=0.1), seed=0)
    model: nn.Module = peft if limit is None else OOMAbove(peft, limit, after_calls)
    try:
        drawn = batches(blocks, attempt.original_batch_size, seed=0)
        return train(
            model,
            make_optimizer(model, attempt.train),
            attempt.batches(drawn),
            Schedule(1e-2, 4, 0.25, 0.1).lrs(),
            Loop(
                Precision(CPU, torch.float32),
                attempt.train.grad_accum,
                1.0,
                attempt.train.batch_size * 2,
            ),
            eval_blocks=blocks[:4],
            eval_every=2,
            progress=False,
        )
    finally:
        detach_lora(peft)


def _curve(result: TrainResult) -> list[tuple[float, float, int, float | None]]:
    return [(r.loss, r.grad_norm, r.tokens, r.eval_loss) for r in result.records]


@pytest.mark.parametrize("after_calls", [0, 5])  # at the first forward, or steps later
def test_retried_training_equals_the_small_run_from_the_start(
    base: BaseModel, after_calls: int
) -> None:
    blocks = torch.randint(0, 256, (48, 16), generator=torch.Generator().manual_seed(1))
    train_cfg = TrainConfig(batch_size=4, grad_accum=2, device="cpu")
    retried, used = run_with_retry(
        lambda a: _run(base, blocks, a, limit=1, after_calls=after_calls),
        train_cfg,
        device="cpu",
    )
    assert (used.train.batch_size, used.train.grad_accum, used.parts) == (1, 8, 4)
    assert used.retries == 2 and len(retried.records) == 4
    # the same as a run that used micro-batch 1 x 8 on the split batches from the start
    fresh = _run(base, blocks, Attempt(used.train, parts=4))
    assert _curve(retried) == _curve(fresh)
    # and the same tokens per step as the original shape
    original = _run(base, blocks, Attempt(train_cfg))
    assert [r.tokens for r in original.records] == [r.tokens for r in retried.records]


def test_split_training_matches_the_unsplit_one_without_dropout(base: BaseModel) -> None:
    """Without dropout the split run is the original run up to float rounding: same data, same
    token-weighted gradients."""
    blocks = torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(2))

    def run(attempt: Attempt) -> list[float]:
        torch.manual_seed(0)
        peft = attach_lora(base, LoraSettings(r=4, dropout=0.0), seed=0)
        try:
            result = train(
                peft,
                make_optimizer(peft, attempt.train),
                attempt.batches(batches(blocks, attempt.original_batch_size, seed=0)),
                [1e-2] * 5,
                Loop(Precision(CPU, torch.float32), attempt.train.grad_accum, 1.0),
                progress=False,
            )
            return [r.loss for r in result.records]
        finally:
            detach_lora(peft)

    whole = run(Attempt(TrainConfig(batch_size=4, grad_accum=1)))
    split = run(Attempt(TrainConfig(batch_size=1, grad_accum=4), parts=4))
    assert split == pytest.approx(whole, rel=1e-5)


def _endless(batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield batch


def test_padded_batches_split_with_their_masks(base: BaseModel) -> None:
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}

    def run(attempt: Attempt) -> float:
        torch.manual_seed(0)
        peft = attach_lora(base, LoraSettings(r=4, dropout=0.0), seed=0)
        try:
            result = train(
                peft,
                make_optimizer(peft, attempt.train),
                attempt.batches(_endless(batch)),
                [1e-2] * 2,
                Loop(Precision(CPU, torch.float32), attempt.train.grad_accum, 1.0),
                progress=False,
            )
            return result.records[-1].loss
        finally:
            detach_lora(peft)

    whole = run(Attempt(TrainConfig(batch_size=4)))
    split = run(Attempt(TrainConfig(batch_size=2, grad_accum=2), parts=2))
    assert split == pytest.approx(whole, rel=1e-5)
