"""Follow the event stream in order, each event once, across NATS node failures.

nats-py's ordered consumer restarts itself after a gap it notices, but a node killed under
load can still hand it a repeated or out-of-order delivery (seen once in CI: a hole in what a
test's consumer received while the stream held every event). So the sequence is checked
here too, where it is cheap: a repeat is dropped, and a hole resubscribes from the first
missing sequence. Events aged out of the stream by its limits are passed over; a hole that
fresh subscriptions keep showing (a deleted event) is logged and passed.

A reconnect (`Bus.reconnects`) resubscribes too: a restarted server forgets the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

import proto
from lls.bus import Bus

log = logging.getLogger(__name__)

RECONNECT_CHECK_S = 1.0
MAX_HOLE_TRIES = 3  # fresh subscriptions that may show the same hole before it is believed
MAX_HOLES = 100


class EventFeed:
    """Calls `on_event(msg)` for each event after sequence `after`, in stream order, once."""

    def __init__(self, bus: Bus, on_event: Callable[[Msg], Awaitable[None]], after: int = 0):
        self.bus = bus
        self.on_event = on_event
        self.last = after  # the last sequence passed on
        self.heals = 0  # resubscriptions after a hole or a reconnect
        # (first, last) missing in the stream itself, the latest MAX_HOLES
        self.holes: deque[tuple[int, int]] = deque(maxlen=MAX_HOLES)
        self._generation = 0
        self._sub: Any = None
        self._healing: asyncio.Task[None] | None = None
        self._hole_at = -1  # the first missing sequence of the hole last resubscribed for
        self._hole_tries = 0
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._subscribe()
        self._watch = asyncio.create_task(self._follow_reconnects())

    async def stop(self) -> None:
        for task in (self._watch, self._healing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self._unsubscribe()

    async def _subscribe(self) -> None:
        self._generation += 1
        generation = self._generation

        async def on_msg(msg: Msg) -> None:
            if generation == self._generation:
                await self._on_msg(msg)

        await self._unsubscribe()
        self._sub = await self.bus.js.subscribe(
            proto.EVENTS_SUBJECTS,
            stream=proto.EVENTS_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.last + 1
            ),
        )

    async def _unsubscribe(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.last:
            return  # a repeat
        if seq > self.last + 1:
            if self._hole_at != self.last + 1:
                self._hole_at, self._hole_tries = self.last + 1, 0
            self._hole_tries += 1
            if self._hole_tries <= MAX_HOLE_TRIES:
                self._heal(f"events {self.last + 1}..{seq - 1} skipped")
                return
            self.holes.append((self.last + 1, seq - 1))
            log.warning("the event stream holds no events %d..%d", self.last + 1, seq - 1)
        self.last = seq
        await self.on_event(msg)

    def _heal(self, why: str) -> None:
        self._generation += 1  # what the old subscription still delivers is ignored
        self.heals += 1
        log.info("event feed: %s; resubscribing after %d", why, self.last)
        if self._healing is None or self._healing.done():
            self._healing = asyncio.create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        while True:
            try:
                first = (await self.bus.js.stream_info(proto.EVENTS_STREAM)).state.first_seq
                if first > self.last + 1:  # aged out by the stream's limits meanwhile
                    self.holes.append((self.last + 1, first - 1))
                    self.last = first - 1
                await self._subscribe()
                return
            except Exception as e:  # noqa: BLE001 - the bus may be electing leaders
                log.warning("event feed: could not resubscribe: %s", e)
                await asyncio.sleep(RECONNECT_CHECK_S)

    async def _follow_reconnects(self) -> None:
        generation = self.bus.reconnects
        while True:
            await asyncio.sleep(RECONNECT_CHECK_S)
            if self.bus.reconnects != generation:
                generation = self.bus.reconnects
                self._heal("the bus reconnected")
