"""Admission control: a bounded queue and a concurrency limit per model, fair across clients.

`decide` and `next_turn` are the policy, pure functions. `Gate` holds the state (one per
model, touched only from the event loop) and grants slots only to callers still waiting: a
client that gave up (cancelled) never takes or pins a slot (llama-swap's lesson).

Fairness: each caller says who it is (its API key's name, or its address when keys are off).
Inside the model's queue every client has its own FIFO, and a freed slot goes to the waiting
client with the least weighted service so far (start-time fair queuing: each grant adds
1/weight to that client's virtual time; a client that was idle starts at the virtual time of
those waiting, so idling banks no credit). One client flooding the queue therefore delays
another by about one service time, not by the flood. When the queue is full, a newcomer whose
client waits less than the heaviest one takes the place of that client's newest waiter
(which gets the 429): a flood cannot lock the others out either.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import ApiError
from .timing import Ewma

DEFAULT_SERVICE_S = 1.0  # time per request assumed before one was measured
MAX_CLIENTS = 4096  # clients whose service history a gate keeps


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


def next_turn(waiting: Iterable[str], vtime: Mapping[str, float]) -> str:
    """Whose waiter gets a freed slot: the waiting client with the least weighted service so
    far (ties: the one named first, i.e. the longest-queued client)."""
    return min(waiting, key=lambda who: vtime.get(who, 0.0))


def fuller(waiting: Mapping[str, int], who: str) -> str | None:
    """When the queue is full: the client with the most waiters, if it has more than `who`
    (then its newest waiter makes room for `who`'s request)."""
    heaviest = max(waiting, key=lambda w: waiting[w], default=None)
    if heaviest is None or waiting[heaviest] <= waiting.get(who, 0) + 1:
        return None
    return heaviest


class Pushed(Exception):
    """This waiter lost its place to a lighter client's request (the queue was full)."""


class Gate:
    def __init__(
        self,
        model: str,
        limits: Limits,
        service_time: Ewma | None = None,
        weights: Mapping[str, float] | None = None,
    ):
        self.model = model
        self.limits = limits
        self.service_time = service_time or Ewma()
        self.weights = weights if weights is not None else {}  # client -> weight (default 1)
        self.in_flight = 0
        # client -> its waiters, oldest first; insertion order = who started waiting first
        self.waiters: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self.vtime: dict[str, float] = {}  # client -> weighted grants (start-time fair queuing)

    async def enter(self, who: str = "") -> None:
        verdict = decide(self.in_flight, self.queued, self.limits)
        if verdict is Verdict.RUN:
            self.in_flight += 1
            self._charge(who)
            return
        if verdict is Verdict.REJECT:
            heaviest = fuller({w: len(q) for w, q in self.waiters.items()}, who)
            queue = self.waiters[heaviest] if heaviest is not None else None
            while queue and queue[-1].done():  # gone already (cancelled, not yet removed)
                queue.pop()
            if not queue or heaviest is None:
                raise self._full()
            queue.pop().set_exception(Pushed())  # its newest makes room
            self._forget(heaviest)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if who not in self.waiters:  # (re)joining: no credit for the time it was idle
            floor = min((self.vtime.get(w, 0.0) for w in self.waiters), default=None)
            if floor is not None:
                self.vtime[who] = max(self.vtime.get(who, 0.0), floor)
            self.waiters[who] = collections.deque()
        self.waiters[who].append(fut)
        t0 = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancel that
            # comes with the grant, and a client that left would then run its request anyway.
            async with asyncio.timeout(self.limits.queue_timeout):
                await fut
        except Pushed:
            raise self._full() from None
        except BaseException as exc:  # timed out, or the caller went away
            if fut.done() and not fut.cancelled():
                self.leave()  # granted in the same instant: hand the slot on
            else:
                fut.cancel()
                with contextlib.suppress(KeyError, ValueError):
                    self.waiters[who].remove(fut)
                self._forget(who)
            if isinstance(exc, TimeoutError):
                raise ApiError(
                    429,
                    f"model {self.model}: no slot freed within {time.monotonic() - t0:.0f} s "
                    f"({self.in_flight} running, {self.queued} queued); retry shortly",
                    "queue_timeout",
                    self._retry_after(),
                ) from None
            raise

    def _full(self) -> ApiError:
        return ApiError(
            429,
            f"model {self.model} is at capacity: {self.in_flight} requests running and "
            f"{self.queued} queued (limits {self.limits.max_in_flight} and "
            f"{self.limits.max_queue}); retry shortly",
            "rate_limited",
            self._retry_after(),
        )

    def _charge(self, who: str) -> None:
        self.vtime[who] = self.vtime.get(who, 0.0) + 1.0 / self.weights.get(who, 1.0)
        if len(self.vtime) > MAX_CLIENTS:  # many addresses: keep only those waiting
            self.vtime = {w: v for w, v in self.vtime.items() if w in self.waiters or w == who}

    def _forget(self, who: str) -> None:
        if who in self.waiters and not self.waiters[who]:
            del self.waiters[who]

    def _retry_after(self) -> float:
        return retry_after(
            self.queued, self.limits, self.service_time.get(self.model, DEFAULT_SERVICE_S)
        )

    def leave(self) -> None:
        """Release a slot: the next waiting client in fair order takes it."""
        while self.waiters:
            who = next_turn(self.waiters, self.vtime)
            queue = self.waiters[who]
            fut = queue.popleft()
            self._forget(who)
            if not fut.done():
                fut.set_result(None)  # in_flight stays: the slot passes on
                self._charge(who)
                return
        self.in_flight -= 1
        if not self.waiters and self.in_flight == 0:
            self.vtime.clear()  # all quiet: nobody's history matters any more

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiters.values())
