"""A lost host's instances out of the gateway's view at once, on the placer's word.

The placer publishes `host.lost` when it finds a host silent; the gateway hears it as a plain
NATS message, which needs no stream leader and no KV watch. The LOST records the placer
writes come through the instances watch, whose consumer lives on one NATS server: when the
lost host ran that server, the watch is set up again only after a new server takes it over
(and perhaps a JetStream election), while requests would go on to a host that never answers.

So the event overrides the records it speaks of (`LostHosts.host_lost`): each live instance
of that host is shown LOST, which ends the requests in flight there (Router.abort_lost) and
sends new ones to wait for another instance. The override of an instance ends with
  - a newer record of it (the placer's own LOST, or whatever came since),
  - the host heard again (`host.back`, or `host.joined` after a restart),
  - LOST_MARK_S (a missed host.back must not keep an instance out for good).
Only the placer may publish host.lost (lls/auth.py); host.joined, which agents publish, can
only bring back what the records say.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

import proto
from proto import InstanceRecord, InstanceState

log = logging.getLogger(__name__)

LOST_MARK_S = 60.0  # a host.lost event overrides its instances' records at most this long
HOST_EVENTS = tuple(proto.evt(kind) for kind in ("host.lost", "host.back", "host.joined"))


@dataclass(frozen=True)
class LostMark:
    """`held` is the instance's record as the watch gave it, `shown` the LOST copy the view
    uses instead."""

    held: InstanceRecord
    shown: InstanceRecord


@dataclass
class LostHosts:
    """The overrides of one view. `put(record)` is the view's own update (Router.on_instance),
    through which a mark's LOST copy is shown and, when the mark ends, its record again."""

    put: Callable[[InstanceRecord], None]
    marks: dict[str, LostMark] = field(default_factory=dict)  # instance id -> its override

    def shown(self, rec: InstanceRecord) -> InstanceRecord:
        """What the view shows for `rec`, a record the watch brought: its LOST copy if it is
        the one a loss overrode (delivered again), else `rec` (a newer one ends the mark)."""
        mark = self.marks.get(rec.instance_id)
        if mark is None:
            return rec
        if rec == mark.held:
            return mark.shown
        del self.marks[rec.instance_id]
        return rec

    def deleted(self, instance_id: str) -> None:
        self.marks.pop(instance_id, None)

    def host_lost(self, host_id: str, reason: str, instances: Iterable[InstanceRecord]) -> None:
        """`host_id` is lost: its live records among `instances` (the view's) are shown LOST."""
        loop = asyncio.get_running_loop()
        live = [r for r in instances if r.host == host_id and r.state in proto.LIVE_STATES]
        for rec in live:
            lost = msgspec.structs.replace(rec, state=InstanceState.LOST, reason=reason)
            mark = self.marks[rec.instance_id] = LostMark(rec, lost)
            loop.call_later(LOST_MARK_S, self._end, rec.instance_id, mark)
            self.put(rec)  # (shown as the mark's LOST copy)
        if live:
            log.warning("host %s lost: %d instance(s) out of the view", host_id, len(live))

    def host_back(self, host_id: str) -> None:
        """`host_id` is heard again: its instances are what their records say again."""
        for iid, mark in list(self.marks.items()):
            if mark.held.host == host_id:
                self._end(iid, mark)

    def _end(self, iid: str, mark: LostMark) -> None:
        if self.marks.get(iid) is mark:
            del self.marks[iid]
            self.put(mark.held)

    async def on_event(self, msg, instances: Callable[[], Iterable[InstanceRecord]]) -> None:  # type: ignore[no-untyped-def]
        try:
            ev = proto.decode(msg.data, proto.Event)
        except msgspec.DecodeError:
            return
        if isinstance(ev, proto.HostLost):
            self.host_lost(ev.host_id, ev.reason, instances())
        elif isinstance(ev, proto.HostBack | proto.HostJoined):
            self.host_back(ev.host_id)
