"""Summaries of repeated measurements: median, min, max, percentiles."""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Optional, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float], digits: int = 3) -> Optional[Dict[str, Any]]:
    """median/min/max/p50/p95/n and the raw samples; None when nothing was measured."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None

    def r(x: float) -> float:
        return round(x, digits)

    return {
        "median": r(statistics.median(vals)),
        "min": r(min(vals)),
        "max": r(max(vals)),
        "p50": r(percentile(vals, 50)),
        "p95": r(percentile(vals, 95)),
        "n": len(vals),
        "samples": [r(v) for v in vals],
    }


def median_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None
