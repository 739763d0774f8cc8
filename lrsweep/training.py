"""The one training loop used by everything that trains: the range test and every trial.

Per optimizer step: set the LR, run ``grad_accum`` micro-batches with a token-weighted loss
(each micro-batch weighted by its share of the step's predicted tokens, as transformers'
``num_items_in_batch``), clip, step. A non-finite loss stops the loop before the update is
applied. Evaluation runs every ``eval_every`` steps on a fixed held-out set.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lrsweep.config import LORAPLUS_EMBEDDING_FACTOR, TrainConfig
from lrsweep.errors import DataError


if TYPE_CHECKING:
    from lrsweep.data import Examples


logger = logging.getLogger(__name__)


@dataclass
class Precision:
    """Where and in which dtype the forward pass runs; float16 adds a GradScaler."""

    device: torch.device
    dtype: torch.dtype
    scaler: torch.amp.GradScaler | None = field(default=None)

    def __post_init__(self) -> None:
        if self.dtype == torch.float16 and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def dtype_name(self) -> str:
        """The dtype as a study's ``train.dtype`` names it: float32, bfloat16 or float16."""
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@dataclass
class StepRecord:
    """One optimizer step: the LR it used, its training loss, and the eval loss after it."""

    step: int
    lr: float
    loss: float
    grad_norm: float
    tokens: int
    seconds: float  # cumulative wall time, evaluations included
    train_seconds: float  # cumulative time of the training steps alone
    eval_loss: float | None = None


@dataclass
class TrainResult:
    records: list[StepRecord]
    stop_reason: str | None = None  # None when every step ran


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with TrainingArguments' defaults; with
    ``train.loraplus_lr_ratio`` != 1, peft's LoRA+ optimizer (the B matrices in groups of
    their own, at that many times the LR of the A matrices)."""
    adam: dict[str, Any] = {
        "betas": (train.adam_beta1, train.adam_beta2),
        "eps": train.adam_epsilon,
        "weight_decay": train.weight_decay,
    }
    if train.loraplus_lr_ratio != 1:
        from peft.optimizers import create_loraplus_optimizer

        # Built at LR 1, so that each group's LR is its factor of the schedule's LR (see
        # lr_scales); peft's groups take their weight decay from loraplus_weight_decay.
        return create_loraplus_optimizer(
            model,  # type: ignore[arg-type]
            torch.optim.AdamW,
            lr=1.0,
            loraplus_lr_ratio=train.loraplus_lr_ratio,
            loraplus_lr_embedding=LORAPLUS_EMBEDDING_FACTOR,
            loraplus_weight_decay=train.weight_decay,
            **adam,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=0.0, **adam)


def lr_scales(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each parameter group's LR as a factor of the first group's, as the optimizer was built
    (a LoRA+ B group: the ratio; 1 where the first group's LR is 0). The loop sets group g's LR
    to ``lr * scales[g]``, as a transformers scheduler scales each group's initial LR, so that
    a schedule never collapses per-group LRs. Remembered in the group (``lr_scale``)."""
    groups = optimizer.param_groups
    # A scheduler that ran already keeps each group's starting LR in initial_lr.
    ref = groups[0].get("initial_lr", groups[0]["lr"])
    for group in groups:
        lr = group.get("initial_lr", group["lr"])
        group.setdefault("lr_scale", lr / ref if ref > 0 else 1.0)
    return [group["lr_scale"] for group in groups]


Batch = torch.Tensor | Mapping[str, torch.Tensor]


def _inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs with labels: packed blocks predict themselves; a collated batch (a
    Trainer's) keeps its labels, or masks padding out of its input ids."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device)
        return {"input_ids": batch, "labels": batch}
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "labels" not in inputs:
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = -100
        inputs["labels"] = labels
    return inputs


def _real_tokens(inputs: dict[str, torch.Tensor]) -> int:
    # The tokens a step trained on: padding is not counted (tokens/s would flatter it).
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return inputs["input_ids"].numel()


def _predicted_tokens(inputs: dict[str, torch.Tensor]) -> int:
    # Causal LM: every labelled position but the first is predicted.
    labels = inputs["labels"]
    if inputs.get("input_ids") is labels:  # packed blocks: no padding, no sync needed
        return labels.shape[0] * (labels.shape[1] - 1)
    return int((labels[:, 1:] != -100).sum())


def _loss(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], precision: Precision
) -> torch.Tensor:
    with precision.autocast():
        return model(**inputs).loss


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    blocks: torch.Tensor | Examples | Sequence[Batch],
    batch_size: int,
    precision: Precision,
) -> float:
    """Token-weighted mean loss over ``blocks`` (packed blocks, instruction examples, or a list
    of batches), with dropout off."""
    if isinstance(blocks, torch.Tensor):
        blocks = [blocks[i : i + batch_size] for i in range(0, len(blocks), batch_size)]
    elif hasattr(blocks, "eval_batches"):  # lrsweep.data.Examples
        blocks = blocks.eval_batches(batch_size)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=precision.device, dtype=torch.float64), 0
    for batch in blocks:
        inputs = _inputs(batch, precision.device)
        n = _predicted_tokens(inputs)
        if n == 0:  # NaN x 0 is NaN: a batch with no answer token adds nothing
            continue
        total += _loss(model, inputs, precision).double() * n
        count += n
    model.train(was_training)
    return (total / count).item()


@dataclass(frozen=True)
class Loop:
    """How every optimizer step is made and evaluated, the same for the range test, every
    trial and a user's Trainer batches: precision, accumulation, clipping, eval batch."""

    precision: Precision
    grad_accum: int = TrainConfig.grad_accum
    max_grad_norm: float = TrainConfig.max_grad_norm
    eval_batch_size: int = TrainConfig().eval_batch_size

    @staticmethod
    def of(train: TrainConfig, precision: Precision) -> Loop:
        return Loop(precision, train.grad_accum, train.max_grad_norm, train.eval_batch_size)


def _accumulate(
    model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], loop: Loop
) -> float | None:
    """Forward and backward over one step's micro-batches, each loss weighted by its share
    of the step's predicted tokens; the step's loss (None when it predicts no token)."""
    counts = [_predicted_tokens(inputs) for inputs in micro]
    step_tokens = sum(counts)
    if step_tokens == 0:
        return None
    step_loss = torch.zeros((), device=loop.precision.device)
    scaler = loop.precision.scaler
    for inputs, n in zip(micro, counts, strict=True):
        if n == 0:  # its mean loss is NaN (0 / 0), and NaN x 0 is NaN: it adds nothing
            continue
        loss = _loss(model, inputs, loop.precision) * (n / step_tokens)
        step_loss += loss.detach().float()
        (scaler.scale(loss) if scaler is not None else loss).backward()
    return step_loss.item()


def _update(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loop: Loop
) -> tuple[float, bool]:
    """Unscale, clip and apply the accumulated gradients; the gradient norm (NaN unclipped),
    and whether float16's GradScaler skipped the update (inf gradients: it lowers its scale,
    which is how accelerate tells too)."""
    scaler = loop.precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = math.nan
    if loop.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm).item()
    skipped = False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    lrs: Sequence[float],
    loop: Loop,
    *,
    eval_blocks: torch.Tensor | Examples | Sequence[Batch] | None = None,
    eval_every: int = 0,
    on_step: Callable[[StepRecord], str | None] | None = None,
    desc: str = "train",
    progress: bool = True,
    hold_on_skip: bool = False,
) -> TrainResult:
    """Run ``len(lrs)`` optimizer steps, step ``s`` with LR ``lrs[s]`` times each param
    group's factor (:func:`lr_scales`; 1 but for LoRA+ groups). With ``hold_on_skip``, an
    update that float16's GradScaler skips does not advance the schedule, as in the Trainer
    (whose scheduler steps only after an update), so that a trial's LRs stay the exported
    run's step for step; a range test's LRs advance regardless (a ramp's must increase).

    ``on_step`` sees each record (after its evaluation) and may return a reason to stop, or
    raise (the sweep raises ``optuna.TrialPruned``).
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scales = lr_scales(optimizer)
    records: list[StepRecord] = []
    tokens, train_seconds, start = 0, 0.0, time.perf_counter()
    bar = tqdm(total=len(lrs), desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    try:
        applied = 0  # the schedule's position
        for step in range(len(lrs)):
            lr = lrs[applied]
            step_start = time.perf_counter()
            for group, scale in zip(optimizer.param_groups, scales, strict=True):
                group["lr"] = lr * scale
            micro = [_inputs(next(batches), loop.precision.device) for _ in range(loop.grad_accum)]
            loss = _accumulate(model, micro, loop)
            if loss is None:  # every run on these batches would stop here: the data's fault
                optimizer.zero_grad(set_to_none=True)
                raise DataError(
                    f"step {step}: its batches have no trained token (every label is -100); "
                    "check that the rows' answers survive train.seq_len"
                )
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                return TrainResult(records, f"non-finite loss at step {step} (lr {lr:.3g})")
            grad_norm, skipped = _update(optimizer, params, loop)
            applied += not (skipped and hold_on_skip)
            tokens += sum(_real_tokens(inputs) for inputs in micro)
            now = time.perf_counter()
            train_seconds += now - step_start
            record = StepRecord(step, lr, loss, grad_norm, tokens, now - start, train_seconds)
            due = eval_every > 0 and ((step + 1) % eval_every == 0 or step == len(lrs) - 1)
            if eval_blocks is not None and due:
                record.eval_loss = evaluate(
                    model, eval_blocks, loop.eval_batch_size, loop.precision
                )
                record.seconds = time.perf_counter() - start
            records.append(record)
            bar.update(1)
            bar.set_postfix(lr=f"{lr:.2e}", loss=f"{loss:.4f}", refresh=False)
            if on_step is not None and (reason := on_step(record)) is not None:
                return TrainResult(records, reason)
        return TrainResult(records)
    finally:
        bar.close()
