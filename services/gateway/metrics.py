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
        # In this order in /metrics (a registry lists its metrics as they were added).
        self._add_request_metrics(self.registry)
        self._add_admission_metrics(self.registry)
        self._add_model_metrics(self.registry)
        self._add_key_metrics(self.registry)

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Requests by outcome, and their times."""
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

    def _add_admission_metrics(self, r: CollectorRegistry) -> None:
        """Queues, admission limits, instances, and the waits and stalls they cause."""
        self.queue_depth = Gauge(
            "lls_queue_depth", "Requests waiting for a slot", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "lls_in_flight", "Requests running through this gateway", ["model"], registry=r
        )
        self.admission_limit = Gauge(
            "lls_admission_limit",
            "Requests of a model allowed to run at once: its ready instances' slots, at most "
            "gateway.max_in_flight",
            ["model"],
            registry=r,
        )
        self.instances = Gauge("lls_instances", "Instances by state", ["state"], registry=r)
        self.stall_violations = Counter(
            "lls_stall_violations",
            "Times requests waited for a model while one of its ready instances had a free "
            "slot, for at least 50 ms (a lost wake-up; the goal is zero)",
            ["model"],
            registry=r,
        )
        self.stall_seconds = Counter(
            "lls_stall_seconds",
            "Total time of those stall violations",
            ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "lls_queue_wait_seconds",
            "Time a request waited before it was sent: for a slot, a start or a swap",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _add_model_metrics(self, r: CollectorRegistry) -> None:
        """Swaps (drains) between models, and generation speed."""
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

    def _add_key_metrics(self, r: CollectorRegistry) -> None:
        """Per API key, by its configured name (never the secret); "open" when no keys are set."""
        self.key_tokens = Counter(
            "lls_tokens",
            "Tokens by API key, model and kind (prompt or completion), from each answer's usage",
            ["key", "model", "kind"],
            registry=r,
        )
        self.key_requests = Counter(
            "lls_key_requests",
            "Requests by API key, model and HTTP status (429: refused by the key's limits)",
            ["key", "model", "code"],
            registry=r,
        )
        self.key_limited = Counter(
            "lls_key_limited",
            "Requests refused by a per-key limit, by key and limit",
            ["key", "limit"],
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


def _number_after(data: bytes, key: bytes) -> float | None:
    """The JSON number after the last `key` in `data`, found with a byte search rather than
    by parsing a body we only forward. A JSON string cannot hold an unescaped quote, so
    generated text cannot forge a key. None when absent, not a number, or cut off."""
    i = data.rfind(key)
    if i < 0:
        return None
    start = end = i + len(key)
    while end < len(data) and data[end] in _NUMBER:
        end += 1
    if end == len(data):  # the number may go on in the next chunk: skip, do not misread
        return None
    try:
        return float(data[start:end])
    except ValueError:
        return None


def predicted_per_second(data: bytes) -> float | None:
    """llama-server's generation speed from the `timings` in an answer or its last streamed
    chunk."""
    value = _number_after(data, TPS_KEY)
    return value if value is not None and value > 0 else None


# A chunk with either carries an answer's token counts.
USAGE_KEYS = (b'"usage"', b'"timings"')


def input_tokens(data: bytes) -> int | None:
    """Prompt tokens as Anthropic's messages and OpenAI's responses API count them: Anthropic
    leaves the tokens read from the cache out of input_tokens, so they are added back."""
    given = _number_after(data, b'"input_tokens":')
    if given is None:
        return None
    return max(0, int(given + (_number_after(data, b'"cache_read_input_tokens":') or 0)))


def answer_tokens(data: bytes, prompt_hint: int | None = None) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an answer, or of a stream's tail from its last chunk.

    OpenAI's `usage` first (llama-server sends it in whole answers, and in the last streamed
    chunk when stream_options.include_usage); else llama-server's `timings` (every answer's
    end, streamed or not), whose prompt_n counts only the tokens not taken from the cache,
    so cache_n is added back; else input/output tokens (`prompt_hint`: the input tokens of
    an earlier event, as Anthropic's streams send them first and the output tokens last).
    """
    prompt = _number_after(data, b'"prompt_tokens":')
    if prompt is not None:
        completion = _number_after(data, b'"completion_tokens":') or 0  # embeddings: none
        return max(0, int(prompt)), max(0, int(completion))
    processed = _number_after(data, b'"prompt_n":')
    predicted = _number_after(data, b'"predicted_n":')
    if processed is not None and predicted is not None:
        cached = _number_after(data, b'"cache_n":') or 0
        return max(0, int(processed + cached)), max(0, int(predicted))
    # Anthropic's messages and OpenAI's responses API: input/output. Both, so that a
    # count_tokens answer (input only, nothing generated) is not charged.
    given = input_tokens(data)
    given = given if given is not None else prompt_hint
    generated = _number_after(data, b'"output_tokens":')
    if given is None or generated is None:
        return None
    return given, max(0, int(generated))
