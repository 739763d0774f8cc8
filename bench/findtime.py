"""Wall time of ``lrsweep find`` on the bundled model as a user runs it (a fresh process, model
loading included): today's default probe (12-step cosine runs) against the default before
(constant-LR runs of 6 steps).

    python -m bench.findtime [--rounds 1] [--study studies/default.toml]

The two sides alternate within each round (the order rotates); the figure is the median over
rounds of the new side's wall time over the old one's, and each side's median.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.quality import OLD_PROBE


ROOT = Path(__file__).resolve().parents[1]
SIDES = {
    "cosine 12 (default)": [],
    "constant 6 (before)": OLD_PROBE,
}


def wall(study: str, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        sets = [a for o in overrides for a in ("--set", o)]
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "lrsweep", "find", study, "--out", out, "-q", *sets],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--study", default=str(ROOT / "studies" / "default.toml"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    names = list(SIDES)
    for r in range(args.rounds):
        for side in names[r % 2 :] + names[: r % 2]:
            times[side].append(wall(args.study, SIDES[side]))
            print(f"round {r + 1}: {side} {times[side][-1]:.0f} s", flush=True)
    new, old = (times[n] for n in names)
    ratio = statistics.median(a / b for a, b in zip(new, old, strict=True))
    for side, ts in times.items():
        print(f"{side:<22} median {statistics.median(ts):.0f} s over {len(ts)} rounds")
    print(f"new / old wall time: {ratio:.2f}")


if __name__ == "__main__":
    main()
