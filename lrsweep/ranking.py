"""Ranking a finished sweep by configuration: pure functions of trials.parquet.

A configuration is a trial together with its confirmation runs (the same parameters, new
seeds). Its score is the mean eval loss of its complete runs and its spread their standard
deviation; the seed noise is the pooled standard deviation of a single run over every
configuration with several runs. The recommendation is the best mean among the confirmed
configurations (the best single run while none is confirmed), with its margin over the
runner-up, the range test's first guess and the common default, each next to the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd


@dataclass
class Configuration:
    row: pd.Series  # the trial that was confirmed (its parameters, its schedule)
    losses: list[float]  # eval losses of its complete runs

    @property
    def number(self) -> int:
        return int(self.row["number"])

    @property
    def n(self) -> int:
        return len(self.losses)

    @property
    def mean(self) -> float:
        return sum(self.losses) / self.n

    @property
    def spread(self) -> float:
        """Standard deviation of one run (NaN with a single run)."""
        if self.n < 2:
            return math.nan
        return math.sqrt(sum((x - self.mean) ** 2 for x in self.losses) / (self.n - 1))


def configurations(trials: pd.DataFrame) -> list[Configuration]:
    """Every complete trial that is not a confirmation run, with the eval losses of its
    complete runs (its own first), best mean first."""
    done = trials[(trials["state"] == "COMPLETE") & trials["eval_loss"].notna()]
    confirms = done["confirms"] if "confirms" in done else pd.Series(pd.NA, index=done.index)
    originals = done[confirms.isna()]
    out = []
    for _, row in originals.iterrows():
        repeats = done[confirms == row["number"]]
        losses = [float(row["eval_loss"]), *map(float, repeats["eval_loss"])]
        out.append(Configuration(row, losses))
    return sorted(out, key=lambda c: (c.mean, c.number))


def seed_noise(configs: list[Configuration]) -> float | None:
    """Pooled standard deviation of one run over the configurations with several runs."""
    several = [c for c in configs if c.n >= 2]
    dof = sum(c.n - 1 for c in several)
    if not dof:
        return None
    return math.sqrt(sum((c.n - 1) * c.spread**2 for c in several) / dof)


@dataclass
class Comparison:
    """How much ``best`` beats ``other`` (a positive margin: lower loss), against the noise."""

    other: Configuration
    margin: float
    noise: float | None
    best_n: int

    @property
    def z(self) -> float | None:
        """The margin over its standard error (each mean's error from the seed noise)."""
        if not self.noise:
            return None
        return self.margin / (self.noise * math.sqrt(1 / self.best_n + 1 / self.other.n))


@dataclass
class Recommendation:
    best: Configuration
    confirmed: bool  # the best has several seeds
    noise: float | None
    runner_up: Comparison | None
    first_guess: Comparison | None  # the range test's recommendation (the first trial)
    baseline: Comparison | None  # the common default peak LR measured in the study


def _by_origin(configs: list[Configuration], prefix: str) -> Configuration | None:
    for c in configs:
        origin = c.row.get("origin")
        if isinstance(origin, str) and origin.startswith(prefix):
            return c
    return None


def recommend(
    trials: pd.DataFrame, first_origin: str, baseline_origin: str
) -> Recommendation | None:
    """The configuration to use, or None while no trial is complete."""
    configs = configurations(trials)
    if not configs:
        return None
    noise = seed_noise(configs)
    confirmed = [c for c in configs if c.n >= 2]
    pool = confirmed or configs
    best = pool[0]

    def versus(other: Configuration | None) -> Comparison | None:
        if other is None or other is best:
            return None
        return Comparison(other, other.mean - best.mean, noise, best.n)

    return Recommendation(
        best,
        best.n >= 2,
        noise,
        versus(pool[1] if len(pool) > 1 else None),
        versus(_by_origin(configs, first_origin)),
        versus(_by_origin(configs, baseline_origin)),
    )
