"""The grid of complete fine-tunes that gives each corpus its best peak LR: the ground truth of
the suggestion-quality benchmark (bench.quality) and the baseline of the sweep-efficiency one
(bench.efficiency).

    python -m bench.grid [--shard 0/2] [--corpora stdlib,licenses,manpages] [--shapes base]

Every point is a complete fine-tune of the bundled model as lrsweep's sweep runs it (the same
``run_trial``): a fresh LoRA adapter, 100 optimizer steps of linear warmup and cosine decay with
the sweep's first-trial defaults (5 % warmup, min_lr a tenth of the peak), scored by the final
loss on 32 held-out blocks. The batch shape (4 x 64 tokens) keeps a point at about 5 minutes
on one core. The grid is 7 peak LRs half a decade apart (1e-5 .. 1e-2), then refined a quarter
decade either side of each corpus's best; where the two best points then lie within 0.5 % of
each other, both get a second seed.

Each finished point is appended as one JSON line to bench/results/grid.jsonl, so a run that is
interrupted resumes where it stopped; ``--shard k/n`` lets n processes share the work (run them
with OMP_NUM_THREADS=1: two one-thread processes do 1.44x the work of one two-thread process on
the 2-core CPU). A shard runs its own slots first and, when they wait on another shard's
result, takes any other pending point; a claim file per point (bench/results/tmp/grid-claims)
keeps two processes on one machine off the same point, whatever their corpora and shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from bench.corpora import CORPORA, corpus_path
from lrsweep import config as config_mod
from lrsweep.config import StudyConfig
from lrsweep.context import Context
from lrsweep.data import load_blocks
from lrsweep.models import load_base_model
from lrsweep.schedules import Schedule
from lrsweep.sweep.space import first_trial
from lrsweep.sweep.trial import run_trial
from lrsweep.training import Precision, evaluate


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "grid.jsonl"
CLAIMS = ROOT / "bench" / "results" / "tmp" / "grid-claims"
# The benchmark's study: the default one at 4 x 64 tokens per step, 100 steps.
OVERRIDES = [
    "train.seq_len=64",
    "train.device=cpu",
    "data.max_tokens=100000",
    "sweep.steps=100",
    "sweep.eval_every=25",
]
# Instruction examples are longer than the text blocks: one example per sequence of 256 tokens
# (about 1 in 6 is cut), the answer tokens trained and scored.
CORPUS_OVERRIDES = {"instruct": ["train.seq_len=256", "data.max_tokens=400000"]}
# The fine-tune shapes whose best peak LR the grid compares: the base one, and each of the
# others changes one thing from it (the trial length, the rows per optimizer step through the
# batch or the accumulation, the LoRA rank with alpha = 2 r).
SHAPES = {
    "base": [],
    "steps300": ["sweep.steps=300", "sweep.eval_every=75"],
    "steps1000": ["sweep.steps=1000", "sweep.eval_every=250"],
    "batch16": ["train.batch_size=16"],
    "accum4": ["train.grad_accum=4"],
    "rank8": ["lora.r=8", "lora.alpha=16"],
    "rank64": ["lora.r=64", "lora.alpha=128"],
}
BASE_EXPONENTS = [-5 + 0.5 * i for i in range(7)]
REFINE = 0.25  # decades either side of the best
# Where the two best points of a corpus are closer than this (relative final loss), both
# get a second seed, and the best is decided on the mean of the two.
SEED_GAP = 0.005

logger = logging.getLogger("bench.grid")


def study_config(corpus: str, extra: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    overrides = [
        *OVERRIDES,
        *CORPUS_OVERRIDES.get(corpus, []),
        f"data.path={corpus_path(corpus)}",
        *extra,
    ]
    return config_mod.load(ROOT / "studies" / "default.toml", overrides)


@dataclass(frozen=True)
class Point:
    corpus: str
    exponent: float  # log10 of the peak LR, rounded to a quarter decade
    seed: int = 0
    shape: str = "base"

    @property
    def key(self) -> str:
        shape = "" if self.shape == "base" else f"{self.shape}/"
        return f"{shape}{self.corpus}/{self.exponent:+.2f}/{self.seed}"

    @staticmethod
    def of(row: dict) -> Point:
        return Point(row["corpus"], row["exponent"], row["seed"], row.get("shape", "base"))

    @property
    def peak_lr(self) -> float:
        return 10**self.exponent


def load_rows(path: Path = RESULTS) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    return rows


def score(row: dict) -> float:
    """The final held-out loss; a run stopped early (diverged) ranks below every finished one."""
    final = row["final_eval_loss"]
    return final if row["steps_done"] == row["steps"] and final is not None else math.inf


def best(rows: list[dict], corpus: str, shape: str = "base") -> dict | None:
    """The best point of a corpus (in one shape): lowest final loss, averaged over seeds."""
    by_lr: dict[float, list[dict]] = {}
    for row in rows:
        if row["corpus"] == corpus and row.get("shape", "base") == shape:
            by_lr.setdefault(row["exponent"], []).append(row)
    if not by_lr:
        return None
    exponent = min(by_lr, key=lambda e: sum(score(r) for r in by_lr[e]) / len(by_lr[e]))
    runs = by_lr[exponent]
    return {
        "corpus": corpus,
        "exponent": exponent,
        "peak_lr": 10**exponent,
        "loss": sum(score(r) for r in runs) / len(runs),
        "seeds": len(runs),
        "steps": runs[0]["steps"],
    }


def plan(
    rows: list[dict], corpora: list[str], shapes: tuple[str, ...] = ("base",)
) -> list[tuple[int, Point]]:
    """Every point the grid needs given what is done, each with a fixed slot number (which
    shard runs it). The base shape gets the full grid of each corpus, then the refinement
    either side of its best; every other shape starts from the base shape's best instead."""
    slots: list[tuple[int, Point]] = []
    for index, shape in enumerate(shapes):
        mine = [r for r in rows if r.get("shape", "base") == shape]
        if shape == "base":
            planned = _plan_base(mine, corpora)
        else:
            base = [r for r in rows if r.get("shape", "base") == "base"]
            planned = _plan_around(mine, base, corpora, shape)
        # Slot numbers apart per shape, so that one shape's refinement never moves another's.
        slots += [(1000 * index + i, p) for i, p in planned]
    return slots


def _seed_pair(rows: list[dict], corpus: str, shape: str) -> list[Point]:
    """A second seed for the two best points when they lie within SEED_GAP of each other;
    then, while the best on the mean is a point with one seed (whose seed-0 loss now beats
    the pair's means, as when seed 1 ends higher at every LR), that point's second seed, so
    that the best is always decided between points with the same seeds."""
    seed0 = [r for r in rows if r["corpus"] == corpus and r["seed"] == 0]
    first, second = sorted(seed0, key=score)[:2]
    if score(second) - score(first) >= SEED_GAP * score(first):
        return []
    pair = [Point(corpus, r["exponent"], 1, shape) for r in (first, second)]
    done = {Point.of(r).key for r in rows}
    top = best(rows, corpus, shape)
    if all(p.key in done for p in pair) and top is not None and top["seeds"] == 1:
        return [*pair, Point(corpus, top["exponent"], 1, shape)]
    return pair


def _plan_base(rows: list[dict], corpora: list[str]) -> list[tuple[int, Point]]:
    done = {Point.of(r).key for r in rows}
    slots = [
        (i * len(corpora) + j, Point(c, e, 0))
        for i, e in enumerate(BASE_EXPONENTS)
        for j, c in enumerate(corpora)
    ]
    n_base = len(BASE_EXPONENTS) * len(corpora)
    for j, corpus in enumerate(corpora):
        if not all(Point(corpus, e, 0).key in done for e in BASE_EXPONENTS):
            continue
        seed0 = [r for r in rows if r["corpus"] == corpus and r["seed"] == 0]
        # Planned from the base grid's best alone, so that the plan does not move later.
        top = min((r for r in seed0 if r["exponent"] in BASE_EXPONENTS), key=score)
        refine = [Point(corpus, top["exponent"] + d, 0) for d in (-REFINE, REFINE)]
        slots += [(n_base + 2 * j + m, p) for m, p in enumerate(refine)]
        if all(p.key in done for p in refine):
            seeds = _seed_pair(rows, corpus, "base")
            # The pair's two slots, then one per corpus for a further second seed.
            pair = n_base + 2 * (len(corpora) + j)
            slots += zip((pair, pair + 1, n_base + 4 * len(corpora) + j), seeds, strict=False)
    return slots


def _base_complete(rows: list[dict], corpus: str) -> bool:
    """Whether the base plan of a corpus has nothing left (so its best will not move)."""
    done = {Point.of(r).key for r in rows}
    return all(p.key in done for _, p in _plan_base(rows, [corpus]))


def _plan_around(
    rows: list[dict], base: list[dict], corpora: list[str], shape: str
) -> list[tuple[int, Point]]:
    """A shape's points where they decide its best: the base shape's best and its half-decade
    neighbours; one more half decade outwards while the best is at an end; a quarter decade
    either side of the best; then the second seeds."""
    done = {Point.of(r).key: r for r in rows}
    slots: list[tuple[int, Point]] = []
    for j, corpus in enumerate(corpora):
        anchor = best(base, corpus)
        if anchor is None or not _base_complete(base, corpus):
            continue
        # In the order they were planned, so that a point's slot never moves.
        planned = [Point(corpus, anchor["exponent"] + d, 0, shape) for d in (0.0, -0.5, 0.5)]
        while all(p.key in done for p in planned):
            top = min(planned, key=lambda p: (score(done[p.key]), p.exponent))
            lo = min(p.exponent for p in planned)
            hi = max(p.exponent for p in planned)
            if top.exponent == lo and lo - 0.5 >= BASE_EXPONENTS[0]:
                planned.append(Point(corpus, lo - 0.5, 0, shape))
            elif top.exponent == hi and hi + 0.5 <= -1.0:
                planned.append(Point(corpus, hi + 0.5, 0, shape))
            else:
                refine = [Point(corpus, top.exponent + d, 0, shape) for d in (-REFINE, REFINE)]
                planned += refine
                if all(p.key in done for p in refine):
                    planned += _seed_pair(rows, corpus, shape)
                break
        # Slots per corpus, 100 apart.
        slots += [(100 * j + m, p) for m, p in enumerate(planned)]
    return slots


def complete(rows: list[dict], corpus: str, shape: str = "base") -> bool:
    """Whether the grid of a corpus in a shape has no point left to run (its best is final)."""
    base = [r for r in rows if r.get("shape", "base") == "base"]
    if shape == "base":
        return _base_complete(base, corpus)
    mine = [r for r in rows if r.get("shape", "base") == shape]
    done = {Point.of(r).key for r in mine}
    return all(p.key in done for _, p in _plan_around(mine, base, [corpus], shape))


def start_loss(ctx: Context) -> float:
    """The held-out loss of the untrained model: the data's fingerprint. A fresh adapter adds
    nothing (LoRA's B starts at zero), so it is the ``start_loss`` every probe saves, and a
    probe is scored only against rows of the same data (bench.quality)."""
    cfg = ctx.config
    return evaluate(ctx.base.model, ctx.blocks.eval, cfg.train.eval_batch_size, ctx.precision)


def same_build(a: float, b: float) -> bool:
    """Whether two untrained held-out losses come from the same data: a rerun differs by
    about 1e-7 relative (more on a GPU in bf16), two builds of instruct by 17 %."""
    return math.isclose(a, b, rel_tol=1e-3)


def other_builds(
    rows: list[dict], corpus: str, untrained: float, shape: str | None = None
) -> list[float]:
    """The untrained losses, recorded in a corpus's rows (of one shape, or all), that are not
    of the build whose untrained loss is ``untrained``."""
    saved = {
        r["start_loss"]
        for r in rows
        if r["corpus"] == corpus
        and "start_loss" in r
        and (shape is None or r.get("shape", "base") == shape)
    }
    return sorted(v for v in saved if not same_build(v, untrained))


def check_same_data(rows: list[dict], corpus: str, untrained: float) -> None:
    """Stop before a row of other data joins a corpus's grid."""
    if other := other_builds(rows, corpus, untrained):
        raise SystemExit(
            f"bench.grid: {corpus} here has untrained held-out loss {untrained:.4f}, its grid "
            f"rows {', '.join(f'{v:.4f}' for v in other)}: another build of the data; "
            "move its rows out of grid.jsonl before running it again"
        )


def claim(point: Point, claims: Path = CLAIMS) -> Path | None:
    """Take a point for this process (the claim file, to remove when done), or None when a live
    process holds it. A claim whose process is gone is taken over."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{point.key.replace('/', '_')}.pid"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held(path):
                return None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    return None


def _held(path: Path) -> bool:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return False
    if not text:  # created this instant, its pid not written yet
        return True
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def run_point(ctx: Context, point: Point, untrained: float) -> dict:
    # The seed of the adapter init, data order and dropout; the train/eval split stays.
    cfg = ctx.config.replace(seed=point.seed)
    ctx = dataclasses.replace(ctx, config=cfg)
    params = first_trial(point.peak_lr, cfg, (point.peak_lr, point.peak_lr))
    schedule = Schedule(
        point.peak_lr, cfg.sweep.steps, params["warmup_fraction"], params["min_lr_ratio"]
    )
    trial = optuna.create_study(pruner=optuna.pruners.NopPruner()).ask()
    run = run_trial(ctx, trial, schedule, progress=False)
    evals = [(r.step + 1, r.eval_loss) for r in run.records if r.eval_loss is not None]
    return {
        "corpus": point.corpus,
        "shape": point.shape,
        "exponent": point.exponent,
        "seed": point.seed,
        "peak_lr": point.peak_lr,
        "warmup_fraction": params["warmup_fraction"],
        "min_lr_ratio": params["min_lr_ratio"],
        "steps": cfg.sweep.steps,
        "steps_done": len(run.records),
        "tokens_per_step": run.records[-1].tokens // len(run.records) if run.records else 0,
        "final_eval_loss": evals[-1][1] if len(run.records) == cfg.sweep.steps else None,
        "evals": evals,
        "train_loss_first_last": [run.records[0].loss, run.records[-1].loss],
        "reason": run.reason,
        "seconds": round(run.seconds, 1),
        "start_loss": untrained,
    }


class Runner:
    """Runs points on one device, loading the model once and each corpus's data once."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.base: Any = None
        self.blocks: dict[str, Any] = {}
        self.untrained: dict[str, float] = {}

    def __call__(self, point: Point, rows: list[dict]) -> dict:
        cfg = study_config(point.corpus, [*SHAPES[point.shape], f"train.device={self.device}"])
        if self.base is None:
            self.base = load_base_model(cfg.model, cfg.train, cfg.seed)
        base = self.base
        if point.corpus not in self.blocks:  # the same examples in every shape
            self.blocks[point.corpus] = load_blocks(cfg.data, cfg.train, base.tokenizer, cfg.seed)
        ctx = Context(cfg, base, self.blocks[point.corpus], Precision(base.device, base.dtype))
        if point.corpus not in self.untrained:
            self.untrained[point.corpus] = start_loss(ctx)
            check_same_data(rows, point.corpus, self.untrained[point.corpus])
        return run_point(ctx, point, self.untrained[point.corpus])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", default="0/1", help="k/n: run every n-th point from k")
    parser.add_argument("--corpora", default=",".join(CORPORA))
    parser.add_argument("--shapes", default="base", help=f"of {','.join(SHAPES)}")
    parser.add_argument("--device", default="cpu", help="e.g. cuda on a GPU machine")
    args = parser.parse_args()
    k, n = map(int, args.shard.split("/"))
    corpora, shapes = args.corpora.split(","), tuple(args.shapes.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = Runner(args.device)
    while True:
        rows = load_rows()
        done = {Point.of(r).key for r in rows}
        pending = [(slot, p) for slot, p in plan(rows, corpora, shapes) if p.key not in done]
        base_rows = [r for r in rows if r.get("shape", "base") == "base"]
        if not pending and all(_base_complete(base_rows, c) for c in corpora):
            return
        # Its own slots first, then the others' rather than idle; the claim decides.
        ordered = [p for slot, p in pending if slot % n == k]
        ordered += [p for slot, p in pending if slot % n != k]
        point, held = next(((p, c) for p in ordered if (c := claim(p))), (None, None))
        if point is None or held is None:
            time.sleep(30)  # the running points decide the refinement
            continue
        try:
            if point.key in {Point.of(r).key for r in load_rows()}:
                continue  # finished while this process planned
            row = run(point, rows)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
        finally:
            held.unlink(missing_ok=True)
        logger.info(
            "%s: final %s (%s) in %.0fs",
            point.key,
            row["final_eval_loss"],
            row["reason"],
            row["seconds"],
        )


if __name__ == "__main__":
    main()
