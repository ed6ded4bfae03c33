"""Leadership: one active placer at a time, standbys take over within LEASE_TTL_S.

The lease is a KV record {holder, ts}. The holder renews it every RENEW_S with a
compare-and-set on the revision it last wrote; a standby takes it over with the same
compare-and-set once `ts` is older than LEASE_TTL_S. Two standbys racing for it cannot both
win: only one `update(last=rev)` succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

import proto
from lls.aio import wait_event

log = logging.getLogger(__name__)

KEY = "placer"
LEASE_TTL_S = 3.0
RENEW_S = 0.5


class Lease:
    def __init__(self, kv: KeyValue, holder: str):
        self.kv = kv
        self.holder = holder
        self.held = False

    async def try_acquire(self) -> bool:
        """One round: renew if ours, take over if expired; returns whether we hold it now."""
        record = proto.encode(proto.LeaseRecord(holder=self.holder, ts=time.time()))
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            entry = None
        try:
            if entry is None or not entry.value:
                await self.kv.create(KEY, record)
            else:
                cur = proto.decode(entry.value, proto.LeaseRecord)
                if cur.holder != self.holder and time.time() - cur.ts < LEASE_TTL_S:
                    return self._set(False)
                await self.kv.update(KEY, record, last=entry.revision)
        except (KeyWrongLastSequenceError, Exception) as e:  # lost the race, or bus trouble
            if not isinstance(e, KeyWrongLastSequenceError):
                log.warning("lease round failed: %s", e)
            return self._set(False)
        return self._set(True)

    def _set(self, held: bool) -> bool:
        if held != self.held:
            log.info("placer %s %s the lease", self.holder, "holds" if held else "lost")
        self.held = held
        return held

    async def hold(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:  # a round the bus never answers is a lost round, not a held lease
                async with asyncio.timeout(LEASE_TTL_S):
                    await self.try_acquire()
            except TimeoutError:
                log.warning("lease round got no answer in %.0f s", LEASE_TTL_S)
                self._set(False)
            await wait_event(stop, RENEW_S)
        if self.held:  # hand over at once on a clean stop
            with contextlib.suppress(Exception):
                await self.kv.delete(KEY)
        self.held = False
