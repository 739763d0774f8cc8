"""Out of memory, handled like a person would: retry with half the micro-batch and twice the
gradient accumulation, down to a micro-batch of 1, before giving up.

The tokens of an optimizer step stay the same (``batch_size * grad_accum`` is kept exactly), so
the schedule, the step count and the meaning of the learning rate do not change. The retried
run also sees the same data in the same order: each batch drawn at the original batch size is
cut into ``parts`` micro-batches along dim 0 (:func:`split_batches`) rather than drawn anew
at the smaller size. The token-weighted loss of :func:`lrsweep.training.train` then gives the
same gradients as before, up to float rounding.

The one entry point is :func:`run_with_retry`::

    def attempt_run(attempt: Attempt) -> TrainResult:
        model = attach_lora(base, cfg.lora, cfg.seed)  # fresh per attempt: no stale grads
        try:
            drawn = batches(blocks, cfg.train.batch_size, cfg.seed)  # the ORIGINAL size
            return train(model, make_optimizer(model, cfg.train), attempt.batches(drawn), lrs,
                         grad_accum=attempt.train.grad_accum, ...)
        finally:
            detach_lora(model)

    result, used = run_with_retry(attempt_run, cfg.train, device=device)
    # used.train.batch_size / used.train.grad_accum: what ran; used.facts(): for the records;
    # start=used lets the next run of the same shape begin there

Micro-batch sizes are divisors of the original batch size (8 -> 4 -> 2 -> 1; 6 -> 3 -> 1;
5 -> 1), so that every micro-batch of a step has the same number of rows and the exported
``per_device_train_batch_size * gradient_accumulation_steps`` is the original product.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lrsweep.config import TrainConfig
from lrsweep.errors import first_line
from lrsweep.memory import free_memory
from lrsweep.training import Batch


logger = logging.getLogger(__name__)

T = TypeVar("T")

# RuntimeErrors that are an allocation failure, not a bug (cuBLAS fails its workspace
# allocation with the second, the CPU allocator with the third).
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory")


class OutOfMemory(torch.OutOfMemoryError):
    """Still out of memory at a micro-batch of 1: no retry is left. A ``torch.OutOfMemoryError``
    (callers that catch that catch this); the message says what was tried."""

    def __init__(self, message: str, attempt: Attempt) -> None:
        super().__init__(message)
        self.attempt = attempt


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation that a smaller micro-batch may avoid. A CUDA
    error (``torch.AcceleratorError``, even one that says "out of memory") is not: it can leave
    the CUDA context broken, and the process should stop instead."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    if accelerator_error and isinstance(err, accelerator_error):
        return False
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES)


def halve(train: TrainConfig) -> TrainConfig | None:
    """The next smaller shape: the largest divisor of the micro-batch that is at most half of
    it, with the accumulation scaled up so that ``batch_size * grad_accum`` stays the same;
    None at a micro-batch of 1."""
    size = train.batch_size
    if size <= 1:
        return None
    smaller = max(d for d in range(1, size // 2 + 1) if size % d == 0)
    return dataclasses.replace(
        train, batch_size=smaller, grad_accum=train.grad_accum * (size // smaller)
    )


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into ``parts`` equal pieces along dim 0: a tensor, or a mapping whose
    tensors all have the same first dimension (other values are repeated in every piece)."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        rows = batch.shape[0]
        if rows % parts:
            raise ValueError(f"cannot split a batch of {rows} rows into {parts} equal parts")
        return list(torch.tensor_split(batch, parts))
    if isinstance(batch, Mapping):
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim()}
        if not tensors:
            raise ValueError("cannot split a batch that holds no tensor")
        rows_of = {k: v.shape[0] for k, v in tensors.items()}
        rows = next(iter(rows_of.values()))
        if any(r != rows for r in rows_of.values()):
            raise ValueError(f"cannot split a batch whose tensors differ in rows: {rows_of}")
        if rows % parts:
            raise ValueError(f"cannot split a batch of {rows} rows into {parts} equal parts")
        pieces = {k: torch.tensor_split(v, parts) for k, v in tensors.items()}
        return [
            {k: pieces[k][i] if k in pieces else v for k, v in batch.items()} for i in range(parts)
        ]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def split_batches(batches: Iterator[Batch], parts: int) -> Iterator[Batch]:
    """Each batch of ``batches`` as ``parts`` consecutive micro-batches: with ``grad_accum``
    multiplied by ``parts``, every optimizer step sees exactly the rows it saw before."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    if parts == 1:
        return batches
    return (piece for batch in batches for piece in split_batch(batch, parts))


@dataclass(frozen=True)
class Attempt:
    """One try of a run: the shape it uses and how it came to it.

    Args:
        train: the config to train with: ``batch_size`` is the micro-batch, ``grad_accum``
            the micro-batches per optimizer step.
        parts: micro-batches cut from each batch drawn at the original batch size.
        retries: out-of-memory errors before this attempt.
        reason: the last out-of-memory message (None on the first attempt).
    """

    train: TrainConfig
    parts: int = 1
    retries: int = 0
    reason: str | None = None

    @property
    def original_batch_size(self) -> int:
        return self.train.batch_size * self.parts

    def batches(self, drawn: Iterator[Batch]) -> Iterator[Batch]:
        """The micro-batches of this attempt, from batches drawn at the original size."""
        return split_batches(drawn, self.parts)

    def facts(self) -> dict[str, Any]:
        """What ran, for the trial record (``lrsweep.sweep.record``)."""
        return {
            "micro_batch_size": self.train.batch_size,
            "grad_accum": self.train.grad_accum,
            "oom_retries": self.retries,
            "oom_reason": self.reason,
        }

    def describe(self) -> str:
        return f"micro-batch {self.train.batch_size} x {self.train.grad_accum} accumulation"


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = None
    if device.type == "cuda" and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def run_with_retry(
    run: Callable[[Attempt], T],
    train: TrainConfig,
    *,
    device: torch.device | str,
    on_retry: Callable[[Attempt], None] | None = None,
    start: Attempt | None = None,
) -> tuple[T, Attempt]:
    """``run(attempt)`` until it does not run out of memory; its result and the attempt used.

    On an out-of-memory error (:func:`is_oom`) the memory is freed, the torch RNG state is put
    back to what the first attempt saw, and ``run`` is called again with :func:`halve`'s
    shape; ``on_retry`` sees each new attempt first (to log it). ``run`` must start from
    scratch every time: draw its batches anew at ``train.batch_size`` (the original size)
    through ``attempt.batches``, and build (or restore) its adapter and optimizer, since a run
    that failed in the middle of a step leaves partial gradients behind. At a micro-batch of 1
    it raises :class:`OutOfMemory` (a ``torch.OutOfMemoryError``). Any other error propagates
    at once.

    ``start``: begin with an attempt that an earlier run of the same shape ended with (the
    previous trial's, or :func:`lrsweep.memory.measure_first_steps`'s), rather than fail
    again at sizes already known not to fit.
    """
    device = torch.device(device)
    attempt = Attempt(train)
    if start is not None:
        if start.original_batch_size != train.batch_size or start.train.grad_accum != (
            train.grad_accum * start.parts
        ):
            raise ValueError(f"start {start.describe()} is not a shape of {train}")
        attempt = start
    rng = _rng_state(device)
    while True:
        try:
            return run(attempt), attempt
        except Exception as err:
            if not is_oom(err):
                raise
            reason = first_line(err)
            smaller = halve(attempt.train)
            if smaller is None:
                raise OutOfMemory(
                    f"out of memory at {attempt.describe()} after {attempt.retries} "
                    f"retries (from micro-batch {attempt.original_batch_size}): {reason}",
                    attempt,
                ) from None
        # Outside the except block: the exception, its traceback and the frames that hold the
        # failed attempt's tensors are gone, so this frees them.
        free_memory(device)
        _set_rng_state(device, rng)
        attempt = Attempt(
            smaller,
            parts=attempt.original_batch_size // smaller.batch_size,
            retries=attempt.retries + 1,
            reason=reason,
        )
        logger.warning("out of memory (%s); retrying with %s", reason, attempt.describe())
        if on_retry is not None:
            on_retry(attempt)
