"""Process RSS over 20 tiny trials in one study: memory must not grow from trial to trial.

    python -m bench.memory [--trials 20]

Prints the RSS after each trial and the growth from trial 5 to the last (the first trials
warm up allocator pools and lazily imported code).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import psutil

from lrsweep import config as config_mod
from lrsweep.sweep.plan import prepare_sweep
from lrsweep.sweep.trial import run_trial
from lrsweep.sweep.worker import run_worker


ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    cfg = config_mod.load(
        ROOT / "studies" / "tiny.toml",
        ["search.peak_lr=[1e-3, 1e-1]", "sweep.steps=50", "sweep.pruner=none"],
    )
    process = psutil.Process()
    rss: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_sweep(cfg, Path(tmp), trials=args.trials, progress=False)
        ctx = prepared.ctx

        def measured(trial, schedule):  # type: ignore[no-untyped-def]
            run = run_trial(ctx, trial, schedule, False)
            rss.append(process.memory_info().rss / 2**20)
            return run

        run_worker(ctx.config, prepared.plan, measured, device=ctx.base.device, progress=False)
    for i, value in enumerate(rss):
        print(f"after trial {i:>2}: RSS {value:.1f} MiB")
    base = rss[min(4, len(rss) - 1)]
    print(
        f"RSS growth from trial 4 to trial {len(rss) - 1}: {rss[-1] - base:+.1f} MiB "
        f"({(rss[-1] - base) / base * 100:+.2f}%), max {max(rss):.1f} MiB"
    )


if __name__ == "__main__":
    main()
