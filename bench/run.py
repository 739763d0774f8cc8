"""``make bench``: every benchmark in bench/, one after the other; figures go to stdout and,
by hand, into BENCHMARKS.md with the command behind each."""

from __future__ import annotations

import runpy
import sys


BENCHMARKS = [
    "bench.overhead",
    "bench.lrfinder",
    "bench.memory",
    "bench.workers",
    "bench.scaling",
    "bench.peakmem",
    "bench.findtime",
    # Tables from the committed results of the long runs (bench.grid, bench.quality run,
    # bench.efficiency run: hours on a CPU, resumable).
    "bench.quality",
    "bench.efficiency",
]

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        sys.argv = [name]
        runpy.run_module(name, run_name="__main__")
