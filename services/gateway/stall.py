"""The stall invariant, watched from outside the admission code: a request never waits while
a READY, non-draining instance of its model has a free slot.

A free slot beside a waiting request means a wake-up was lost somewhere between "a slot freed
/ an instance became ready / a drain was cancelled / a reload raised a limit" and "the next
waiter was sent" (issue 18's READY model that served one request a second while 43 waited).
Admission wakes waiters on each of those events; this watch samples what the router sees,
independently of how admission got there, so a lost wake-up shows as a violation instead of
hiding behind the next periodic tick.

"Waits" means queued at admission, not yet granted; a granted request on its way to an
instance counts as using the slot it will take (on a loaded 2-core host the event loop can
take tens of milliseconds to run it, which is latency, not a lost wake-up). Sampled every
SAMPLE_S while anything waits (never on the request path); a violation is an episode where
the condition held for at least GRACE_S. `lls_stall_violations_total` counts episodes and
`lls_stall_seconds_total` their time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from lls.aio import wait_event
from proto import InstanceRecord

from .admission import Gate
from .metrics import Metrics
from .router import Router

SAMPLE_S = 0.02
GRACE_S = 0.05
IDLE_S = 1.0  # with nothing waiting, look again after this (or when a queue forms)


def free_slots(
    ready: Iterable[InstanceRecord],
    sent: Mapping[str, int],
    expected: int,
    granted: int,
    max_in_flight: int,
) -> int:
    """Slots nobody uses on a model's ready instances: each has its record's slots (or
    `expected`, for an older agent's record), less the requests sent to it (`sent`, per
    instance) and the `granted` ones on their way out (admitted, not sent yet: each will
    take a slot), within what gateway.max_in_flight allows."""
    free = used = 0
    for r in ready:
        n = sent.get(r.instance_id, 0)
        used += n
        free += max(0, (r.slots or expected) - n)
    return max(0, min(free - granted, max_in_flight - used - granted))


def stalled(waiting: int, free: int) -> bool:
    return waiting > 0 and free > 0


class StallWatch:
    """Per model: when its current episode began; counts finished episodes in `metrics`.
    `gates`: the admission gates (model -> Gate), whose queues are the waiting requests."""

    def __init__(self, router: Router, gates: Mapping[str, Gate], metrics: Metrics) -> None:
        self.router = router
        self.gates = gates
        self.metrics = metrics
        self.since: dict[str, float] = {}  # model -> when its ongoing episode began

    def sample(self, now: float) -> None:
        router = self.router
        limit = router.cfg.gateway.max_in_flight
        for model, gate in self.gates.items():
            waiting = gate.queued
            if not waiting and model not in self.since:
                continue
            ready = router.ready.get(model, ())
            granted = max(0, gate.in_flight - router.sent_to(model))
            free = free_slots(ready, router.in_flight, router.slots_expected(model), granted, limit)
            if stalled(waiting, free):
                self.since.setdefault(model, now)
            elif (began := self.since.pop(model, None)) is not None:
                self._count(model, now - began)

    def _count(self, model: str, seconds: float) -> None:
        if seconds >= GRACE_S:
            self.metrics.stall_violations.labels(model).inc()
            self.metrics.stall_seconds.labels(model).inc(seconds)

    async def run(self, stop: asyncio.Event) -> None:
        began = self.router.queue_began
        while not stop.is_set():
            self.sample(time.monotonic())
            if self.since or any(g.queued for g in self.gates.values()):
                await asyncio.sleep(SAMPLE_S)
            else:  # nothing waits: sleep until a queue forms
                began.clear()
                await wait_event(began, IDLE_S)
