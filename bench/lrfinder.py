"""lrsweep's range test against torch-lr-finder (the most used peer), same model, LoRA adapter,
data, optimizer, LR ramp and number of steps, each scoring the same held-out blocks after every
step (torch-lr-finder's ``val_loader`` mode).

    python -m bench.lrfinder [--model tiny|bundled] [--steps 60] [--rounds 2]

Each run is its own process, so that its peak RSS is its own; the two tools alternate. Reports
wall time (model and data load excluded), peak RSS, and both tools' suggestions.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


ROOT = Path(__file__).resolve().parents[1]


def _context(model: str, steps: int) -> Any:
    from lrsweep import config as config_mod
    from lrsweep.context import prepare

    study = "tiny.toml" if model == "tiny" else "default.toml"
    start, end = (1e-5, 10.0) if model == "tiny" else (1e-5, 1e-1)
    return prepare(
        config_mod.load(
            ROOT / "studies" / study,
            [
                "rangetest.mode=ramp",  # the same kind of test as torch-lr-finder's
                f"rangetest.steps={steps}",
                f"rangetest.start_lr={start}",
                f"rangetest.end_lr={end}",
                "data.max_tokens=100000",
            ],
        )
    )


def _lrsweep(ctx: Any) -> dict[str, Any]:
    from lrsweep.find import run_find

    result = run_find(ctx, progress=False)
    return {
        "suggestions": {k: m.lr for k, m in result.suggestion.methods.items()},
        "recommended": result.recommended_lr,
        "points": len(result.curve.lrs),
    }


def _torch_lr_finder(ctx: Any) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.data import DataLoader, TensorDataset
    from torch_lr_finder import LRFinder

    from lrsweep.models import attach_lora
    from lrsweep.training import make_optimizer

    cfg = ctx.config
    model = attach_lora(ctx.base, cfg.lora, cfg.seed)

    class Logits(torch.nn.Module):  # torch-lr-finder calls criterion(model(x), y)
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=x).logits

    def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )

    train = ctx.blocks.train
    probe = ctx.blocks.eval[: cfg.rangetest.probe_blocks]
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        TensorDataset(train, train),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=generator,
    )
    val = DataLoader(TensorDataset(probe, probe), batch_size=cfg.train.eval_batch_size)
    optimizer = make_optimizer(model, cfg.train)
    optimizer.param_groups[0]["lr"] = cfg.rangetest.start_lr
    finder = LRFinder(Logits(), optimizer, criterion, device=ctx.base.device)
    finder.range_test(
        loader,
        val_loader=val,
        end_lr=cfg.rangetest.end_lr,
        num_iter=cfg.rangetest.steps,
        step_mode="exp",
    )
    _, ax = plt.subplots()
    _, lr = finder.plot(ax=ax, suggest_lr=True)
    finder.reset()
    return {
        "suggestions": {"steepest": lr},
        "recommended": lr,
        "points": len(finder.history["lr"]),
    }


def run_one(tool: str, model: str, steps: int) -> dict[str, Any]:
    ctx = _context(model, steps)
    start = time.perf_counter()
    result = _lrsweep(ctx) if tool == "lrsweep" else _torch_lr_finder(ctx)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "bundled"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", choices=["lrsweep", "torch-lr-finder"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.steps)))
        return
    runs: dict[str, list[dict[str, Any]]] = {"lrsweep": [], "torch-lr-finder": []}
    for r in range(args.rounds):
        for tool in (
            ("lrsweep", "torch-lr-finder") if r % 2 == 0 else ("torch-lr-finder", "lrsweep")
        ):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.lrfinder",
                    "--one",
                    tool,
                    "--model",
                    args.model,
                    "--steps",
                    str(args.steps),
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            )
            runs[tool].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r}: {tool} {json.dumps(runs[tool][-1])}", flush=True)
    ratio = statistics.median(
        a["seconds"] / b["seconds"]
        for a, b in zip(runs["lrsweep"], runs["torch-lr-finder"], strict=True)
    )
    for tool, results in runs.items():
        print(
            f"{args.model} {tool}: median {statistics.median(r['seconds'] for r in results):.1f}"
            f" s, peak RSS {statistics.median(r['peak_rss_mb'] for r in results):.0f} MiB, "
            f"suggestions {results[-1]['suggestions']}"
        )
    print(f"{args.model}: lrsweep / torch-lr-finder wall time = {ratio:.2f} (median)")


if __name__ == "__main__":
    main()
