"""Admission control: a bounded queue and a concurrency limit per model, fair across clients.

`decide`, `running_limit`, `next_turn`, `grant_order` and `retry_after` are the policy, pure
functions. `Gate` holds the state (one per model, touched only from the event loop) and
grants slots only to callers still waiting: a client that gave up (cancelled) never takes or
pins a slot (llama-swap's lesson).

The running limit follows the model's slots: each ready instance runs as many requests at
once as its llama-server has slots (its record's `slots`, read from /props; llama-server's
own default is 4 sharing one unified KV cache), at most gateway.max_in_flight in all, and
the rest wait here, where fairness, queue positions and the placer's view of the wait hold,
not in llama-server's own FIFO where nobody sees them. With no instance ready it is one
instance's slots: those go on to demand a start, the rest wait for it. When an instance
becomes ready the gate grants its waiters up to the new limit at once (`Gate.fill`); when one
goes, running requests are not cut, new ones queue.

Hand-off overlap (`overlap_limit`): while at most one client waits for the model, the gate
lets one more request per slot go on to wait inside llama-server, so a slot that finishes
starts the next request at once instead of idling for the round trip back to the gateway
and out again. When a second client waits the plain limit holds, so fairness is unchanged:
a newcomer waits behind at most one extra request per slot.

Fairness: each caller says who it is (its API key's name, or its address when keys are off).
Inside the model's queue every client has its own FIFO, and a freed slot goes to the waiting
client with the least weighted service so far (start-time fair queuing: each grant adds
1/weight to that client's virtual time; a client that was idle starts at the virtual time of
the last grant, so idling banks no credit, and its request goes before the next of those that
were served meanwhile). One client flooding the queue therefore delays another by at most the
requests already running, not by the flood. When the queue is full, a newcomer whose
client waits less than the heaviest one takes the place of that client's newest waiter
(which gets the 429): a flood cannot lock the others out either.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import ApiError
from .timing import Ewma

DEFAULT_SERVICE_S = 1.0  # time per request assumed before one was measured
MAX_CLIENTS = 4096  # clients whose service history a gate keeps
BY_ADDRESS = "(by address)"  # clients known only by address, summed in the activity report
T = TypeVar("T")


class Verdict(enum.Enum):
    RUN = "run"
    QUEUE = "queue"
    REJECT = "reject"


@dataclass(frozen=True)
class Limits:
    max_in_flight: int  # requests running at once for one model (across its instances), at most
    max_queue: int  # requests waiting for a slot; one more is refused with 429
    queue_timeout: float  # seconds a queued request waits for a slot before 429
    # A request queued while the model has no ready instance (it waits for a start or a swap
    # before it can wait for a slot) may wait this much longer: a cold start's deadline.
    start_timeout: float = 0.0
    overlap: bool = False  # gateway.overlap: one more request per slot while one client waits


@dataclass(frozen=True)
class Room:
    """What a model has to run requests on, as this gateway sees it now."""

    slots: int  # requests its ready instances run at once in all (one instance's if none is)
    ready: int  # ready instances
    start_s: float = 0.0  # how long a start (or swap) took lately, for Retry-After
    # Requests still running on its instances that left the ready set (draining: a swap, a
    # reload, a replica retiring): they hold admission slots but none of `slots`.
    held: int = 0


# A gate that is told nothing about instances: max_in_flight alone limits it.
UNBOUNDED = Room(slots=1 << 30, ready=1)


def running_limit(max_in_flight: int, room: Room) -> int:
    """Requests of a model that may run at once: every slot of its ready instances, within
    max_in_flight; with none ready, one instance's slots (they go on to demand a start).
    Requests still finishing on a draining instance are counted on top: they must not keep
    a ready instance's free slots from its waiters."""
    return max(1, min(max_in_flight, room.slots + room.held))


def overlap_limit(max_in_flight: int, room: Room, clients_waiting: int) -> int:
    """The running limit with the hand-off overlap: one more request per slot of a ready
    instance while at most one client waits (see the module's note), within max_in_flight."""
    base = running_limit(max_in_flight, room)
    if room.ready == 0 or clients_waiting > 1:
        return base
    return max(base, min(max_in_flight, 2 * room.slots + room.held))


def decide(in_flight: int, queued: int, limit: int, max_queue: int) -> Verdict:
    if in_flight < limit and queued == 0:
        return Verdict.RUN
    if queued < max_queue:
        return Verdict.QUEUE
    return Verdict.REJECT


def retry_after(queued: int, limit: int, service_s: float, start_s: float = 0.0) -> float:
    """A hint for Retry-After: how long the queue ahead takes to drain at the measured service
    rate (`limit` requests at a time, `service_s` each), after a start if one is awaited."""
    return max(1.0, min(300.0, start_s + (queued + 1) * service_s / max(1, limit)))


def next_turn(waiting: Iterable[str], vtime: Mapping[str, float]) -> str:
    """Whose waiter gets a freed slot: the waiting client with the least weighted service so
    far (ties: the one named first, i.e. the longest-queued client)."""
    return min(waiting, key=lambda who: vtime.get(who, 0.0))


def grant_order(
    queues: Mapping[str, Sequence[T]],
    vtime: Mapping[str, float],
    weights: Mapping[str, float],
    until: object = None,
) -> list[T]:
    """The waiters in the order the gate will grant them, if nobody new comes: `next_turn`
    played forward, each grant charging 1/weight as a real one does (stops at `until`)."""
    heads = {who: 0 for who, q in queues.items() if q}  # keeps the clients' order
    v = dict(vtime)
    out: list[T] = []
    while heads:
        who = next_turn(heads, v)
        item = queues[who][heads[who]]
        out.append(item)
        if until is not None and item == until:
            break
        heads[who] += 1
        if heads[who] == len(queues[who]):
            del heads[who]
        v[who] = v.get(who, 0.0) + 1.0 / weights.get(who, 1.0)
    return out


def stage_of(gated: bool, ready: bool, running: int, slots: int, starting: str) -> str:
    """What a waiting request waits for, in words: a slot of a running model, or the model
    itself (`starting`: the router's account of its start or swap)."""
    if gated and ready:
        return f"waiting for a free slot ({running} running on {slots})"
    return starting


def fuller(waiting: Mapping[str, int], who: str) -> str | None:
    """When the queue is full: the client with the most waiters, if it has more than `who`
    (then its newest waiter makes room for `who`'s request)."""
    heaviest = max(waiting, key=lambda w: waiting[w], default=None)
    if heaviest is None or waiting[heaviest] <= waiting.get(who, 0) + 1:
        return None
    return heaviest


class Pushed(Exception):
    """This waiter lost its place to a lighter client's request (the queue was full)."""


@dataclass(eq=False)
class Waiter:
    fut: asyncio.Future[None]
    ticket: int | None  # the router's ticket for it (its place in the model's queue)
    overlap: bool = True  # may be sent on to wait inside a busy slot (see overlap_limit)


class Gate:
    def __init__(
        self,
        model: str,
        limits: Limits,
        service_time: Ewma | None = None,
        weights: Mapping[str, float] | None = None,
        room: Callable[[], Room] | None = None,
    ):
        self.model = model
        self.limits = limits
        self.service_time = service_time or Ewma()
        self.weights = weights if weights is not None else {}  # client -> weight (default 1)
        self.room = room or (lambda: UNBOUNDED)  # the model's instances, asked when needed
        self.in_flight = 0
        # client -> its waiters, oldest first; insertion order = who started waiting first
        self.waiters: dict[str, collections.deque[Waiter]] = {}
        self.vtime: dict[str, float] = {}  # client -> weighted grants (start-time fair queuing)
        self.vnow = 0.0  # the virtual time the last grant started at (SFQ's system time)
        self._version = 0  # bumped by every change to the waiters: `order` is cached on it
        self._order: tuple[int, list[int | None]] = (-1, [])

    @property
    def limit(self) -> int:
        """Requests that may be sent now: overlap_limit of the model's instances as they are
        and of who waits (the plain running limit once two clients wait)."""
        return self.limit_for(True)

    @property
    def slots(self) -> int:
        """Requests that may run now without waiting inside llama-server (no overlap)."""
        return running_limit(self.limits.max_in_flight, self.room())

    def limit_for(self, overlap: bool) -> int:
        room = self.room()
        if not (overlap and self.limits.overlap):
            return running_limit(self.limits.max_in_flight, room)
        return overlap_limit(self.limits.max_in_flight, room, len(self.waiters))

    def would_queue(self, overlap: bool = True) -> bool:
        """Whether a request arriving now would wait here (not run at once, not be refused).
        `overlap`: whether it may be sent on to wait in a busy slot (a streamed answer may
        not: it waits here, where it hears its place in the queue)."""
        limit = self.limit_for(overlap)
        return decide(self.in_flight, self.queued, limit, self.limits.max_queue) is Verdict.QUEUE

    async def enter(self, who: str = "", ticket: int | None = None, overlap: bool = True) -> None:
        """Take a slot of the model, waiting in `who`'s line for one if none is free.
        `ticket` names the waiter in `order` (the router's ticket for the request);
        `overlap`: whether it may be sent on to wait inside a busy slot (not a stream: it
        would hear nothing of its wait there, and be held behind a long answer)."""
        self.fill()  # the limit may have grown since the last grant (an instance came)
        limit = self.limit_for(overlap)
        verdict = decide(self.in_flight, self.queued, limit, self.limits.max_queue)
        if verdict is Verdict.RUN:
            self.in_flight += 1
            self._charge(who)
            return
        if verdict is Verdict.REJECT:
            heaviest = fuller({w: len(q) for w, q in self.waiters.items()}, who)
            queue = self.waiters[heaviest] if heaviest is not None else None
            while queue and queue[-1].fut.done():  # gone already (cancelled, not yet removed)
                queue.pop()
            if not queue or heaviest is None:
                raise self._full()
            queue.pop().fut.set_exception(Pushed())  # its newest makes room
            self._forget(heaviest)
            self._version += 1
        waiter = Waiter(asyncio.get_running_loop().create_future(), ticket, overlap)
        if who not in self.waiters:  # (re)joining: no credit for the time it was idle
            self.vtime[who] = max(self.vtime.get(who, 0.0), self.vnow)
            self.waiters[who] = collections.deque()
        self.waiters[who].append(waiter)
        self._version += 1
        t0 = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancel that
            # comes with the grant, and a client that left would then run its request anyway.
            async with asyncio.timeout(self.patience()):
                await waiter.fut
        except Pushed:
            raise self._full() from None
        except BaseException as exc:  # timed out, or the caller went away
            fut = waiter.fut
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.leave()  # granted in the same instant: hand the slot on
            else:
                fut.cancel()
                with contextlib.suppress(KeyError, ValueError):
                    self.waiters[who].remove(waiter)
                    self._version += 1
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

    def patience(self) -> float:
        """How long a request queued now may wait: queue_timeout for a slot, and when the
        model has no ready instance, start_timeout more (it waits for a start or a swap)."""
        cold = self.room().ready == 0
        return self.limits.queue_timeout + (self.limits.start_timeout if cold else 0.0)

    def _full(self) -> ApiError:
        return ApiError(
            429,
            f"model {self.model} is at capacity: {self.in_flight} requests running and "
            f"{self.queued} queued (limits {self.limit} and "
            f"{self.limits.max_queue}); retry shortly",
            "rate_limited",
            self._retry_after(),
        )

    def _charge(self, who: str) -> None:
        start = max(self.vtime.get(who, 0.0), self.vnow)  # a waiter's own; an idle one's: now
        self.vnow = start
        self.vtime[who] = start + 1.0 / self.weights.get(who, 1.0)
        if len(self.vtime) > MAX_CLIENTS:  # many addresses: keep only those waiting
            self.vtime = {w: v for w, v in self.vtime.items() if w in self.waiters or w == who}

    def _forget(self, who: str) -> None:
        if who in self.waiters and not self.waiters[who]:
            del self.waiters[who]

    def _retry_after(self) -> float:
        room = self.room()
        return retry_after(
            self.queued,
            running_limit(self.limits.max_in_flight, room),
            self.service_time.get(self.model, DEFAULT_SERVICE_S),
            room.start_s if room.ready == 0 else 0.0,
        )

    def _grant_next(self) -> bool:
        """Give a slot to the next waiting client in fair order; False if nobody waits, or
        the next one may not be sent until a slot is really free (it does not overlap)."""
        while self.waiters:
            who = next_turn(self.waiters, self.vtime)
            waiter = self.waiters[who][0]
            if waiter.fut.done():  # gone (cancelled, not yet removed)
                self.waiters[who].popleft()
                self._forget(who)
                self._version += 1
                continue
            if self.in_flight >= self.limit_for(waiter.overlap):
                return False  # it waits for a free slot; nobody overtakes it
            self.waiters[who].popleft()
            self._forget(who)
            self._version += 1
            waiter.fut.set_result(None)
            self.in_flight += 1
            self._charge(who)
            return True
        return False

    def fill(self) -> int:
        """Grant waiters while slots are free (the limit may have grown: an instance became
        ready, a reload raised max_in_flight); how many were granted."""
        granted = 0
        while self.waiters and self.in_flight < self.limit and self._grant_next():
            granted += 1
        return granted

    def refuse_all(self, error: Exception) -> int:
        """Fail every waiter with `error` at once (its model was removed by a reload: none
        of them would ever be granted); how many there were."""
        refused = 0
        for queue in self.waiters.values():
            for waiter in queue:
                if not waiter.fut.done():
                    waiter.fut.set_exception(error)
                    refused += 1
        self.waiters.clear()
        self._version += 1
        return refused

    def leave(self) -> None:
        """Release a slot: the next waiting client in fair order takes it (unless the limit
        dropped meanwhile: then it is not handed on)."""
        self.in_flight -= 1
        self.fill()
        if not self.waiters and self.in_flight == 0:
            self.vtime.clear()  # all quiet: nobody's history matters any more
            self.vnow = 0.0

    def order(self) -> list[int | None]:
        """The waiters' tickets in the order they will be granted (cached until a change)."""
        if self._order[0] != self._version:
            queues = {w: [x.ticket for x in q if not x.fut.done()] for w, q in self.waiters.items()}
            self._order = (self._version, grant_order(queues, self.vtime, self.weights))
        return self._order[1]

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiters.values())
