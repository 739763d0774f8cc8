"""Trials per hour with 1 and 2 local worker processes on the tiny model, one torch thread each.

The two sides alternate within one run (these machines are noisy), each a whole
``lrsweep sweep --workers N`` command from start to finish, start-up included; the figure is
the median over the rounds, with the spread.

    python -m bench.workers [--rounds 3] [--trials 16] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def one_sweep(out: Path, workers: int, trials: int, steps: int) -> float:
    """Wall seconds of one whole sweep."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lrsweep", "sweep", str(ROOT / "studies" / "tiny.toml"),
           "--out", str(out), "--workers", str(workers), "--trials", str(trials), "-q",
           "--set", f"sweep.steps={steps}", "--set", "sweep.pruner=none",
           "--set", "search.peak_lr=[1e-3, 1e-1]"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                secs = one_sweep(Path(tmp) / f"w{workers}-{r}", workers, args.trials, args.steps)
                rates[workers].append(args.trials / secs * 3600)
                print(f"round {r}: {workers} worker(s) {secs:.1f} s "
                      f"= {rates[workers][-1]:.0f} trials/h", flush=True)
    for workers, values in rates.items():
        print(f"{workers} worker(s): median {statistics.median(values):.0f} trials/h "
              f"(min {min(values):.0f}, max {max(values):.0f})")
    ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
    print(f"2 workers / 1 worker: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {args.rounds} rounds")


if __name__ == "__main__":
    main()
