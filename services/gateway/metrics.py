"""Prometheus metrics for /metrics (one registry per app, so tests can build several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proto import InstanceRecord, InstanceState

TPS_KEY = b'"predicted_per_second":'
_NUMBER = frozenset(b"0123456789.eE+-")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lls_requests",
            "Requests by model, route and status",
            ["model", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "lls_request_seconds",
            "Time from request to the last byte",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lls_time_to_first_token_seconds",
            "Time from request to the first response chunk",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cold_start = Histogram(
            "lls_cold_start_seconds",
            "Wait for a model with no ready instance",
            ["model"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.refused = Counter(
            "lls_admissions_refused",
            "Requests refused by status (429 queue, 503 unavailable)",
            ["model", "status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "lls_queue_depth", "Requests waiting for a slot", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "lls_in_flight", "Requests running through this gateway", ["model"], registry=r
        )
        self.instances = Gauge("lls_instances", "Instances by state", ["state"], registry=r)
        self.queue_wait = Histogram(
            "lls_queue_wait_seconds",
            "Time a request waited before it was sent: for a slot, a start or a swap",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.swaps = Counter(
            "lls_swaps",
            "Times a model began to yield its memory to a waiting model (a drain)",
            ["model", "to"],
            registry=r,
        )
        self.drain = Histogram(
            "lls_drain_seconds",
            "Time a yielding model took to finish its requests in flight",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "lls_tokens_per_second",
            "Generation speed reported by llama-server",
            ["model"],
            buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )

    def observe_instance(self, old: InstanceRecord | None, new: InstanceRecord) -> None:
        """Swaps and drain times, from the instance records as they change."""
        was = old.state if old is not None else None
        if new.state == InstanceState.DRAINING and was != InstanceState.DRAINING:
            self.swaps.labels(new.model, new.drain_for).inc()
        elif old is not None and was == InstanceState.DRAINING and new.state != was:
            if old.drain_since is not None:
                self.drain.labels(old.model).observe(max(0.0, new.updated - old.drain_since))


def predicted_per_second(data: bytes) -> float | None:
    """llama-server's generation speed from the `timings` in an answer or its last streamed
    chunk, found with a byte search rather than by parsing a body we only forward."""
    i = data.rfind(TPS_KEY)
    if i < 0:
        return None
    start = end = i + len(TPS_KEY)
    while end < len(data) and data[end] in _NUMBER:
        end += 1
    if end == len(data):  # the number may go on in the next chunk: skip, do not misread
        return None
    try:
        value = float(data[start:end])
    except ValueError:
        return None
    return value if value > 0 else None
