"""Sweep efficiency on the bundled model: the best held-out loss found against the optimizer
steps spent, for three ways of choosing the peak LR on the stdlib corpus (the grid's study:
100-step warmup + cosine fine-tunes, 4 x 64 tokens per step, eval every 25 steps).

    python -m bench.efficiency run [--trials 6] [--arms probe,ramp,random]  # resumes its journals
    python -m bench.efficiency                    # the table and bench/results/efficiency.png

- ``probe``: lrsweep's sweep as a user runs it: the default range test (probe runs; their
  steps count), bounds from it, the recommendation as the first trial, TPE, median pruning on
  the eval loss.
- ``probe6``: the same with the default before, constant-LR probe runs of 6 steps.
- ``ramp``: the same with the classic exponential ramp as the range test (60 steps).
- ``random``: random search over wide default bounds (peak LR 1e-6 .. 1e-2, the same warmup and
  min_lr ranges), no pruning.
- ``grid``: bench.grid's points on stdlib (peak LR on a half-decade grid, refined around its
  best; warmup 5 %, min_lr a tenth of the peak), in the order they were planned.
The target: within 0.25 % of the grid's best loss in at most 20 % of the grid's steps.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path

import pandas as pd

from bench.grid import BASE_EXPONENTS, ROOT, load_rows, score, study_config
from bench.quality import OLD_PROBE, find_dir
from lrsweep.find import load_find
from lrsweep.sweep.collect import load_results
from lrsweep.sweep.plan import run_sweep


SWEEPS = ROOT / "bench" / "results" / "sweep"
ARMS = {
    "probe": [],
    "probe6": OLD_PROBE,  # the default before issue 20
    "ramp": ["rangetest.mode=ramp"],
    "random": ["search.peak_lr=[1e-6, 1e-2]", "sweep.sampler=random", "sweep.pruner=none"],
}
RANGE_TESTS = ("probe", "probe6", "ramp")  # the arms that start from lrsweep's range test
WITHIN = (0.01, 0.0025)  # the target, and a tighter one (a decade around the best is
# within 0.3 % on stdlib, so 1 % separates little)

logger = logging.getLogger("bench.efficiency")


def run(trials: int, arms: list[str]) -> None:
    for arm in arms:
        extra, out = ARMS[arm], SWEEPS / arm
        if arm == "ramp" and not (out / "rangetest.parquet").exists():
            # The quality benchmark's stdlib ramp is this arm's range test; the probe arm
            # runs its own, as a user's sweep does.
            shutil.copytree(find_dir("stdlib", "ramp"), out, dirs_exist_ok=True)
        logger.info("sweep %s", arm)
        run_sweep(study_config("stdlib", extra), out, trials=trials, progress=False)


def _trace(costs: list[int], losses: list[float]) -> pd.DataFrame:
    """Cumulative steps and best loss so far after each run."""
    best = pd.Series(losses, dtype=float).fillna(math.inf).cummin()
    return pd.DataFrame({"steps": pd.Series(costs).cumsum(), "best": best})


def traces() -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {}
    rows = [
        r
        for r in load_rows()
        if r["corpus"] == "stdlib" and r["seed"] == 0 and r.get("shape", "base") == "base"
    ]
    base = [r for r in rows if r["exponent"] in BASE_EXPONENTS]
    refine = [r for r in rows if r["exponent"] not in BASE_EXPONENTS]
    grid = base + refine
    out["grid"] = _trace([r["steps_done"] for r in grid], [score(r) for r in grid])
    for arm in ARMS:
        path = SWEEPS / arm
        if not (path / "study.journal").exists():
            continue
        trials, curves, _ = load_results(path)
        trials = trials[trials["state"].isin(["COMPLETE", "PRUNED"])].sort_values("number")
        steps = curves.groupby("number")["step"].count()
        costs = [int(steps.get(n, 0)) for n in trials["number"]]
        losses = trials["eval_loss"].tolist()
        found = load_find(path) if arm in RANGE_TESTS else None
        if found is not None:
            costs, losses = [found.curve.optimizer_steps, *costs], [math.nan, *losses]
        out[arm] = _trace(costs, losses)
    return out


def table() -> None:
    found = traces()
    grid = found["grid"]
    best = grid["best"].min()
    total = int(grid["steps"].iloc[-1])
    print(f"grid best {best:.4f} after {total} steps")
    heads = " ".join(f"{f'steps to within {w:.2%}':>26}" for w in WITHIN)
    print(f"{'arm':<8} {'runs':>4} {'steps':>6} {'best':>7} {heads}")
    for arm, trace in found.items():
        reach = []
        for within in WITHIN:
            hit = trace[trace["best"] <= best * (1 + within)]
            steps = int(hit["steps"].iloc[0]) if len(hit) else None
            reach.append(f"{steps} ({steps / total:.0%} of grid)" if steps else "never")
        print(
            f"{arm:<8} {len(trace):>4} {int(trace['steps'].iloc[-1]):>6} "
            f"{trace['best'].iloc[-1]:>7.4f} " + " ".join(f"{r:>26}" for r in reach)
        )
    plot(found, best * (1 + WITHIN[0]), ROOT / "bench" / "results" / "efficiency.png")


def plot(found: dict[str, pd.DataFrame], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, trace in found.items():
        finite = trace[trace["best"] < math.inf]
        ax.step(finite["steps"], finite["best"], where="post", marker="o", label=arm)
    ax.axhline(target, color="0.5", ls="--", lw=1, label="within 1 % of the grid's best")
    ax.set_xlabel("optimizer steps spent (range test included)")
    ax.set_ylabel("best held-out loss so far")
    ax.set_title("Sweep efficiency, bundled SmolLM2-135M on stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", default="table", choices=["run", "table"])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--arms", default=",".join(ARMS), help="run these sweeps (in turn)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.action == "run":
        run(args.trials, args.arms.split(","))
    table()


if __name__ == "__main__":
    main()
