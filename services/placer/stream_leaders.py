"""Where the NATS cluster's raft leaders sit: with the leading placer, so that losing any
other host's NATS server costs no election (issue 21).

Each stream and bucket is replicated (`nats.replicas`) and only its raft leader takes
writes. When the server holding a leader goes away, that stream takes no write until the
others elect a new one: 4-9 s in nats-server (its raft election timeout, a constant; see
bench/bench_nats_election.py). Moving a lost host's models needs writes to most streams
(events, commands, instance records and keys), and every host's heartbeat goes to one of
them, so a lost host whose server led any of them used to cost that election on top of
`host_lost_after`.

So the leading placer asks, every SEAT_EVERY_S, for each stream's leader and each command
consumer's leader to move to the server it is attached to itself (a step-down with a
preferred server: about 20 ms without writes, which the writers' retries cover). Losing any
other server then costs no election; losing the placer's own costs one, but then the
placer is gone too, and a standby takes over.

The lease bucket is the exception. Its leader goes to a standby's server: when the
leader's host is cut, the standby can then take the lease over within its TTL, where on the
leader's own server the take-over would wait for the election. Standbys say which server
they are attached to in a record `standby.<host>` of the lease bucket, renewed every
SEAT_EVERY_S; with no standby known, the lease bucket's leader stays where it is.

The choice is the pure `moves()`; `StreamLeaders` reads the cluster and carries it out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import proto
from lls.aio import wait_event
from lls.auth import JS
from lls.bus import Bus, kv_snapshot
from lls.streams import BUCKETS, STREAMS

from .lease import Lease

log = logging.getLogger(__name__)

SEAT_EVERY_S = 2.0
# The command consumers (two per host) are listed less often: the list is long at scale, and
# their leaders move only after an election. A new leader lists them at once.
CONSUMERS_EVERY_S = 10.0
CONSUMER_PAGE = 256
STANDBY_PREFIX = "standby."
STANDBY_FRESH_S = 30.0  # a standby record older than this (by its writer's clock) is ignored
LEASE_STREAM = f"KV_{proto.KV_LEASES}"


@dataclass(frozen=True)
class Seat:
    """A raft group's leader: a stream's (`consumer` "") or a command consumer's."""

    stream: str
    consumer: str
    leader: str  # server name; "" while there is none
    current: frozenset[str]  # servers with a current replica, the leader included

    @property
    def name(self) -> str:
        return f"{self.stream}/{self.consumer}" if self.consumer else self.stream


def lease_home(
    standbys: Iterable[proto.LeaseRecord], home: str, now: float, fresh_s: float = STANDBY_FRESH_S
) -> str:
    """The server for the lease bucket's leader: the freshest standby's, if it is attached
    to another server than the leader (`home`); "" when there is none. The records' `ts` is
    their writers' clock: good enough for a preference, never for the lease itself."""
    fresh = [s for s in standbys if s.node and s.node != home and now - s.ts < fresh_s]
    return max(fresh, key=lambda s: s.ts).node if fresh else ""


def moves(seats: Iterable[Seat], home: str, lease_to: str) -> list[tuple[Seat, str]]:
    """(seat, server to move its leader to) for each leader not where it should be: the
    lease bucket's at `lease_to` (if any), every other at `home`. Only to a server with a
    current replica, and only when there is a leader to step down."""
    out = []
    for seat in seats:
        want = lease_to if seat.stream == LEASE_STREAM and not seat.consumer else home
        if want and seat.leader and seat.leader != want and want in seat.current:
            out.append((seat, want))
    return out


def _seat(stream: str, consumer: str, cluster: object) -> Seat | None:
    """A Seat from nats-py's ClusterInfo; None for a single server (nothing to move)."""
    replicas = getattr(cluster, "replicas", None) or []
    leader = getattr(cluster, "leader", None) or ""
    if cluster is None or not replicas:
        return None
    current = {r.name for r in replicas if r.current and not r.offline}
    return Seat(stream, consumer, leader, frozenset(current | ({leader} if leader else set())))


class StreamLeaders:
    """Keeps the raft leaders with the leading placer (see the module's note); a standby
    only says where it is."""

    def __init__(self, bus: Bus, lease: Lease, host_id: str):
        self.bus, self.lease, self.host_id = bus, lease, host_id
        self._failed_said = False
        self._consumers_due = 0.0  # time.monotonic() when the consumers are listed next

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if self.lease.valid():
                    await self.seat()
                else:
                    self._consumers_due = 0.0
                    await self.announce()
                self._failed_said = False
            except Exception as e:  # noqa: BLE001 - the cluster is busy: next round
                if not self._failed_said:
                    log.warning("raft leaders not checked: %r", e)
                    self._failed_said = True
            await wait_event(stop, SEAT_EVERY_S)

    async def announce(self) -> None:
        node = self.bus.server_name()
        if node:
            record = proto.LeaseRecord(holder=self.lease.holder, ts=time.time(), node=node)
            await self.bus.put(self.bus.leases, STANDBY_PREFIX + self.host_id, record)

    async def seats(self) -> list[Seat]:
        js, out = self.bus.js, []
        names = [s.name for s in STREAMS] + [f"KV_{b.bucket}" for b in BUCKETS]
        for name in names:
            seat = _seat(name, "", (await js.stream_info(name)).cluster)
            if seat is None:
                return []  # one server: nothing to move anywhere
            out.append(seat)
        if time.monotonic() < self._consumers_due:
            return out
        self._consumers_due = time.monotonic() + CONSUMERS_EVERY_S
        listed = 0
        while True:  # the server lists 256 at most per page: two per host at 1,000 hosts
            page = await js.consumers_info(proto.CMDS_STREAM, offset=listed)
            listed += len(page)
            for ci in page:
                if (seat := _seat(proto.CMDS_STREAM, ci.name, ci.cluster)) is not None:
                    out.append(seat)
            if len(page) < CONSUMER_PAGE:
                return out

    async def seat(self) -> None:
        home = self.bus.server_name()
        if not home:
            return
        seats = await self.seats()
        if not seats:
            return
        records = await kv_snapshot(self.bus, self.bus.leases, proto.LeaseRecord)
        standbys = [r for k, r in records.items() if k.startswith(STANDBY_PREFIX)]
        for seat, to in moves(seats, home, lease_home(standbys, home, time.time())):
            if seat.consumer:
                subject = f"{JS}.CONSUMER.LEADER.STEPDOWN.{seat.stream}.{seat.consumer}"
            else:
                subject = f"{JS}.STREAM.LEADER.STEPDOWN.{seat.stream}"
            body = json.dumps({"placement": {"preferred": to}}).encode()
            reply = json.loads((await self.bus.nc.request(subject, body, timeout=2)).data)
            if reply.get("success"):
                log.info("raft leader of %s moved from %s to %s", seat.name, seat.leader, to)
            else:
                log.warning("raft leader of %s not moved to %s: %s", seat.name, to, reply)
