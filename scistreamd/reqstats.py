"""Counts and latency histograms of the requests scistreamd answers (pure).

The D-Bus methods and the peer port record every answered request here
(method, result, seconds); the metrics endpoint (metrics.py) turns a snapshot
into Prometheus families at scrape time. Kept free of prometheus_client so
recording costs a dict update and nothing is imported when metrics are off.

Label values are bounded: methods are the API's own names and results are
"ok" or an error name of errors.py / peerwire's table, never caller text.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

#: Upper bounds (seconds) of the latency buckets: sub-millisecond reads up to
#: requests that wait for a relay start or a peer (seconds).
BUCKETS: Tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0, 30.0)
OK = "ok"
#: A method or result label that is not a plain name is recorded as this.
OTHER = "other"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def label(value: object) -> str:
    """``value`` if it is a plain name, else "other" (labels never carry caller text)."""
    return value if isinstance(value, str) and _NAME.fullmatch(value) else OTHER


@dataclass(frozen=True)
class Histogram:
    """One method's latencies: per-bucket counts (not cumulative), their sum and count."""

    counts: Tuple[int, ...]  # len(BUCKETS) + 1: the last is above the largest bound
    total: float
    count: int

    def cumulative(self) -> List[Tuple[str, int]]:
        """Prometheus buckets: (le, cumulative count), ending with ("+Inf", count)."""
        out, running = [], 0
        for bound, n in zip(BUCKETS, self.counts):
            running += n
            out.append((_le(bound), running))
        out.append(("+Inf", self.count))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class RequestStats:
    """Requests of one interface ("dbus" or "peer"), by method and result."""

    def __init__(self) -> None:
        self._results: Dict[Tuple[str, str], int] = {}
        self._latency: Dict[str, Tuple[List[int], List[float]]] = {}

    def record(self, method: str, result: str, seconds: float) -> None:
        method, result = label(method), label(result)
        key = (method, result)
        self._results[key] = self._results.get(key, 0) + 1
        counts, total = self._latency.setdefault(method, ([0] * (len(BUCKETS) + 1), [0.0]))
        seconds = max(0.0, float(seconds))
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        total[0] += seconds

    def results(self) -> Dict[Tuple[str, str], int]:
        """(method, result) -> number of requests answered so."""
        return dict(self._results)

    def histograms(self) -> Dict[str, Histogram]:
        return {m: Histogram(tuple(c), t[0], sum(c)) for m, (c, t) in self._latency.items()}


#: The daemon's two request counters (one process, one of each).
DBUS = RequestStats()
PEER = RequestStats()
