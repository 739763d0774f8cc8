"""Suggestion quality: how far each range-test suggestion lands from the best peak LR that the
grid of complete fine-tunes (bench.grid) found, per corpus, as log10(suggested / best).

    python -m bench.quality run [--corpora ...]   # the range tests, saved under bench/results
    python -m bench.quality                       # the table, from what is saved

Each corpus gets two range tests on the grid's study (same model, LoRA, 4 x 64 tokens):
- ``ramp``: lrsweep find's default ramp, 60 steps from 1e-5 to 1e-1 scored on 4 probe blocks;
- ``probe``: 9 fixed-LR runs from 1e-5 to 1e-1 of 12 steps each, scored on all 32 held-out
  blocks every 3 steps, so that one run shows what 3, 6, 9 or 12 steps per run would suggest
  (with a constant LR, the first k steps of a 12-step run are exactly a k-step run).
Candidates (``--modes``): ``probe-kKcC``, constant runs of K steps and C of cooldown;
``probe-cosN``, runs of the default's cosine schedule over N steps (``-seedS``: seed S, read
with the seed-0 probe as ``rangetest.seeds = 2`` would). A finished range test is saved and
skipped on the next run.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass

from bench.corpora import CORPORA, HELD_OUT
from bench.grid import (
    ROOT,
    SHAPES,
    best,
    complete,
    load_rows,
    other_builds,
    score,
    study_config,
)
from lrsweep.config import RangeTestConfig
from lrsweep.context import prepare
from lrsweep.data import batches
from lrsweep.find import FindResult, load_find, run_find, save_and_draw, suggestion_of
from lrsweep.horizon import carry
from lrsweep.models import attach_lora, detach_lora
from lrsweep.rangetest import combine_seeds, run_probes
from lrsweep.suggest import Suggestion, suggest_probe, suggest_probe_seeds
from lrsweep.training import Loop, make_optimizer


FINDS = ROOT / "bench" / "results" / "find"
PROBE_STEPS, PROBE_EVERY = 108, 3
# The default before issue 20: constant-LR runs of 6 steps, the "old method" of the tables,
# and the overrides that give it back (bench.efficiency, bench.findtime).
OLD_K = 6
OLD_PROBE = ["rangetest.run_schedule=constant", f"rangetest.run_steps={OLD_K}"]
# Constant runs of OLD_K steps only: seeds other than 0 and other shapes of the old probe.
SHORT_PROBE_STEPS = 54
# Probes whose runs end with a cooldown, mode probe-kKcC: K steps at the LR, then C falling to
# a tenth. k6c3 first (6 + 3 keeps lrsweep find within 4 minutes); then k3c3, the default's
# cost, and k6c6, as long a decay as the fixed part.
COOLED = re.compile(r"probe-k(\d+)c(\d+)")
COOLED_MODES = ("probe-k6c3", "probe-k3c3", "probe-k6c6")
# Probes whose runs are the first trial's schedule in miniature, mode probe-cosN: N steps of
# 5 % warmup and cosine decay to a tenth (rangetest.run_schedule = "cosine").
COSINE = re.compile(r"probe-cos(\d+)(?:-seed(\d+))?")
COSINE_MODES = ("probe-cos9", "probe-cos12", "probe-cos12-seed1")
CANDIDATE_MODES = (*COOLED_MODES, *COSINE_MODES)

logger = logging.getLogger("bench.quality")


def find_dir(corpus: str, mode: str, shape: str = "base"):  # type: ignore[no-untyped-def]
    return FINDS / (f"{corpus}-{mode}" if shape == "base" else f"{corpus}-{shape}-{mode}")


def run_ramp(corpus: str) -> None:
    ctx = prepare(study_config(corpus))
    save_and_draw(run_find(ctx, progress=False), find_dir(corpus, "ramp"))


def run_probe(
    corpus: str,
    seed: int = 0,
    steps: int = PROBE_STEPS,
    shape: str = "base",
    cooldown: int = 0,
    schedule: str = "constant",
) -> None:
    """Probe mode with its runs' losses every 3 steps; ``seed`` varies the adapter init and
    the batches (the train/eval split stays the grid's); ``shape`` is one of the grid's;
    ``cooldown`` steps of decay end each run (saved as mode ``probe-kKcC``); ``schedule``
    "cosine" makes each run a miniature fine-tune (mode ``probe-cosN``, scored at its end)."""
    probe = [
        "rangetest.mode=probe",
        f"rangetest.run_steps={steps // 9}",
        f"rangetest.cooldown_steps={cooldown}",
        f"rangetest.run_schedule={schedule}",
    ]
    cfg = study_config(corpus, [*SHAPES[shape], *probe])
    ctx = prepare(cfg)
    model = attach_lora(ctx.base, cfg.lora, seed)
    try:
        curve = run_probes(
            model,
            make_optimizer(model, cfg.train),
            batches(ctx.blocks.train, cfg.train.batch_size, seed),
            cfg.rangetest,
            Loop.of(cfg.train, ctx.precision),
            probe=ctx.blocks.eval,
            eval_every=PROBE_EVERY if schedule == "constant" else 0,
            progress=False,
        )
    finally:
        detach_lora(model)
    mode = "probe" if seed == 0 else f"probe-seed{seed}"
    mode = f"probe-k{steps // 9}c{cooldown}" if cooldown else mode
    if schedule == "cosine":
        mode = f"probe-cos{steps // 9}" + (f"-seed{seed}" if seed else "")
    assert curve.start_loss is not None
    suggestion = suggest_probe(curve.lrs, curve.losses, curve.start_loss)
    save_and_draw(FindResult(curve, suggestion, cfg), find_dir(corpus, mode, shape))


def same_data(rows: list[dict], corpus: str, shape: str, found: FindResult) -> bool:
    """Whether a probe ran on the data that the grid's rows of ``corpus`` and ``shape`` ran
    on: their untrained held-out loss (``start_loss``, in the rows that record it) is the
    probe's. The instruction task once changed under the grid with the environment that
    builds it (BENCHMARKS.md), so a probe is scored only against rows of its own data."""
    start = found.curve.start_loss
    other = [] if start is None else other_builds(rows, corpus, start, shape)
    if other:
        logger.warning(
            "%s: left out, its data is not the grid's (untrained loss %.4f, the grid's %s)",
            found.out,
            start,
            ", ".join(f"{v:.4f}" for v in other),
        )
    return not other


def probe_at(found: FindResult, k: int) -> Suggestion:
    """What a probe of k steps per run would suggest: its runs' losses after k steps."""
    curve = found.curve
    assert curve.run_losses is not None and curve.start_loss is not None
    j = k // PROBE_EVERY - 1
    losses = [r[j] if len(r) > j else math.nan for r in curve.run_losses]
    return suggest_probe(curve.lrs, losses, curve.start_loss)


def _contains(span: tuple[float, float] | None, lr: float) -> str:
    return "-" if span is None else ("yes" if span[0] <= lr <= span[1] else "NO")


def _bounds(found: FindResult, steps: int) -> tuple[float, float] | None:
    """The sweep's default peak-LR bounds from this range test for trials of ``steps``
    steps, as the sweep sets them."""
    if found.recommended_lr is None:
        return None
    return found.sweep_bounds(steps)


def _corpora(rows: list[dict]) -> list[str]:
    return [c for c in CORPORA if any(r["corpus"] == c for r in rows)]


def shape_table(rows: list[dict]) -> None:
    """The grid's best peak LR per corpus and fine-tune shape (bench.grid.SHAPES), where the
    grid of that shape is measured, and its ratio to the base shape's best."""
    measured = [s for s in SHAPES if any(r.get("shape", "base") == s for r in rows)]
    if measured == ["base"]:
        return
    print("| corpus | " + " | ".join(measured) + " |")
    print("|---" * (len(measured) + 1) + "|")
    for corpus in _corpora(rows):
        base = best(rows, corpus)
        cells = []
        for shape in measured:
            top = best(rows, corpus, shape)
            ratio = f" ({top['peak_lr'] / base['peak_lr']:.2g}x)" if top and base else ""
            cells.append(f"{top['peak_lr']:.2e}{ratio}" if top else "")
        print(f"| {corpus} | " + " | ".join(cells) + " |")
    print()


def grid_table(rows: list[dict]) -> None:
    """Final held-out loss of every base-shape grid point (mean over seeds), one column per
    corpus."""
    shape_table(rows)
    rows = [r for r in rows if r.get("shape", "base") == "base"]
    cells: dict[tuple[float, str], list[float]] = {}
    for r in rows:
        cells.setdefault((r["exponent"], r["corpus"]), []).append(score(r))
    corpora = _corpora(rows)
    print("| peak LR | " + " | ".join(corpora) + " |")
    print("|---" * (len(corpora) + 1) + "|")
    for exponent in sorted({e for e, _ in cells}):
        values = [cells.get((exponent, c)) for c in corpora]
        text = [
            ""
            if v is None
            else f"{sum(v) / len(v):.4f}" + (f" ({len(v)} seeds)" if len(v) > 1 else "")
            for v in values
        ]
        print(f"| {10**exponent:.2e} | " + " | ".join(text) + " |")
    print()


def table(held_out: bool = False) -> None:
    """Every table, the held-out corpus's rows left out unless ``held_out``: they are read
    once, after the method is chosen."""
    rows = [r for r in load_rows() if held_out or r["corpus"] not in HELD_OUT]
    grid_table(rows)
    scored = readings(rows)
    if held_out:
        sure = how_sure_figures(rows, scored)
        print(
            f"How sure (lrsweep.horizon): the probe within {sure.development:.2g}x on the "
            f"development cells within an epoch, {sure.held_out:.2g}x on the held-out ones; "
            f"the ramp {sure.ramp_low[0]:.2g}x to {sure.ramp_low[1]:.2g}x low\n"
        )
    old_and_new(scored)
    quality_by_shape(scored)
    print("log10(suggested / best); best = the grid's best peak LR; the interval and the")
    print("sweep's default bounds (lrsweep.sweep.space.peak_lr_bounds) checked for containing it")
    print(
        f"{'corpus':<20} {'best':>8}  {'method':<26} {'suggested':>9} {'log10':>6} "
        f"{'interval':>8} {'bounds':>6}"
    )
    for corpus in _corpora(rows):
        top = best(rows, corpus)
        if top is None:
            continue
        lines: list[tuple[str, float | None, FindResult | None]] = []
        ramp = load_find(find_dir(corpus, "ramp"))
        if ramp is not None:
            for name, result in ramp.suggestion.methods.items():
                basis = name == ramp.suggestion.basis
                lines.append((f"ramp {name}", result.lr, ramp if basis else None))
        for mode, runs in (("probe", PROBE_STEPS // 9), ("probe-seed1", 6)):
            probe = load_find(find_dir(corpus, mode))
            if probe is None or not same_data(rows, corpus, "base", probe):
                continue
            for k in range(PROBE_EVERY, runs + 1, PROBE_EVERY):
                s = probe_at(probe, k)
                default = " (old default)" if k == OLD_K else ""
                seed = "" if mode == "probe" else " seed 1"
                at_k = FindResult(probe.curve, s, probe.config)
                lines.append((f"probe k={k}{seed}{default}", s.recommended_lr, at_k))
        name = corpus + (" (held out)" if corpus in HELD_OUT else "")
        for i, (method, lr, found) in enumerate(lines):
            ratio = f"{math.log10(lr / top['peak_lr']):+.2f}" if lr else "-"
            interval = _contains(found.suggestion.interval, top["peak_lr"]) if found else ""
            bounds = _contains(_bounds(found, top["steps"]), top["peak_lr"]) if found else ""
            head = f"{name:<20} {top['peak_lr']:>8.2e}" if i == 0 else " " * 29
            print(
                f"{head}  {method:<26} {lr or math.nan:>9.2e} {ratio:>6} {interval:>8} {bounds:>6}"
            )


# The probe that stands for each grid shape: the probe runs at the planned batch shape, and
# its length is the probe's own whatever the planned run's (lrsweep.horizon).
SHAPE_PROBE = {
    "base": "base",
    "batch16": "batch16",
    "steps300": "base",
    "steps1000": "base",
    "rank8": "rank8",
    "rank64": "rank64",
}


def grid_loss(rows: list[dict], corpus: str, shape: str, exponent: float) -> float:
    """The grid's final loss at ``exponent`` (log10 of the peak LR), linear between its
    measured points (mean over seeds); NaN outside them. Towards a diverged neighbour the line
    overstates the loss just below the cliff (a pessimistic regret there)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if r["corpus"] == corpus and r.get("shape", "base") == shape:
            by_lr.setdefault(r["exponent"], []).append(score(r))
    xs = sorted(by_lr)
    for lo, hi in zip(xs, xs[1:], strict=False):
        if lo <= exponent <= hi:
            a, b = (sum(by_lr[e]) / len(by_lr[e]) for e in (lo, hi))
            w = (exponent - lo) / (hi - lo)
            return a if w == 0 else b if w == 1 else a + w * (b - a)
    return math.nan


def _measured(found: FindResult) -> Suggestion:
    """A saved probe's suggestion as measured, before it was carried to any run."""
    return suggestion_of(found.curve, found.config.rangetest)


def _readings(mode: str, found: FindResult) -> list[tuple[str, Suggestion]]:
    """What a saved probe suggests, named: a cooldown or cosine probe as it ran; a constant one
    at 3 steps per run (the default before issue 13) and at OLD_K (the default before 20)."""
    if COOLED.fullmatch(mode):
        rt = found.config.rangetest
        return [(f"k={rt.run_steps} + {rt.cooldown_steps} cooldown", _measured(found))]
    if cosine := COSINE.fullmatch(mode):
        name = f"cosine, {found.config.rangetest.run_steps} steps"
        if cosine[2] is None:
            return [(name, _measured(found))]
        # With the seed-0 probe, what rangetest.seeds = 2 would have suggested.
        assert found.out is not None
        first = load_find(found.out.parent / found.out.name.removesuffix(f"-seed{cosine[2]}"))
        readings = [(f"{name}, seed {cosine[2]}", _measured(found))]
        if first is not None:
            curve = combine_seeds([first.curve, found.curve])
            assert curve.seed_losses is not None and curve.start_loss is not None
            both = suggest_probe_seeds(curve.lrs, curve.seed_losses, curve.start_loss)
            readings.append((f"{name}, 2 seeds", both))
        return readings
    seed = "seed 0" if mode == "probe" else "seed 1"
    return [(f"k={k} {seed}", probe_at(found, k)) for k in (3, OLD_K)]


@dataclass
class Reading:
    """One probe's suggestion for one corpus and shape, scored against the grid."""

    corpus: str
    shape: str
    top: dict  # the grid's best point
    final: bool  # whether the grid of that shape has nothing left to run
    method: str
    error: float  # log10(recommended / best)
    regret: float  # relative final loss at the recommendation; NaN outside the grid
    interval: str
    bounds: str


def readings(rows: list[dict]) -> list[Reading]:
    """Every saved probe's suggestion per corpus and measured shape, carried to the shape's
    run (lrsweep.horizon.carry): its error, loss regret (the grid's loss interpolated at the
    recommendation, relative to the best), and whether the interval and the sweep's default
    bounds contain the best."""
    out = []
    for corpus in _corpora(rows):
        for shape, probe_shape in SHAPE_PROBE.items():
            top = best(rows, corpus, shape)
            if top is None:
                continue
            steps = top["steps"]
            for mode in ("probe", "probe-seed1", *CANDIDATE_MODES):
                found = load_find(find_dir(corpus, mode, probe_shape))
                if found is None or not same_data(rows, corpus, shape, found):
                    continue
                for method, probed in _readings(mode, found):
                    s = carry(probed, steps, found.curve.best_drop)
                    if s.recommended_lr is None:
                        continue
                    bounds = _bounds(FindResult(found.curve, s, found.config), steps)
                    out.append(
                        Reading(
                            corpus,
                            shape,
                            top,
                            complete(rows, corpus, shape),
                            method,
                            *error_and_regret(rows, corpus, shape, top, s.recommended_lr),
                            _contains(s.interval, top["peak_lr"]),
                            _contains(bounds, top["peak_lr"]),
                        )
                    )
    return out


def error_and_regret(
    rows: list[dict], corpus: str, shape: str, top: dict, lr: float
) -> tuple[float, float]:
    """How far ``lr`` lies from the grid's best (``top``) in log10, and the grid's final loss
    there relative to the best's (NaN outside the measured points)."""
    at = math.log10(lr)
    return at - top["exponent"], grid_loss(rows, corpus, shape, at) / top["loss"] - 1


def meets_targets(error: float, regret: float) -> bool:
    """Issue 20's targets: within 0.3 decade of the grid's best and 0.5 % of its loss."""
    return abs(error) <= 0.3 and regret <= 0.005


def _name(r: Reading) -> str:
    return r.corpus + (" (held out)" if r.corpus in HELD_OUT else "")


def _regret(r: Reading) -> str:
    return "-" if math.isnan(r.regret) else f"{r.regret:.2%}"  # outside the grid


def _best(r: Reading) -> str:
    return f"{r.top['exponent']:+.2f}" + ("" if r.final else " so far")


def quality_by_shape(found: list[Reading]) -> None:
    """Every reading: 3-step and OLD_K-step constant runs (each seed), the cooldown and the
    cosine candidates."""
    print(
        "| corpus | shape | grid best | method | log10 error | loss regret | interval | bounds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in found:
        print(
            f"| {_name(r)} | {r.shape} | {_best(r)} | {r.method} | {r.error:+.2f} | "
            f"{_regret(r)} | {r.interval} | {r.bounds} |"
        )
    print()


def old_and_new(found: list[Reading]) -> None:
    """The old default (constant runs of OLD_K steps) and the new one (cosine runs of the
    default length) side by side, seed 0, and how often each meets the targets."""
    old, new = f"k={OLD_K} seed 0", f"cosine, {RangeTestConfig().run_steps} steps"
    print(f"| corpus | shape | grid best | log10 error, {old} / {new} | loss regret, old / new |")
    print("|---|---|---|---|---|")
    cells = {(r.corpus, r.shape, r.method): r for r in found}
    pairs = []
    for corpus, shape in dict.fromkeys((r.corpus, r.shape) for r in found):
        a, b = cells.get((corpus, shape, old)), cells.get((corpus, shape, new))
        if a is None or b is None:
            continue
        if a.final:  # the counts below are of complete grids; the others show "so far"
            pairs.append((a, b))
        print(
            f"| {_name(a)} | {shape} | {_best(a)} | {a.error:+.2f} / {b.error:+.2f} | "
            f"{_regret(a)} / {_regret(b)} |"
        )
    print()
    for i, method in enumerate((old, new)):
        col = [p[i] for p in pairs]
        if col:
            mean = sum(abs(r.error) for r in col) / len(col)
            hit = sum(meets_targets(r.error, r.regret) for r in col)
            print(f"{method}: mean |error| {mean:.3f}; both targets met in {hit} of {len(col)}")
    print()


# The shapes of a run within about an epoch: all but 1000 steps (2.56 epochs; 16 rows a step
# for 100 steps is about one).
WITHIN_AN_EPOCH = tuple(s for s in SHAPE_PROBE if s != "steps1000")


@dataclass
class HowSure:
    """The figures behind ``lrsweep find``'s "How sure" sentence (lrsweep.horizon), as factors
    of the grid's best peak LR, over the cells whose grid is complete."""

    development: float  # the default probe's worst development cell within an epoch
    development_regret: float  # its worst loss regret there (relative final loss)
    held_out: float  # its worst held-out cell (signed: above 1 too high)
    ramp_low: tuple[float, float]  # best / the ramp's recommendation, least and most


def how_sure_figures(rows: list[dict], scored: list[Reading]) -> HowSure:
    """From the grid's ``rows`` and their ``readings``."""
    default = f"cosine, {RangeTestConfig().run_steps} steps"
    cells = [r for r in scored if r.method == default and r.final]
    within = [r for r in cells if r.corpus not in HELD_OUT and r.shape in WITHIN_AN_EPOCH]
    development = [abs(r.error) for r in within]
    held_out = [r.error for r in cells if r.corpus in HELD_OUT]
    ramp = []
    for corpus in _corpora(rows):
        top, found = best(rows, corpus), load_find(find_dir(corpus, "ramp"))
        if top and found and found.recommended_lr and same_data(rows, corpus, "base", found):
            ramp.append(top["peak_lr"] / found.recommended_lr)
    return HowSure(
        10 ** max(development),
        max(r.regret for r in within if not math.isnan(r.regret)),
        10 ** max(held_out, key=abs),
        (min(ramp), max(ramp)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", default="table", choices=["run", "table"])
    parser.add_argument("--corpora", default=",".join(CORPORA))
    parser.add_argument("--modes", default="ramp,probe")
    parser.add_argument("--shape", default="base", choices=list(SHAPES))
    parser.add_argument(
        "--held-out",
        action="store_true",
        help=f"show the figures of {' and '.join(HELD_OUT)} (read them once)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.action == "table":
        table(args.held_out)
        return
    for corpus in args.corpora.split(","):
        for mode in args.modes.split(","):
            mode = "probe" if mode == "probe-seed0" else mode
            if load_find(find_dir(corpus, mode, args.shape)) is None:
                logger.info("range test %s on %s", mode, corpus)
                if mode == "ramp":
                    run_ramp(corpus)
                elif mode == "probe":
                    steps = PROBE_STEPS if args.shape == "base" else SHORT_PROBE_STEPS
                    run_probe(corpus, steps=steps, shape=args.shape)
                elif cooled := COOLED.fullmatch(mode):
                    k, cooldown = int(cooled[1]), int(cooled[2])
                    run_probe(corpus, steps=9 * k, shape=args.shape, cooldown=cooldown)
                elif cosine := COSINE.fullmatch(mode):
                    seed, steps = int(cosine[2] or 0), 9 * int(cosine[1])
                    run_probe(corpus, seed, steps, args.shape, schedule="cosine")
                else:  # probe-seedN: seed N, runs of 6 steps (seed 0 is saved as "probe")
                    seed = int(mode.removeprefix("probe-seed"))
                    run_probe(corpus, seed, SHORT_PROBE_STEPS, args.shape)


if __name__ == "__main__":
    main()
