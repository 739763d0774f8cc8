"""Trials per hour with 1 and 2 local worker processes on the tiny model, one torch thread each.

The two sides alternate within one run (these machines are noisy), each a whole
``lrsweep sweep --workers N`` command. Two figures per run: the wall time of the command
(start-up included: imports, model and data load, once per worker process) and the steady
rate, finished trials over the span from the first trial's start to the last one's end (from
the study's own timestamps). Medians over the rounds, with the spread.

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

import optuna

from lrsweep.sweep.storage import open_storage


ROOT = Path(__file__).resolve().parents[1]


def one_sweep(
    out: Path,
    workers: int,
    trials: int,
    steps: int,
    study: Path = ROOT / "studies" / "tiny.toml",
    overrides: tuple[str, ...] = (),
    timeout: float | None = None,
) -> tuple[float, float]:
    """Wall seconds of one whole sweep, and the span of its trials in seconds (bench/gpu.py
    runs it on a GPU with its own study and overrides)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "lrsweep",
        "sweep",
        str(study),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--trials",
        str(trials),
        "-q",
        "--set",
        f"sweep.steps={steps}",
        "--set",
        "sweep.pruner=none",
        "--set",
        "search.peak_lr=[1e-3, 1e-1]",
    ]
    for override in overrides:
        cmd += ["--set", override]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, timeout=timeout)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name="lrsweep", storage=open_storage(out).backend)
    done = [t for t in study.trials if t.datetime_complete is not None]
    span = (
        max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    ).total_seconds()
    return wall, span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    rates: dict[str, dict[int, list[float]]] = {"wall": {1: [], 2: []}, "steady": {1: [], 2: []}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                wall, span = one_sweep(
                    Path(tmp) / f"w{workers}-{r}", workers, args.trials, args.steps
                )
                rates["wall"][workers].append(args.trials / wall * 3600)
                rates["steady"][workers].append(args.trials / span * 3600)
                print(
                    f"round {r}: {workers} worker(s) wall {wall:.1f} s, trials span {span:.1f} s",
                    flush=True,
                )
    for kind, by_workers in rates.items():
        for workers, values in by_workers.items():
            print(
                f"{kind:>6}, {workers} worker(s): median {statistics.median(values):.0f} "
                f"trials/h (min {min(values):.0f}, max {max(values):.0f})"
            )
        ratios = [b / a for a, b in zip(by_workers[1], by_workers[2], strict=True)]
        print(
            f"{kind:>6}, 2 workers / 1 worker: median {statistics.median(ratios):.2f}x "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {args.rounds} rounds"
        )


if __name__ == "__main__":
    main()
