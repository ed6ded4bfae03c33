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

log = logging.getLogger(__name__)

KEY = "placer"
LEASE_TTL_S = 3.0
RENEW_S = 0.5
BUS_QUIET_S = 3 * RENEW_S  # no lease round answered this long: the bus, not the hosts, is away


class Lease:
    def __init__(self, kv: KeyValue, holder: str):
        self.kv = kv
        self.holder = holder
        self.held = False
        # When the bus last came back (a round that worked after one that failed, or the
        # first): what a placer did not hear before then says nothing about the hosts.
        self.bus_back_at = 0.0
        self.last_ok = 0.0  # when a round last got its answers from the bus
        self._bus_ok = False

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
                self._bus_ok = False
            return self._set(False)
        if not self._bus_ok:
            self._bus_ok = True
            self.bus_back_at = time.time()
        self.last_ok = time.time()
        return self._set(True)

    def bus_answering(self, now: float) -> bool:
        """Whether the bus answered a lease round lately (a frozen server does not)."""
        return now - self.last_ok <= BUS_QUIET_S

    def _set(self, held: bool) -> bool:
        if held != self.held:
            log.info("placer %s %s the lease", self.holder, "holds" if held else "lost")
        self.held = held
        return held

    async def hold(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.try_acquire()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RENEW_S)
        if self.held:  # hand over at once on a clean stop
            with contextlib.suppress(Exception):
                await self.kv.delete(KEY)
        self.held = False
