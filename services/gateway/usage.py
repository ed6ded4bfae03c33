"""Usage per API key: limits on requests and tokens per minute and on concurrent requests,
and the per-key request and token counters in /metrics.

`KeyWindow` is the limiter, pure logic: one key's recent history, with the time passed in
(`now`, seconds on any monotonic clock), so tests drive it with made-up times. It decides;
it never sleeps or reads a clock. `Usage` is the gateway's glue: one window per key name,
the metrics, and a `Lease` per request that gives the concurrency slot back exactly once
and charges the answer's tokens when they are known (after the answer: a stream is never
held back or buffered for them).
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lls.config import ApiKey

from . import http
from .errors import ApiError
from .metrics import USAGE_KEYS, Metrics, answer_tokens, input_tokens

WINDOW_S = 60.0  # "per minute": a sliding window of the last 60 seconds
OPEN = "open"  # the key label when the gateway has no API keys
HELD_MAX = 64 << 10  # bytes of a stream's tail kept for its token counts
ALPHA = 0.2  # weight of the newest request time in the per-key average

Opened = tuple[http.Reply, Callable[[], None]]


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @classmethod
    def of(cls, key: ApiKey) -> KeyLimits:
        return cls(key.requests_per_minute, key.tokens_per_minute, key.max_concurrent)

    @property
    def any(self) -> bool:
        limits = (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent)
        return any(v is not None for v in limits)


@dataclass(frozen=True)
class Refusal:
    limit: str  # the config field that refused: requests_per_minute, tokens_per_minute, ...
    message: str
    retry_after: int  # whole seconds, at least 1: when the limit has room again


def whole_seconds(s: float) -> int:
    """Retry-After in whole seconds, rounded up (retrying early would be refused again)."""
    return max(1, math.ceil(s - 1e-9))


class KeyWindow:
    """One key's requests and tokens in the last minute and its requests running now."""

    def __init__(self, limits: KeyLimits) -> None:
        self.limits = limits
        self.running = 0
        self.avg_s: float | None = None  # average time a request of this key runs
        self._requests: collections.deque[float] = collections.deque()  # admission times
        # [time of the last charge, tokens] per second of charges: at most ~60 entries
        self._tokens: collections.deque[list[float]] = collections.deque()
        self._token_sum = 0

    def _prune(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self._requests and self._requests[0] <= cutoff:
            self._requests.popleft()
        while self._tokens and self._tokens[0][0] <= cutoff:
            self._token_sum -= int(self._tokens.popleft()[1])

    def requests_in_window(self, now: float) -> int:
        self._prune(now)
        return len(self._requests)

    def tokens_in_window(self, now: float) -> int:
        self._prune(now)
        return self._token_sum

    def check(self, now: float) -> Refusal | None:
        """Whether one more request may start now; changes nothing."""
        self._prune(now)
        lim = self.limits
        if lim.max_concurrent is not None and self.running >= lim.max_concurrent:
            # A slot frees when a running request ends: about one average request time
            # spread over the slots (1 s before any was measured).
            per_slot = (self.avg_s or 1.0) / lim.max_concurrent
            return Refusal(
                "max_concurrent",
                f"{self.running} requests running, at the limit of {lim.max_concurrent} at once",
                whole_seconds(min(WINDOW_S, per_slot)),
            )
        rpm = lim.requests_per_minute
        if rpm is not None and len(self._requests) >= rpm:
            # room again when enough of the oldest admissions have left the window
            freed_at = self._requests[len(self._requests) - rpm] + WINDOW_S
            return Refusal(
                "requests_per_minute",
                f"{len(self._requests)} requests in the last minute, at the limit of {rpm}",
                whole_seconds(freed_at - now),
            )
        tpm = lim.tokens_per_minute
        if tpm is not None and self._token_sum >= tpm:
            return Refusal(
                "tokens_per_minute",
                f"{self._token_sum} tokens in the last minute, at or over the limit of {tpm}",
                whole_seconds(self._tokens_free_at(tpm) - now),
            )
        return None

    def _tokens_free_at(self, tpm: int) -> float:
        """When the tokens still in the window drop below `tpm`: the oldest charges leave
        first, each WINDOW_S after it was made."""
        left = self._token_sum
        for t, n in self._tokens:
            left -= int(n)
            if left < tpm:
                return t + WINDOW_S
        return self._tokens[-1][0] + WINDOW_S if self._tokens else 0.0

    def admit(self, now: float) -> Refusal | None:
        """`check`, and when there is room, count the request as started (a slot taken)."""
        refusal = self.check(now)
        if refusal is None:
            self.running += 1
            if self.limits.requests_per_minute is not None:
                self._requests.append(now)
        return refusal

    def release(self, duration_s: float | None = None) -> None:
        """A request admitted here ended (after `duration_s`, if known)."""
        self.running = max(0, self.running - 1)
        if duration_s is not None and duration_s >= 0:
            avg = self.avg_s
            self.avg_s = duration_s if avg is None else avg + ALPHA * (duration_s - avg)

    def charge(self, tokens: int, now: float) -> None:
        """An answer's tokens, counted when it ended; they stay in the window a minute."""
        if tokens <= 0 or self.limits.tokens_per_minute is None:
            return
        self._prune(now)
        last = self._tokens[-1] if self._tokens else None
        if last is not None and int(last[0]) == int(now) and now >= last[0]:
            last[0] = now  # the same second: one entry, expiring with its latest charge
            last[1] += tokens
        else:
            self._tokens.append([now, tokens])
        self._token_sum += tokens


class Usage:
    """Per-key limits and counters for one gateway; touched only from its event loop."""

    def __init__(
        self, keys: list[ApiKey], metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        # only keys with a limit keep any state
        self.windows = {k.name: KeyWindow(KeyLimits.of(k)) for k in keys if KeyLimits.of(k).any}

    def enter(self, key: ApiKey | None, model: str) -> Lease:
        """Admit one request of `key` for `model`, or raise a 429 that says which limit and
        when it has room again. The lease must end: the request's lifecycle closes it
        (services/gateway/lifecycle.py `Call.finish`)."""
        name = key.name if key is not None else OPEN
        window = self.windows.get(name)
        if window is not None and (refusal := window.admit(self.clock())) is not None:
            self.metrics.key_limited.labels(name, refusal.limit).inc()
            self.metrics.key_requests.labels(name, model, "429").inc()
            raise ApiError(
                429,
                f"API key {name!r}: {refusal.limit} reached ({refusal.message}); "
                f"retry in {refusal.retry_after} s",
                "rate_limit_exceeded",
                refusal.retry_after,
            )
        return Lease(self, name, model, window)


class Lease:
    """One admitted request: ends once (counting its status and giving its slot back) and
    charges its tokens once, from a whole answer or the tail of a stream."""

    __slots__ = (
        "_usage",
        "name",
        "model",
        "_window",
        "_started",
        "_held",
        "_input",
        "closed",
        "counted",
    )

    def __init__(self, usage: Usage, name: str, model: str, window: KeyWindow | None) -> None:
        self._usage = usage
        self.name = name
        self.model = model
        self._window = window
        self._started = usage.clock()
        self._held: bytes | None = None  # a stream's tail from its last usage/timings chunk
        self._input: int | None = None  # prompt tokens an earlier usage event gave
        self.closed = False
        self.counted = False

    def feed(self, chunk: bytes) -> None:
        """A streamed chunk on its way to the client. The counts come in the last event, which
        may arrive split over raw chunks: keep the tail from the last chunk that carries
        usage or timings (bounded), and read it when the stream ends."""
        if USAGE_KEYS[0] in chunk or USAGE_KEYS[1] in chunk:
            if self._held is not None and self._input is None:
                # Anthropic's streams give the input tokens first (message_start), the
                # output tokens last (message_delta)
                self._input = input_tokens(self._held)
            self._held = chunk
        elif self._held is not None:
            held = self._held + chunk
            self._held = held if len(held) <= HELD_MAX else None

    async def lines(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """Pass SSE lines through (whole lines: nothing is split), keeping the last one that
        carries usage or timings."""
        async for line in lines:
            if '"usage"' in line or '"timings"' in line:
                if self._held is not None and self._input is None:
                    self._input = input_tokens(self._held)
                self._held = line.encode()
            yield line

    def count(self, data: bytes) -> None:
        """Charge an answer's tokens (a whole body, or a stream's tail) to the key, once."""
        if self.counted or (tokens := answer_tokens(data, self._input)) is None:
            return
        self.counted = True
        prompt, completion = tokens
        m = self._usage.metrics.key_tokens
        m.labels(self.name, self.model, "prompt").inc(prompt)
        m.labels(self.name, self.model, "completion").inc(completion)
        if self._window is not None:
            self._window.charge(prompt + completion, self._usage.clock())

    def close(self, status: int) -> None:
        if self.closed:
            return
        self.closed = True
        usage = self._usage
        usage.metrics.key_requests.labels(self.name, self.model, str(status)).inc()
        if self._window is not None:
            self._window.release(usage.clock() - self._started)
        if self._held is not None:
            held, self._held = self._held, None
            self.count(held)

    def __del__(self) -> None:
        # A safety net, not the path: a streaming response whose body never started (the
        # client left first) drops its lease unended; its slot must not stay taken forever.
        if not self.closed:
            with contextlib.suppress(Exception):  # at interpreter exit, say
                self.close(499)
