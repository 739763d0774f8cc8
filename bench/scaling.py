"""How step time and peak memory grow with sequence length, batch size and LoRA rank, and
where the time of one step goes (forward, backward, optimizer, lrsweep's own work).

    python -m bench.scaling [--model bundled|tiny] [--steps 3]

Each configuration varies one knob from the default study (seq_len 128, batch 4, r 16);
the step time is the median of ``--steps`` steps after one warm-up step. Each configuration
runs in a fresh process, so that no earlier one's freed memory hides its peak: CUDA's max
allocated on a GPU; on the CPU, the peak of the process RSS (sampled every 5 ms) above its
level once model and data are loaded: activations, gradients and optimizer state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.peakmem import PeakRss
from lrsweep import config as config_mod
from lrsweep.context import prepare
from lrsweep.data import batches
from lrsweep.models import attach_lora, detach_lora
from lrsweep.training import Loop, make_optimizer, train


ROOT = Path(__file__).resolve().parents[1]


def measure(ctx, seq_len: int, batch: int, rank: int, steps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median seconds per step and peak memory growth (MiB) of one configuration."""
    cfg = ctx.config
    lora = dataclasses.replace(cfg.lora, r=rank, alpha=2 * rank, dropout=0.0)
    blocks = ctx.blocks.train.flatten()[: (len(ctx.blocks.train.flatten()) // seq_len) * seq_len]
    blocks = blocks.view(-1, seq_len)
    device = ctx.base.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRss() as rss:
        model = attach_lora(ctx.base, lora, 0)
        try:
            result = train(
                model,
                make_optimizer(model, cfg.train),
                batches(blocks, batch, 0),
                [1e-4] * (steps + 1),
                Loop(ctx.precision, 1, 1.0),
                progress=False,
            )
        finally:
            detach_lora(model)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = rss.growth_mb
    times = [
        b.train_seconds - a.train_seconds
        for a, b in zip(result.records, result.records[1:], strict=False)
    ]
    return statistics.median(times), peak


def profile(ctx, steps: int) -> None:  # type: ignore[no-untyped-def]
    """Where one step's time goes, from torch.profiler over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    cfg = ctx.config
    model = attach_lora(ctx.base, dataclasses.replace(cfg.lora, dropout=0.0), 0)
    optimizer = make_optimizer(model, cfg.train)
    data = batches(ctx.blocks.train, cfg.train.batch_size, 0)
    train(
        model,
        optimizer,
        data,
        [1e-4],
        Loop(ctx.precision, 1, 1.0),
        progress=False,
    )  # warm-up
    total = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]

    def bare_step() -> None:
        x = next(data)
        with record_function("forward"):
            t = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            total["forward"] += time.perf_counter() - t
        with record_function("backward"):
            t = time.perf_counter()
            loss.backward()
            total["backward"] += time.perf_counter() - t
        with record_function("optimizer"):
            t = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total["optimizer"] += time.perf_counter() - t

    start = time.perf_counter()
    for _ in range(steps):  # timed without the profiler, which slows every op
        bare_step()
    bare = time.perf_counter() - start
    timed = dict(total)  # before the profiled step, which the profiler slows
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        bare_step()
    detach_lora(model)
    # lrsweep's own work per step: the loop's time minus the bare step's, same steps.
    model = attach_lora(ctx.base, dataclasses.replace(cfg.lora, dropout=0.0), 0)
    result = train(
        model,
        make_optimizer(model, cfg.train),
        batches(ctx.blocks.train, cfg.train.batch_size, 1),
        [1e-4] * steps,
        Loop(ctx.precision, 1, 1.0),
        progress=False,
    )
    detach_lora(model)
    ours = result.records[-1].train_seconds
    print(
        f"one step ({cfg.train.batch_size} x {cfg.train.seq_len} tokens, r={cfg.lora.r}), "
        f"mean of {steps}: "
        + ", ".join(f"{k} {v / steps:.3f} s ({v / bare * 100:.0f} %)" for k, v in timed.items())
    )
    print(
        f"lrsweep's loop: {ours / steps:.3f} s per step against the bare step's "
        f"{bare / steps:.3f} s ({(ours - bare) / bare * 100:+.1f} %, within noise)"
    )
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", choices=["tiny", "bundled"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile-only", action="store_true", help="skip the scaling table")
    parser.add_argument("--config", help="seq_len,batch,rank: measure one in this process")
    args = parser.parse_args()
    study = "tiny.toml" if args.model == "tiny" else "default.toml"
    ctx = prepare(config_mod.load(ROOT / "studies" / study, ["data.max_tokens=60000"]))
    if args.config:
        seq_len, batch, rank = map(int, args.config.split(","))
        print(json.dumps(measure(ctx, seq_len, batch, rank, args.steps)))
        return
    base = ctx.config
    grid = [("seq_len", v, v, base.train.batch_size, base.lora.r) for v in (64, 128, 256, 512)]
    grid += [("batch", v, base.train.seq_len, v, base.lora.r) for v in (1, 2, 4, 8)]
    grid += [("rank", v, base.train.seq_len, base.train.batch_size, v) for v in (4, 16, 64)]
    if args.profile_only:
        grid = []
    print("| knob | value | s/step | tokens/s | peak memory above the model (MiB) |")
    print("|---|---|---|---|---|")
    for knob, value, seq_len, batch, rank in grid:
        cmd = [sys.executable, "-m", "bench.scaling", "--model", args.model]
        cmd += ["--steps", str(args.steps), "--config", f"{seq_len},{batch},{rank}"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        secs, mem = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {knob} | {value} | {secs:.3f} | {seq_len * batch / secs:.0f} | {mem:.0f} |",
            flush=True,
        )
    profile(ctx, args.steps)


if __name__ == "__main__":
    main()
