"""Feeds the view from the bus: the event stream (recent past, then live) and KV watchers.

Every change is applied to the view and published to the hub as one SSE message, all on the
event loop, so a snapshot taken between two changes is consistent with the deltas after it.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import msgspec
from nats.aio.msg import Msg

import proto
from lls.aio import wait_event
from lls.bus import Bus, watch_kv
from lls.event_feed import EventFeed
from services.ui.hub import Hub
from services.ui.view import View, decode_event

log = logging.getLogger(__name__)

REPLAY_MSGS = 5000  # how far back the event stream is read on start (progress included)
CATCH_UP_S = 3.0  # how long start() waits for the replay before serving anyway

WATCHED = {
    proto.KV_HOSTS: proto.HostRecord,
    proto.KV_INSTANCES: proto.InstanceRecord,
    proto.KV_ACTIVITY: proto.ActivityReport,
    proto.KV_DESIRED: proto.DesiredModel,  # who asked for a model's load or stop (timelines)
}


class Feed:
    def __init__(self, bus: Bus, view: View, hub: Hub):
        self.bus = bus
        self.view = view
        self.hub = hub
        self._events: EventFeed | None = None
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._replay_target = 0
        self._caught_up = asyncio.Event()

    async def start(self) -> None:
        for bucket, typ in WATCHED.items():
            self._tasks.append(
                asyncio.create_task(
                    watch_kv(
                        self.bus,
                        self.bus.kv[bucket],
                        typ,
                        functools.partial(self._put, bucket),
                        functools.partial(self._apply, bucket),
                        self._stop,
                    )
                )
            )
        await self._subscribe_events()
        self._tasks.append(asyncio.create_task(self._sample()))
        await wait_event(self._caught_up, CATCH_UP_S)

    async def _sample(self) -> None:
        """A chart point per series every few seconds, whether or not anything changed:
        a flat line is news too (and rates need a steady clock)."""
        while not self._stop.is_set():
            await asyncio.sleep(self.view.history.every_s)
            try:
                self.hub.publish("history", msgspec.json.encode(self.view.sample()))
            except Exception:  # one bad record must not end the charts
                log.exception("ui: chart sample failed")

    async def _subscribe_events(self) -> None:
        """The recent past (REPLAY_MSGS events), then live; `start` returns once the replay
        reached the stream's end as it was (or after CATCH_UP_S)."""
        info = await self.bus.js.stream_info(proto.EVENTS_STREAM)
        self._replay_target = info.state.last_seq
        if self._replay_target == 0:
            self._caught_up.set()
        start = max(info.state.first_seq, self._replay_target - REPLAY_MSGS + 1)
        if start > info.state.first_seq:  # timelines say where they begin
            self.view.replay_from = start
        self._events = EventFeed(self.bus, self._on_event, after=max(0, start - 1))
        await self._events.start()

    async def _on_event(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        ev = decode_event(msg.subject, msg.data)
        if ev is not None and self.view.apply_event(seq, ev):
            self.hub.publish("event", msgspec.json.encode(ev))
        if seq >= self._replay_target:
            self._caught_up.set()

    def _put(self, bucket: str, key: str, rec: object, _revision: int) -> None:
        self._apply(bucket, key, msgspec.to_builtins(rec))

    def _apply(self, bucket: str, key: str, rec: dict | None = None) -> None:
        try:
            self.view.apply_kv(bucket, key, rec)
            self.hub.publish(
                "kv", msgspec.json.encode({"bucket": bucket, "key": key, "value": rec})
            )
        except Exception:  # one bad record must not end the watch
            log.exception("ui: bad %s entry %s", bucket, key)

    async def stop(self) -> None:
        if self._events is not None:
            await self._events.stop()
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
