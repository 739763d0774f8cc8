"""A candidate for the probe's suggestion, replayed on the saved cosine probes of the quality
benchmark (bench.quality) and rejected: no parabola when the best run's upper neighbour has
diverged, the best run's LR instead.

    python -m bench.cliff

The parabola through the best run and its neighbours takes a diverged neighbour's loss as a
sample of the valley, so next to a diverged run its vertex always lands about a quarter decade
below the best run: at 16 rows a step that put the number 0.24 decade under the grid's best on
two corpora. Skipping the parabola there removes that pull, and with it the margin that keeps
the number off the cliff; this replay measures both. Development corpora only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bench.corpora import HELD_OUT
from bench.grid import best, load_rows
from bench.quality import SHAPE_PROBE, error_and_regret, find_dir, meets_targets, same_data
from lrsweep.find import load_find
from lrsweep.suggest import Suggestion, probe_diverged, suggest_probe


def no_parabola_at_the_cliff(lrs: list[float], losses: list[float], start: float) -> Suggestion:
    """:func:`suggest_probe`, but the best run's own LR when the run above it diverged."""
    s = suggest_probe(lrs, losses, start)
    if s.recommended_lr is None:
        return s
    y = np.asarray(losses, dtype=float)
    i = int(np.nanargmax(start - y))
    if i + 1 >= len(y) or not probe_diverged(y[i + 1], start, y[i]):
        return s
    return dataclasses.replace(s, recommended_lr=float(lrs[i]))


def main() -> None:
    rows = [r for r in load_rows() if r["corpus"] not in HELD_OUT]
    corpora = dict.fromkeys(r["corpus"] for r in rows)
    print("| corpus | shape | seed | log10 error, today / candidate | loss regret, same |")
    print("|---|---|---|---|---|")
    hits = [0, 0]
    for corpus in corpora:
        for shape, probe_shape in SHAPE_PROBE.items():
            top = best(rows, corpus, shape)
            for seed, mode in enumerate(("probe-cos12", "probe-cos12-seed1")):
                found = load_find(find_dir(corpus, mode, probe_shape))
                if top is None or found is None or not same_data(rows, corpus, shape, found):
                    continue
                c = found.curve
                assert c.start_loss is not None
                cells = []
                for k, s in enumerate(
                    (found.suggestion, no_parabola_at_the_cliff(c.lrs, c.losses, c.start_loss))
                ):
                    assert s.recommended_lr is not None
                    error, regret = error_and_regret(rows, corpus, shape, top, s.recommended_lr)
                    hits[k] += meets_targets(error, regret)
                    cells.append((error, regret))
                (e0, r0), (e1, r1) = cells
                print(
                    f"| {corpus} | {shape} | {seed} | {e0:+.2f} / {e1:+.2f} | "
                    f"{r0:.2%} / {r1:.2%} |"
                )
    print(f"\nboth targets met: today {hits[0]}, candidate {hits[1]}")


if __name__ == "__main__":
    main()
