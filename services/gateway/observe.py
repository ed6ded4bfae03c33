"""What the gateway records about one request, the same on every route (OpenAI, Anthropic,
Ollama, streamed or not, warm or cold): requests by status, latency, time to the first
chunk and generation speed in /metrics, and the per-model counts the dashboard charts
(ServingStats). Only the request lifecycle (lifecycle.Call) calls it, once per request.

Prometheus' `labels()` takes a lock and builds a key on every call; the children are
cached here instead. The caches are bounded by what can label them: configured models,
the gateway's fixed routes, and HTTP status codes.
"""

from __future__ import annotations

from typing import Any

from .metrics import Metrics, predicted_per_second
from .stats import ServingStats


class Observer:
    """One app's request observations; touched only from its event loop."""

    __slots__ = ("metrics", "stats", "_done", "_first", "_speed")

    def __init__(self, metrics: Metrics, stats: ServingStats) -> None:
        self.metrics, self.stats = metrics, stats
        self._done: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._first: dict[tuple[str, str], Any] = {}
        self._speed: dict[str, Any] = {}

    def first(self, model: str, route: str, took: float) -> None:
        """The first chunk of a streamed answer left for the client, `took` s after arrival."""
        child = self._first.get((model, route))
        if child is None:
            child = self._first[(model, route)] = self.metrics.ttft.labels(model, route)
        child.observe(took)
        self.stats.first_token(model, took)

    def done(self, model: str, route: str, status: int, took: float) -> None:
        """The request ended (answered, refused, failed, or its client gone) with `status`."""
        children = self._done.get((model, route, status))
        if children is None:
            m = self.metrics
            children = self._done[(model, route, status)] = (
                m.requests.labels(model, route, str(status)),
                m.latency.labels(model, route),
            )
        children[0].inc()
        children[1].observe(took)
        self.stats.done(model, status, took)

    def speed(self, model: str, data: bytes) -> None:
        """llama-server's generation speed, if `data` (an answer or a stream's last chunk)
        carries it."""
        tps = predicted_per_second(data)
        if tps is None:
            return
        child = self._speed.get(model)
        if child is None:
            child = self._speed[model] = self.metrics.tokens_per_second.labels(model)
        child.observe(tps)
