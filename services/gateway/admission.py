"""Admission control: a bounded FIFO queue and a concurrency limit per model.

`decide` is the policy, a pure function. `Gate` holds the state (one per model, touched only
from the event loop) and grants slots in arrival order, only to callers still waiting: a
client that gave up (cancelled) never takes or pins a slot (llama-swap's lesson).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from dataclasses import dataclass

from .errors import ApiError
from .timing import Ewma

DEFAULT_SERVICE_S = 1.0  # time per request assumed before one was measured


class Verdict(enum.Enum):
    RUN = "run"
    QUEUE = "queue"
    REJECT = "reject"


@dataclass(frozen=True)
class Limits:
    max_in_flight: int  # requests running at once for one model (across its instances)
    max_queue: int  # requests waiting for a slot; one more is refused with 429
    queue_timeout: float  # seconds a queued request waits for a slot before 429


def decide(in_flight: int, queued: int, limits: Limits) -> Verdict:
    if in_flight < limits.max_in_flight and queued == 0:
        return Verdict.RUN
    if queued < limits.max_queue:
        return Verdict.QUEUE
    return Verdict.REJECT


def retry_after(queued: int, limits: Limits, service_s: float) -> float:
    """A hint for Retry-After: how long the queue ahead takes to drain at the measured time
    per request, `max_in_flight` at a time."""
    return max(1.0, min(300.0, (queued + 1) * service_s / max(1, limits.max_in_flight)))


class Gate:
    def __init__(self, model: str, limits: Limits, service_time: Ewma | None = None):
        self.model = model
        self.limits = limits
        self.service_time = service_time or Ewma()
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def enter(self) -> None:
        verdict = decide(self.in_flight, len(self.waiters), self.limits)
        if verdict is Verdict.RUN:
            self.in_flight += 1
            return
        if verdict is Verdict.REJECT:
            raise ApiError(
                429,
                f"model {self.model} is at capacity: {self.in_flight} requests running and "
                f"{len(self.waiters)} queued (limits {self.limits.max_in_flight} and "
                f"{self.limits.max_queue}); retry shortly",
                "rate_limited",
                self._retry_after(),
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        t0 = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancel that
            # comes with the grant, and a client that left would then run its request anyway.
            async with asyncio.timeout(self.limits.queue_timeout):
                await fut
        except BaseException as exc:  # timed out, or the caller went away
            if fut.done() and not fut.cancelled():
                self.leave()  # granted in the same instant: hand the slot on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                raise ApiError(
                    429,
                    f"model {self.model}: no slot freed within {time.monotonic() - t0:.0f} s "
                    f"({self.in_flight} running, {len(self.waiters)} queued); retry shortly",
                    "queue_timeout",
                    self._retry_after(),
                ) from None
            raise

    def _retry_after(self) -> float:
        return retry_after(
            len(self.waiters), self.limits, self.service_time.get(self.model, DEFAULT_SERVICE_S)
        )

    def leave(self) -> None:
        """Release a slot: the first caller still waiting takes it."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # in_flight stays: the slot passes on
                return
        self.in_flight -= 1

    @property
    def queued(self) -> int:
        return len(self.waiters)
