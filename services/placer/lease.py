"""Leadership: one acting placer at a time, fenced by epochs, judged by local time only.

The lease is the KV record "placer" (proto.LeaseRecord {holder, epoch, ts}). Every write of
it is a compare-and-set on the revision last seen, so of several placers racing for it only
one wins each revision.

- Epoch. A take-over writes epoch = max(old epoch, old revision) + 1 (with the record the
  only key of its bucket, that is the revision of the take-over write itself); renewals keep
  it. Epochs thus grow with every take-over, and no two placers ever own the same one. Every
  command the leader sends carries its epoch; agents and downloaders refuse one lower than
  the highest they have seen (lls/fence.py).
- Standby. It never reads the holder's clock (`ts` is for people): it takes over only once
  it has seen the same revision of the record, unchanged, for the TTL on its own clock, or
  at once when the record was handed over on a clean stop (holder "") or never existed.
- Leader. Its lease counts as valid until the local time it *sent* its last successful
  renewal + TTL - MARGIN_S. A standby starts counting no earlier than that renewal landed
  (after it was sent), so the leader stops acting before any standby may take over, whatever
  the clocks of the two hosts say. `valid()` is checked right before each command and each
  instance-record write; `check()` raises LeaseLost there, which aborts the placer's pass.

Local time is CLOCK_BOOTTIME where there is one: unlike CLOCK_MONOTONIC it goes on counting
while the host is suspended, so a leader resumed from a suspend sees that its lease lapsed.

The judgements are pure functions of plain values (time passed in), unit-tested in
tests/test_fencing.py; `Lease` only carries them out against KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

import proto
from lls.aio import wait_event

log = logging.getLogger(__name__)

KEY = "placer"
LEASE_TTL_S = 3.0  # a standby takes over after this long without a renewal (its own clock)
RENEW_S = 0.5  # the leader renews this often: several tries fit in one TTL
# The leader stops acting this long before a standby may take over: room for a command that
# passed its check to land first, and for the two hosts' clocks ticking at slightly
# different rates.
MARGIN_S = 1.0


def local_clock() -> float:
    """Seconds on this host's clock that never jumps and counts through a suspend."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


class LeaseLost(Exception):
    """This placer may not act: its lease lapsed or passed to another placer."""


# ------------------------------------------------------------------ pure judgements


@dataclass(frozen=True)
class Seen:
    """A standby's sight of the lease record: its revision (0: there never was one), and
    when, on the standby's own clock, it first saw that revision."""

    revision: int
    since: float


def observe(prev: Seen | None, revision: int, now: float) -> Seen:
    """The sight after reading `revision` at `now` (the time the read's answer arrived, so
    never before the record was written). A new revision restarts the count."""
    if prev is not None and prev.revision == revision:
        return prev
    return Seen(revision, now)


def may_take_over(seen: Seen, record: proto.LeaseRecord | None, now: float, ttl_s: float) -> bool:
    """Whether a standby may try to take the lease: handed over on a clean stop, never
    held, or the same revision unchanged for `ttl_s` of the standby's own time."""
    if record is not None and not record.holder:
        return True  # the last holder handed over and stopped acting before it did
    if record is None and seen.revision == 0:
        return True  # never held by anyone
    return now - seen.since >= ttl_s


def next_epoch(record: proto.LeaseRecord | None, revision: int, known: int = 0) -> int:
    """The epoch of a take-over that replaces `revision`: above every earlier epoch (each was
    at most the revision of its own take-over write, which `revision` is at or after), even
    when the record was deleted meanwhile (the bucket's revisions never go back). `known`:
    the highest epoch this placer led in, should the bucket itself have been lost (a NATS
    server started afresh), as agents remember theirs."""
    return max(record.epoch if record is not None else 0, revision, known) + 1


def valid_until(renew_sent_at: float, ttl_s: float, margin_s: float) -> float:
    """Until when a leader may act, on its own clock, after a renewal it sent at
    `renew_sent_at` succeeded."""
    return renew_sent_at + ttl_s - margin_s


# ------------------------------------------------------------------ the lease against KV


class Lease:
    def __init__(
        self,
        kv: KeyValue,
        holder: str,
        *,
        ttl_s: float = LEASE_TTL_S,
        renew_s: float = RENEW_S,
        margin_s: float = MARGIN_S,
        clock: Callable[[], float] = local_clock,
    ):
        assert 0 < margin_s < ttl_s and renew_s < ttl_s - margin_s
        self.kv = kv
        self.holder = holder
        self.ttl_s, self.renew_s, self.margin_s = ttl_s, renew_s, margin_s
        self.clock = clock
        self.epoch = 0  # the epoch we lead in (0: never led)
        self._leading = False  # we won the lease and nobody took it since, as far as we know
        self._rev = 0  # revision of our last write
        self._until = -math.inf  # valid_until of our last successful renewal
        self._seen: Seen | None = None
        self._lapsed_said = False

    # ---------------------------------------------------------------- asked by the placer

    def valid(self) -> bool:
        """Whether this placer may act now: it leads, and its last renewal is recent enough
        that no standby can have taken over."""
        return self._leading and self.clock() < self._until

    @property
    def held(self) -> bool:
        return self.valid()

    def check(self) -> None:
        """Raise LeaseLost unless this placer may act now (before a command or a write)."""
        if not self.valid():
            raise LeaseLost(
                f"placer {self.holder} may not act: its lease (epoch {self.epoch}) "
                + ("lapsed" if self._leading else "is not held")
            )

    # ---------------------------------------------------------------- rounds

    async def try_acquire(self) -> bool:
        """One round: renew if we lead, else look and take over if we may; whether we may
        act now."""
        if self._leading:
            sent = self.clock()
            try:
                self._rev = await self.kv.update(KEY, self._record(self.epoch), last=self._rev)
            except KeyWrongLastSequenceError:
                pass  # someone wrote it since: read it below (perhaps our own lost answer)
            else:
                self._until = valid_until(sent, self.ttl_s, self.margin_s)
                self._lapsed_said = False
                return True
        record, revision = await self._read()
        if self._leading:
            if record is not None and record.holder == self.holder and record.epoch == self.epoch:
                # a renewal of ours landed but its answer was lost: renew from it next round
                self._rev = revision
                return self.valid()
            self._leading, self._until = False, -math.inf
            who = record.holder if record is not None and record.holder else "nobody"
            log.warning(
                "placer %s lost the lease to %s (epoch %d); it stops acting",
                self.holder,
                who,
                record.epoch if record is not None else 0,
            )
        self._seen = observe(self._seen, revision, self.clock())
        if not may_take_over(self._seen, record, self.clock(), self.ttl_s):
            return False
        epoch = next_epoch(record, revision, self.epoch)
        sent = self.clock()
        try:
            self._rev = await self.kv.update(KEY, self._record(epoch), last=revision)
        except KeyWrongLastSequenceError:
            return False  # another placer was faster; we see its record next round
        self.epoch, self._leading = epoch, True
        self._until = valid_until(sent, self.ttl_s, self.margin_s)
        self._seen, self._lapsed_said = None, False
        prev = f" from {record.holder}" if record is not None and record.holder else ""
        log.info("placer %s holds the lease (epoch %d)%s", self.holder, epoch, prev)
        return True

    def _record(self, epoch: int) -> bytes:
        return proto.encode(proto.LeaseRecord(holder=self.holder, ts=time.time(), epoch=epoch))

    async def _read(self) -> tuple[proto.LeaseRecord | None, int]:
        """The record and its revision; (None, revision of its deletion, or 0: never)."""
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError as e:  # deleted (its tombstone's revision), or never written
            return None, e.entry.revision if e.entry is not None else 0
        if not entry.value:
            return None, entry.revision
        try:
            return proto.decode(entry.value, proto.LeaseRecord), entry.revision
        except ValueError:  # not ours to read: judge it like any record, by time unchanged
            return proto.LeaseRecord(holder="?", ts=0.0), entry.revision

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew or watch until `stop`, then hand over at once."""
        try:
            while not stop.is_set():
                t0 = self.clock()
                try:  # a round the bus never answers is a lost round: the lease lapses alone
                    async with asyncio.timeout(self.ttl_s):
                        await self.try_acquire()
                except TimeoutError:
                    log.warning("lease round got no answer in %.0f s", self.ttl_s)
                except Exception as e:  # noqa: BLE001 - bus trouble: try again next round
                    log.warning("lease round failed: %r", e)
                if self._leading and not self.valid() and not self._lapsed_said:
                    log.warning(
                        "placer %s could not renew its lease in time; it stops acting until "
                        "it does (or another placer takes over)",
                        self.holder,
                    )
                    self._lapsed_said = True
                await wait_event(stop, max(0.0, self.renew_s - (self.clock() - t0)))
        finally:
            await self.release()

    async def release(self) -> None:
        """Stop acting now, then hand the lease over (its epoch kept, so the next leader's
        is higher): a standby takes it at once instead of waiting out the TTL."""
        if not self._leading:
            return
        self._leading, self._until = False, -math.inf  # before the record says so
        handed = proto.LeaseRecord(holder="", ts=time.time(), epoch=self.epoch)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.kv.update(KEY, proto.encode(handed), last=self._rev)
                log.info("placer %s handed the lease over (epoch %d)", self.holder, self.epoch)
