"""Per-model serving counters for the activity report (the dashboard's request charts).

Prometheus (/metrics) is for scrapers; the dashboard only sees the bus, so the gateway also
counts requests and latency/TTFT histograms per model, cumulatively, in proto's fixed buckets.
"""

from __future__ import annotations

import bisect
import time

import proto

N_BUCKETS = len(proto.SERVING_BUCKETS_S) + 1  # the last one: slower than every bound


def bucket_of(seconds: float) -> int:
    """The index of the first bucket whose bound is at least `seconds` (le, as Prometheus)."""
    return bisect.bisect_left(proto.SERVING_BUCKETS_S, seconds)


class ServingStats:
    def __init__(self) -> None:
        self.since = time.time()
        self._models: dict[str, proto.ModelServing] = {}

    def _of(self, model: str) -> proto.ModelServing:
        s = self._models.get(model)
        if s is None:
            s = self._models[model] = proto.ModelServing(
                latency=[0] * N_BUCKETS, ttft=[0] * N_BUCKETS
            )
        return s

    def done(self, model: str, status: int, seconds: float) -> None:
        """A request ended (answered, failed, or its client left) after `seconds`."""
        s = self._of(model)
        s.requests += 1
        if status >= 400:
            s.errors += 1
        s.latency[bucket_of(seconds)] += 1

    def first_token(self, model: str, seconds: float) -> None:
        self._of(model).ttft[bucket_of(seconds)] += 1

    def report(self) -> dict[str, proto.ModelServing]:
        """Copies: the report is encoded later, while requests keep counting."""
        return {
            m: proto.ModelServing(s.requests, s.errors, list(s.latency), list(s.ttft))
            for m, s in self._models.items()
        }
