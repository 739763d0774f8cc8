"""What ``lrsweep find`` tells users about how sure its number is comes from the quality
benchmark's saved results: when a new grid row or a retuned probe changes a figure, this fails
until lrsweep.horizon (and the README and BENCHMARKS.md with it) says the new one."""

from __future__ import annotations

from bench.grid import load_rows
from bench.quality import how_sure_figures, readings
from lrsweep import horizon


def test_how_sure_figures_are_the_benchmarks() -> None:
    rows = load_rows()
    sure = how_sure_figures(rows, readings(rows))
    said = (
        horizon.PROBE_DEVELOPMENT,
        100 * horizon.PROBE_DEVELOPMENT_REGRET,
        horizon.PROBE_HELD_OUT,
        *horizon.RAMP_LOW,
    )
    measured = (
        sure.development,
        100 * sure.development_regret,
        sure.held_out,
        *sure.ramp_low,
    )
    assert [f"{x:.2g}" for x in said] == [f"{x:.2g}" for x in measured]
