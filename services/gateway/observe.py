"""What the gateway records about one request, the same on every route (OpenAI, Anthropic,
Ollama, streamed or not, warm or cold): requests by status, latency and time to the first
chunk in /metrics, and the per-model counts the dashboard charts (ServingStats).

A route makes one `Observed` when the request has a model and calls `first` at its first
chunk (streams only) and `done` when the answer ends, whatever ends it; each records once.
"""

from __future__ import annotations

import time

from .metrics import Metrics
from .stats import ServingStats


class Observed:
    __slots__ = ("metrics", "stats", "model", "route", "started", "_first", "_done")

    def __init__(
        self, metrics: Metrics, stats: ServingStats, model: str, route: str, started: float
    ) -> None:
        self.metrics, self.stats = metrics, stats
        self.model, self.route, self.started = model, route, started
        self._first = self._done = False

    def first(self) -> None:
        """The first chunk of a streamed answer left for the client."""
        if self._first:
            return
        self._first = True
        took = time.monotonic() - self.started
        self.metrics.ttft.labels(self.model, self.route).observe(took)
        self.stats.first_token(self.model, took)

    def done(self, status: int) -> None:
        """The answer ended (sent, failed, or its client gone) with this status."""
        if self._done:
            return
        self._done = True
        took = time.monotonic() - self.started
        self.metrics.requests.labels(self.model, self.route, str(status)).inc()
        self.metrics.latency.labels(self.model, self.route).observe(took)
        self.stats.done(self.model, status, took)
