"""The dashboard's charts: one bounded ring of samples per series over the last hour.

Pure state, no I/O. Every SAMPLE_S the feed calls `History.sample` with the view's tables;
it appends one point per series and returns them as one delta for the browsers.

Series:
- per GPU ("<host>/<index>"): [t, used MiB, claimed MiB, total MiB];
- per model: [t, requests/s, p50 s, p99 s, TTFT p50 s, TTFT p99 s, queued].

Request rates and quantiles come from the gateways' cumulative counters (ActivityReport
.serving): each sample takes what every gateway counted since the previous sample and sums
the gateways. Quantiles are None where a sample saw no request (the chart shows a gap).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import proto

Json = dict[str, Any]
Point = list[float | None]

SAMPLE_S = 5.0  # one point per series this often (read at construction: tests shorten it)
SPAN_S = 3600.0  # how far back the charts go
ACTIVITY_FRESH_S = 30.0  # a gateway silent this long no longer counts towards queues
BOUNDS = proto.SERVING_BUCKETS_S
N_BUCKETS = len(BOUNDS) + 1


def quantile(counts: Sequence[int], q: float, bounds: Sequence[float] = BOUNDS) -> float | None:
    """The q-quantile of a histogram (one count per bucket, the last above every bound),
    interpolated linearly inside its bucket as Prometheus' histogram_quantile does. A value
    in the open last bucket is reported as the last bound: we only know it is slower."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = bounds[i - 1] if i > 0 else 0.0
            return lo + (bounds[i] - lo) * max(0.0, rank - seen) / n
        seen += n
    return float(bounds[-1])


def add_into(acc: list[int], counts: Sequence[int]) -> None:
    for i, n in enumerate(counts[: len(acc)]):
        acc[i] += n


def _counts(rec: Json, field: str) -> list[int]:
    """A histogram from a report, padded (or cut) to our bucket count."""
    raw = rec.get(field) or []
    out = [int(n) for n in raw[:N_BUCKETS]]
    return out + [0] * (N_BUCKETS - len(out))


class Served:
    """What a set of gateways served in one interval, per model."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = [0] * N_BUCKETS
        self.ttft = [0] * N_BUCKETS


def diff_serving(prev: Json | None, cur: Json) -> Served:
    """What one gateway served for one model between two of its cumulative records. A counter
    that went down means the gateway restarted: all it counted since is new."""
    out = Served()
    prev = prev or {}
    cur_lat, cur_ttft = _counts(cur, "latency"), _counts(cur, "ttft")
    prev_lat, prev_ttft = _counts(prev, "latency"), _counts(prev, "ttft")
    requests = int(cur.get("requests", 0))
    if requests < int(prev.get("requests", 0)) or any(
        c < p for c, p in zip(cur_lat + cur_ttft, prev_lat + prev_ttft, strict=True)
    ):
        prev = {}
        prev_lat = prev_ttft = [0] * N_BUCKETS
    out.requests = requests - int(prev.get("requests", 0))
    out.errors = max(0, int(cur.get("errors", 0)) - int(prev.get("errors", 0)))
    out.latency = [c - p for c, p in zip(cur_lat, prev_lat, strict=True)]
    out.ttft = [c - p for c, p in zip(cur_ttft, prev_ttft, strict=True)]
    return out


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def gpu_memory(hosts: Mapping[str, Json], instances: Mapping[str, Json]) -> dict[str, Point]:
    """[used, claimed, total] MiB per GPU. Claimed is the larger of what the agent says its
    instances were started with and what placement reserved in the instance records: the
    latter also covers instances still downloading or starting."""
    reserved: dict[str, float] = {}
    for rec in instances.values():
        gpus = rec.get("gpus") or []
        if rec.get("state") not in proto.LIVE_STATES or not gpus or not rec.get("memory_mib"):
            continue
        for g in gpus:  # split evenly: placement reserves the total across its GPUs
            key = f"{rec.get('host')}/{g}"
            reserved[key] = reserved.get(key, 0.0) + rec["memory_mib"] / len(gpus)
    out: dict[str, Point] = {}
    for host_id, h in hosts.items():
        for g in h.get("gpus") or []:
            key = f"{h.get('host_id') or host_id}/{g.get('index')}"
            claimed = max(float(g.get("memory_claimed_mib") or 0), reserved.get(key, 0.0))
            out[key] = [
                float(g.get("memory_used_mib") or 0),
                round(claimed),
                float(g.get("memory_total_mib") or 0),
            ]
    return out


class History:
    def __init__(self, models: Sequence[str] = (), every_s: float | None = None):
        self.every_s = every_s or SAMPLE_S
        self.maxlen = max(2, math.ceil(SPAN_S / self.every_s))
        self.models = list(models)  # always charted, even before their first request
        self.gpus: dict[str, deque[Point]] = {}
        self.model_series: dict[str, deque[Point]] = {}
        self._last: dict[str, tuple[float, Json]] = {}  # gateway -> (since, serving)
        self._last_t: float | None = None

    def _served(self, activity: Mapping[str, Json]) -> dict[str, Served]:
        """Per model, what all gateways served since the previous sample."""
        out: dict[str, Served] = {}
        for gw, rep in activity.items():
            since = float(rep.get("serving_since") or 0)
            serving = {m: dict(c) for m, c in (rep.get("serving") or {}).items()}  # ours
            prev = self._last.get(gw)
            self._last[gw] = (since, serving)
            if prev is None:
                continue  # first sight (of a gateway, or after our start): a baseline only
            prev_since, prev_serving = prev
            for model, cur in serving.items():
                # None (new model, or a restarted gateway): everything it counted is new.
                old = prev_serving.get(model) if prev_since == since else None
                d = diff_serving(old, cur)
                acc = out.setdefault(model, Served())
                acc.requests += d.requests
                acc.errors += d.errors
                add_into(acc.latency, d.latency)
                add_into(acc.ttft, d.ttft)
        for gw in [g for g in self._last if g not in activity]:
            del self._last[gw]  # gone (pruned as stale): if it comes back, it is a baseline
        return out

    def sample(
        self,
        now: float,
        hosts: Mapping[str, Json],
        instances: Mapping[str, Json],
        activity: Mapping[str, Json],
    ) -> Json:
        """Append one point to every series; the delta to send to browsers."""
        dt = now - self._last_t if self._last_t is not None else None
        self._last_t = now
        t = round(now, 2)
        gpus = {k: [t, *v] for k, v in gpu_memory(hosts, instances).items()}
        for key, point in gpus.items():
            self.gpus.setdefault(key, deque(maxlen=self.maxlen)).append(point)

        fresh = {k: r for k, r in activity.items() if r.get("ts", 0) >= now - ACTIVITY_FRESH_S}
        served = self._served(activity)
        queued: dict[str, int] = {}
        for rep in fresh.values():
            for model, q in (rep.get("queues") or {}).items():
                queued[model] = queued.get(model, 0) + int(q.get("waiting", 0))
        models: dict[str, Point] = {}
        reported = {m for rep in activity.values() for m in rep.get("serving") or {}}
        for model in sorted(set(self.models) | reported | set(served) | set(queued)):
            s = served.get(model, Served())
            rps = s.requests / dt if dt else None
            models[model] = [
                t,
                _r(rps, 3),
                _r(quantile(s.latency, 0.5)),
                _r(quantile(s.latency, 0.99)),
                _r(quantile(s.ttft, 0.5)),
                _r(quantile(s.ttft, 0.99)),
                queued.get(model, 0),
            ]
            self.model_series.setdefault(model, deque(maxlen=self.maxlen)).append(models[model])
        self._forget(now)
        return {"t": t, "gpus": gpus, "models": models}

    def _forget(self, now: float) -> None:
        """Drop series whose newest point left the window (a GPU of a host long gone)."""
        for table in (self.gpus, self.model_series):
            for key in [k for k, ring in table.items() if ring[-1][0] < now - SPAN_S]:  # type: ignore[operator]
                del table[key]

    def snapshot(self) -> Json:
        return {
            "every_s": self.every_s,
            "span_s": SPAN_S,
            "bounds": list(BOUNDS),
            "gpus": {k: list(v) for k, v in self.gpus.items()},
            "models": {k: list(v) for k, v in self.model_series.items()},
        }
