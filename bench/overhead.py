"""Loop overhead: tokens per second of lrsweep's training loop against a bare PyTorch loop and
against transformers' Trainer (same model, LoRA adapter, batches, optimizer and schedule).

    python -m bench.overhead [--model tiny|bundled] [--steps 100] [--rounds 3]

The three sides alternate within each round (the order rotates), each on a fresh adapter;
the figure is the median over rounds of each side's tokens/s divided by the bare loop's. All
three run in the context's precision (bf16 autocast on a GPU). bench/gpu.py calls
:func:`compare` on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainingArguments

from lrsweep import config as config_mod
from lrsweep.context import Context, prepare
from lrsweep.data import batches
from lrsweep.models import attach_lora, detach_lora
from lrsweep.schedules import Schedule
from lrsweep.training import Loop, make_optimizer, train


ROOT = Path(__file__).resolve().parents[1]


def _lrsweep(ctx: Context, lrs: list[float]) -> None:
    model = attach_lora(ctx.base, ctx.config.lora, 0)
    try:
        train(
            model,
            make_optimizer(model, ctx.config.train),
            batches(ctx.blocks.train, ctx.config.train.batch_size, 0),
            lrs,
            Loop(ctx.precision, 1, 1.0),
            progress=False,
        )
    finally:
        detach_lora(model)


def _bare(ctx: Context, lrs: list[float]) -> None:
    model = attach_lora(ctx.base, ctx.config.lora, 0)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(model, ctx.config.train)
        data = batches(ctx.blocks.train, ctx.config.train.batch_size, 0)
        model.train()
        device = ctx.precision.device
        for lr in lrs:
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = next(data).to(device)
            with ctx.precision.autocast():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        detach_lora(model)


class _InOrder(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, ctx: Context, n: int) -> None:
        self.ctx, self.n = ctx, n

    def __iter__(self):  # type: ignore[no-untyped-def]
        data = batches(self.ctx.blocks.train, self.ctx.config.train.batch_size, 0)
        for _, batch in zip(range(self.n), data, strict=False):
            for block in batch:
                yield {"input_ids": block, "labels": block}


def _trainer(ctx: Context, lrs: list[float], schedule: Schedule) -> None:
    schedule = Schedule(
        schedule.peak_lr, len(lrs), schedule.warmup_fraction, schedule.min_lr_ratio
    )
    model = attach_lora(ctx.base, ctx.config.lora, 0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=ctx.config.train.batch_size,
                max_steps=len(lrs),
                learning_rate=schedule.peak_lr,
                lr_scheduler_type="cosine_with_min_lr",
                lr_scheduler_kwargs={"min_lr_rate": schedule.min_lr_ratio},
                warmup_steps=schedule.warmup_steps,
                logging_steps=10**6,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                use_cpu=ctx.base.device.type == "cpu",
                bf16=ctx.precision.dtype == torch.bfloat16,
                fp16=ctx.precision.dtype == torch.float16,
            )
            Trainer(model=model, args=args, train_dataset=_InOrder(ctx, len(lrs))).train()
    finally:
        detach_lora(model)


def _sync(ctx: Context) -> None:
    if ctx.precision.device.type == "cuda":
        torch.cuda.synchronize(ctx.precision.device)


def compare(
    ctx: Context, steps: int, rounds: int, echo: Callable[[str], None] = print
) -> dict[str, list[float]]:
    """Tokens/s of each side (bare, lrsweep, trainer) in every round."""
    cfg = ctx.config
    schedule = Schedule(1e-3, steps, 0.1, 0.1)
    lrs = schedule.lrs()
    sides: dict[str, Callable[[list[float]], None]] = {
        "bare": lambda lrs: _bare(ctx, lrs),
        "lrsweep": lambda lrs: _lrsweep(ctx, lrs),
        "trainer": lambda lrs: _trainer(ctx, lrs, schedule),
    }
    for side in sides.values():  # warm-up: first-call costs belong to no side
        side(lrs[:3])
    tokens = steps * cfg.train.batch_size * cfg.train.seq_len
    rates: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        order = names[r % 3 :] + names[: r % 3]
        for name in order:
            _sync(ctx)
            start = time.perf_counter()
            sides[name](lrs)
            _sync(ctx)
            rates[name].append(tokens / (time.perf_counter() - start))
        echo(f"round {r}: " + ", ".join(f"{n} {rates[n][-1]:.0f} tok/s" for n in order))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "bundled"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    study = "tiny.toml" if args.model == "tiny" else "default.toml"
    cfg = config_mod.load(ROOT / "studies" / study, ["lora.dropout=0.0", "data.max_tokens=100000"])
    rates = compare(prepare(cfg), args.steps, args.rounds, lambda line: print(line, flush=True))
    for name in ("lrsweep", "trainer"):
        ratios = [a / b for a, b in zip(rates[name], rates["bare"], strict=True)]
        print(
            f"{args.model}: {name} / bare = median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}); {name} median "
            f"{statistics.median(rates[name]):.0f} tok/s, bare "
            f"{statistics.median(rates['bare']):.0f} tok/s"
        )


if __name__ == "__main__":
    main()
