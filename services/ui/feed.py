"""Feeds the view from the bus: the event stream (recent past, then live) and KV watchers.

Every change is applied to the view and published to the hub as one SSE message, all on the
event loop, so a snapshot taken between two changes is consistent with the deltas after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

import proto
from lls.bus import Bus
from services.ui.hub import Hub
from services.ui.view import View, decode_event, decode_record

log = logging.getLogger(__name__)

REPLAY_MSGS = 5000  # how far back the event stream is read on start (progress included)
CATCH_UP_S = 3.0  # how long start() waits for the replay before serving anyway

WATCHED = {
    proto.KV_HOSTS: proto.HostRecord,
    proto.KV_INSTANCES: proto.InstanceRecord,
    proto.KV_ACTIVITY: proto.ActivityReport,
}


class Feed:
    def __init__(self, bus: Bus, view: View, hub: Hub):
        self.bus = bus
        self.view = view
        self.hub = hub
        self._sub = None
        self._watchers: list[KeyValue.KeyWatcher] = []
        self._tasks: list[asyncio.Task] = []
        self._replay_target = 0
        self._caught_up = asyncio.Event()

    async def start(self) -> None:
        for bucket, typ in WATCHED.items():
            watcher = await self.bus.kv[bucket].watchall()
            self._watchers.append(watcher)
            self._tasks.append(asyncio.create_task(self._watch(bucket, typ, watcher)))
        await self._subscribe_events()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._caught_up.wait(), CATCH_UP_S)

    async def _subscribe_events(self) -> None:
        info = await self.bus.js.stream_info(proto.EVENTS_STREAM)
        last = info.state.last_seq
        self._replay_target = last
        if last == 0:
            self._caught_up.set()
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        else:
            start = max(info.state.first_seq, last - REPLAY_MSGS + 1)
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            )
        # An ordered consumer: no acks, and nats-py restarts it after the last seen sequence
        # when it detects a gap or a reconnect.
        self._sub = await self.bus.js.subscribe(
            proto.EVENTS_SUBJECTS,
            stream=proto.EVENTS_STREAM,
            cb=self._on_event,
            ordered_consumer=True,
            config=config,
        )

    async def _on_event(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        ev = decode_event(msg.subject, msg.data)
        if ev is not None and self.view.apply_event(seq, ev):
            self.hub.publish("event", msgspec.json.encode(ev))
        if seq >= self._replay_target:
            self._caught_up.set()

    async def _watch(self, bucket: str, typ: type, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                continue
            try:
                rec = None
                if entry.operation not in (KV_DEL, KV_PURGE) and entry.value:
                    rec = decode_record(typ, entry.value)
                self.view.apply_kv(bucket, entry.key, rec)
                self.hub.publish(
                    "kv", msgspec.json.encode({"bucket": bucket, "key": entry.key, "value": rec})
                )
            except Exception:  # one bad record must not end the watch
                log.exception("ui: bad %s entry %s", bucket, entry.key)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
