"""Durations as the CLI reads them (``--timeout 8h``) and as the estimates print them."""

from __future__ import annotations

import math

from lrsweep.errors import LrsweepError


def parse_duration(
    text: str | None, option: str = "--timeout", zero: bool = False
) -> float | None:
    """'8h', '90m', '45s' or plain seconds -> seconds (positive and finite; 0 too if ``zero``)."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        seconds = math.nan
    if not (math.isfinite(seconds) and (seconds > 0 or (zero and seconds == 0))):
        lowest = "0 or a" if zero else "a positive"
        raise LrsweepError(
            f"{option} {text}: expected {lowest} duration like 8h, 90m or 3600"
        ) from None
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds for a person: 45 s, 12 min, 3.5 h."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
