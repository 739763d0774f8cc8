"""Peak memory of the range test (ramp and probe modes) against a plain fine-tune of the same
configuration, each job in a fresh process so that no earlier job's freed memory hides it.

    python -m bench.peakmem [--model bundled|tiny] [--steps 12]

Peak memory is CUDA's max allocated on a GPU; on the CPU, the peak of the process RSS
(sampled every 5 ms) above its level once model and data are loaded: activations, gradients,
optimizer state and, for the range test, its snapshot of the adapter and optimizer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch


ROOT = Path(__file__).resolve().parents[1]
JOBS = ("finetune", "ramp", "probe")


class PeakRss:
    """Samples the process RSS every few milliseconds: its peak above the starting level."""

    def __enter__(self) -> PeakRss:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def run_job(job: str, model: str, steps: int) -> dict[str, float]:
    """One job in this process: its peak memory above the loaded model (MiB) and its time."""
    import optuna

    from lrsweep import config as config_mod
    from lrsweep.context import prepare
    from lrsweep.find import run_find
    from lrsweep.schedules import Schedule
    from lrsweep.sweep.trial import run_trial

    study = "tiny.toml" if model == "tiny" else "default.toml"
    overrides = [
        "data.max_tokens=60000",
        f"rangetest.steps={steps}",
        "rangetest.runs=3",
        f"rangetest.run_steps={steps // 3}",
    ]
    if job == "probe":
        overrides.append("rangetest.mode=probe")
    ctx = prepare(config_mod.load(ROOT / "studies" / study, overrides))
    device = ctx.base.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with PeakRss() as rss:
        if job == "finetune":
            trial = optuna.create_study(pruner=optuna.pruners.NopPruner()).ask()
            run_trial(ctx, trial, Schedule(1e-4, steps, 0.05, 0.1), progress=False)
        else:
            run_find(ctx, progress=False)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {
        "peak_mb": peak or rss.growth_mb,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", choices=["tiny", "bundled"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--job", choices=JOBS, help="run one job in this process (internal)")
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_job(args.job, args.model, args.steps)))
        return
    print(f"{args.model} model, default study, {args.steps} optimizer steps per job")
    print("| job | peak memory above the model (MiB) | seconds |")
    print("|---|---|---|")
    for job in JOBS:
        cmd = [sys.executable, "-m", "bench.peakmem", "--job", job, "--model", args.model]
        done = subprocess.run(
            [*cmd, "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {job} | {result['peak_mb']:.0f} | {result['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
