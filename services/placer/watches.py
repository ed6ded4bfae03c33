"""What the placer knows: the read views its KV watches and event subscriptions keep.

The watch callbacks (`on_host`, `on_instance`, `on_activity`, ...) only refresh these views,
the placement index among them, and wake the loop; the one loop task (`service.Placer`)
decides from them. Event callbacks hand their events to the loop (`inbox`, `demanded`)
rather than act. Hosts are judged by when their heartbeats *arrived* here (`heard`), on our
clock, never before the bus or the heartbeats came back after a silence of them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left, insort

import msgspec
from nats.js.errors import KeyNotFoundError

import proto
from lls.bus import Bus
from lls.config import Config
from lls.records import InstanceIndex
from proto import InstanceRecord, InstanceState

from .activity import ACTIVITY_STALE_S, ReportedUse, merge_activity
from .memory import MeasuredKey, remember_measured
from .placement_index import PlacementIndex
from .plan_view import DEMAND_FRESH_S
from .turns import Waiting, merged_queues

log = logging.getLogger(__name__)

HOSTS_GAP_BEATS = 3  # no heartbeat from any host for this many heartbeat periods: a bus stall
INBOX_MAX = 10_000  # events waiting for the next pass (a flood beyond it is dropped)
GATEWAY_GONE_S = 600.0  # a gateway not heard from this long is forgotten


class ReadyRevs(dict[str, int]):
    """instance -> the KV revision of the record that said READY (the placer's `ready_rev`),
    also sorted by revision: the ones newer than a gateway has seen (unsettled) are found
    without reading them all."""

    def __init__(self) -> None:
        super().__init__()
        self._log: list[tuple[int, str]] = []  # (revision, id), sorted; stale entries too

    def __setitem__(self, iid: str, rev: int) -> None:
        super().__setitem__(iid, rev)
        insort(self._log, (rev, iid))
        if len(self._log) > 2 * len(self) + 64:
            self._log = sorted((r, i) for i, r in self.items())

    def setdefault(self, iid: str, rev: int) -> int:  # type: ignore[override]
        if iid not in self:
            self[iid] = rev
        return self[iid]

    def newer_than(self, rev: int) -> frozenset[str]:
        """Those whose READY record is newer than revision `rev`."""
        log = self._log
        return frozenset(i for r, i in log[bisect_left(log, (rev + 1,)) :] if self.get(i) == r)


class Watches:
    """The views, fed by the watches and subscriptions `service.Placer.run` sets up."""

    def __init__(self, cfg: Config, bus: Bus, wake: asyncio.Event, index: PlacementIndex) -> None:
        self.cfg = cfg
        self.bus = bus
        self.wake = wake
        self.hosts: dict[str, proto.HostRecord] = {}
        self.received: dict[str, float] = {}  # host -> when its last heartbeat arrived
        self.host_revs: dict[str, int] = {}  # host -> KV revision of that heartbeat
        # When heartbeats arrived again after none came from any host for a while: the
        # hosts bucket took no writes (a NATS leader election) or our watch stalled.
        self.hosts_back_at = 0.0
        self.last_heartbeat = 0.0  # when any host's heartbeat last arrived (0: none yet)
        self.instances: dict[str, InstanceRecord] = {}
        self.revisions: dict[str, int] = {}
        # instance -> revision of the record that said READY (also sorted by revision)
        self.ready_rev = ReadyRevs()
        # The hosts and instances indexed for placement (placement_index.py)
        self.placement_index = index
        self.activity: dict[str, proto.ActivityReport] = {}  # gateway -> its report, whole
        self.reported = ReportedUse()
        self.headers: dict[str, proto.ModelInfo] = {}  # model -> header read from its source
        self.lost: set[str] = set()  # hosts found lost (the executor keeps it)
        self.demanded: dict[str, float] = {}  # model -> demand since the last pass
        self.last_demand: dict[str, float] = {}  # model -> when demand last arrived
        # Stored intent (KV desired): model -> request, and the revision to update it at
        self.desired: dict[str, proto.DesiredModel] = {}
        self.desired_rev: dict[str, int] = {}
        self.inbox: list[proto.Event] = []
        # DOWNLOADING instance -> the lease epoch its DownloadFile was last sent in
        self.download_epoch: dict[str, int] = {}
        # (model, ctx_size, GPU name) -> the most an instance was measured to hold: rebuilt
        # from heartbeats, so nothing is persisted
        self.measured: dict[MeasuredKey, int] = {}
        # instance id -> the API key issued for it (KV instance keys, lls/instance_key.py),
        # and one record per instance id, the placed host's (lls/records.py)
        self.keys: dict[str, proto.InstanceKey] = {}
        self.instance_index = InstanceIndex(
            self.on_instance,
            self.on_instance_del,
            lambda *a: self.bus.refuse_record(*a),
            vouched_only=True,  # a host cannot make us count an instance we never placed
        )
        # the first pass waits for these buckets' current values (or LOADED_WITHIN_S)
        self.keys_loaded = asyncio.Event()
        self.instances_loaded = asyncio.Event()

    # ------------------------------------------------------------------ hosts

    def on_host(self, key: str, rec: proto.HostRecord, rev: int) -> None:
        if rev and rev == self.host_revs.get(rec.host_id):
            # The record we have, delivered again (a watch set up anew, e.g. after its NATS
            # server was cut off): no news of the host. Counting it as a heartbeat restarted
            # a lost host's silence each time a watch was set up again.
            return
        now = time.time()
        last_any, self.last_heartbeat = self.last_heartbeat or now, now
        if now - last_any > HOSTS_GAP_BEATS * self.cfg.agent.heartbeat_s:
            # Nobody's heartbeat for a while, then some: the silence was the bus's, not the
            # hosts' (they all beat each second); judging it would reschedule every model.
            log.warning(
                "no heartbeat from any host for %.1f s: silences count from now", now - last_any
            )
            self.hosts_back_at = now
        self.hosts[rec.host_id] = rec
        self.placement_index.put_host(rec)
        self.received[rec.host_id] = now  # our clock: hosts' clocks may be off
        self.host_revs[rec.host_id] = rev
        if rec.measured:
            self.measured = remember_measured(self.measured, rec.measured)
        self.wake.set()

    def on_host_del(self, key: str) -> None:
        self.hosts.pop(key, None)
        self.placement_index.delete_host(key)
        self.host_revs.pop(key, None)
        self.received.pop(key, None)

    def heard(self) -> dict[str, float]:
        """When each host was last heard, on our clock; never before the bus last came back
        to us, nor before heartbeats came again after none came from any host: a placer
        must judge hosts by their silence, not by the bus's."""
        back = max(self.bus.back_at, self.hosts_back_at)
        if not self.received or back <= min(self.received.values()):
            return dict(self.received)  # (the usual case, without a Python loop over hosts)
        return {h: max(t, back) for h, t in self.received.items()}

    async def confirm_silence(self, now: float) -> bool:
        """Read a host that has been silent for half of host_lost_after before judging it.
        A KV watch can die quietly with the NATS server behind it while the bus still answers
        through another server of the cluster; the placer must not call hosts lost, nor
        refuse placements, because its own view stopped. A heartbeat the watch missed is
        taken, and every watch is set up again. False when a read failed (the cluster is
        electing the bucket's leader): nobody is judged on this pass, and the next pass,
        once reads work, judges by the real silence (no penalty for the election)."""
        half = self.cfg.placer.host_lost_after / 2
        heard = self.heard()
        suspects = sorted(h for h, t in heard.items() if now - t > half and h not in self.lost)
        missed = False
        for host in suspects:
            try:
                async with asyncio.timeout(2):
                    entry = await self.bus.hosts.get(proto.kv_key(host))
            except KeyNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - the bus is failing over: judge nobody now
                log.warning("cannot confirm host %s is silent (%r); judging no host now", host, e)
                return False
            if entry.value and (entry.revision or 0) > self.host_revs.get(host, 0):
                self.on_host(
                    entry.key, proto.decode(entry.value, proto.HostRecord), entry.revision or 0
                )
                missed = True
        if missed:
            log.warning("the hosts watch missed heartbeats: setting every watch up again")
            self.bus.reconnects += 1
        return True

    # ------------------------------------------------------------------ instances, keys, headers

    def on_instance(self, key: str, rec: InstanceRecord, rev: int) -> None:
        old = self.instances.get(rec.instance_id)
        self.instances[rec.instance_id] = rec
        self.placement_index.put_instance(rec)
        self.revisions[rec.instance_id] = rev
        if rec.state == InstanceState.READY:
            if old is not None and old.state == InstanceState.DRAINING:
                self.ready_rev[rec.instance_id] = rev  # serves again: unsettled till reported
            else:
                self.ready_rev.setdefault(rec.instance_id, rev)
        elif rec.state != InstanceState.DRAINING:
            self.ready_rev.pop(rec.instance_id, None)
        if seeded := self.reported.seed(rec):  # (only one live from before a report's floor)
            self.activity.update(seeded)
            self._index_reports({gw: {rec.instance_id} for gw in seeded})
        self.wake.set()

    def on_key(self, _key: str, placed: proto.InstanceKey, _rev: int) -> None:
        self.keys[placed.instance_id] = placed
        self.instance_index.placed(placed.instance_id, placed.host)

    def on_key_del(self, key: str) -> None:
        iid = proto.instance_of_key(key)
        if self.keys.pop(iid, None) is not None:
            self.instance_index.placed(iid, None)

    def on_instance_del(self, key: str) -> None:
        iid = proto.instance_of_key(key)
        self.instances.pop(iid, None)
        self.reported.forget(iid)
        self.placement_index.delete_instance(iid)
        self.revisions.pop(iid, None)
        self.ready_rev.pop(iid, None)

    def on_header(self, key: str, info: proto.ModelInfo, _rev: int) -> None:
        self.headers[info.model] = info
        self.wake.set()

    def on_header_del(self, key: str) -> None:
        self.headers = {m: i for m, i in self.headers.items() if proto.kv_key(m) != key}

    def live(self, model: str) -> list[InstanceRecord]:
        return [
            r
            for r in self.instances.values()
            if r.model == model and r.state in proto.LIVE_STATES and r.host not in self.lost
        ]

    def header(self, model: str) -> proto.ModelInfo | None:
        """The header read from the model's configured source, or its failure to read."""
        info = self.headers.get(model)
        mcfg = self.cfg.models.get(model)
        return info if info is not None and mcfg is not None and info.url == mcfg.url else None

    # ------------------------------------------------------------------ gateway reports

    def on_activity(self, key: str, rep: proto.ActivityReport, _rev: int) -> None:
        # A compact report made whole (activity.ReportedUse): what every reader expects
        whole, changed = self.reported.take(rep, self.instances.values())
        self.activity[rep.gateway_id] = whole
        # A gateway gone this long (restarted under a new id, or stopped) is forgotten: its
        # record's TTL ends without a deletion reaching the watch, and its rebuilt list
        # holds an entry per instance
        for gw in [g for g, r in self.activity.items() if r.ts < rep.ts - GATEWAY_GONE_S]:
            del self.activity[gw]
            self.reported.gone(gw)
        self._index_reports({rep.gateway_id: changed} if changed is not None else None)
        if rep.draining or rep.queues:
            self.wake.set()  # a drain may be done, or a queue formed: decide now

    def on_activity_del(self, key: str) -> None:
        self.activity.pop(key, None)
        self.reported.gone(key)
        self._index_reports()

    def _index_reports(self, changed: dict[str, set[str]] | None = None) -> None:
        """The reports that count now, merged into the placement index here rather than on
        the decision path (which merges again only what went stale since)."""
        fresh_after = time.time() - ACTIVITY_STALE_S
        fresh = [r for r in self.activity.values() if r.ts >= fresh_after]
        self.placement_index.set_reports(fresh, changed)

    def merged_activity(self) -> dict[str, proto.InstanceActivity]:
        """In-flight counts summed and last use maxed over every gateway's report."""
        return merge_activity(self.activity.values(), time.time() - ACTIVITY_STALE_S)

    def queues(self) -> dict[str, Waiting]:
        """What waits per model at the gateways that reported lately."""
        return merged_queues(self.activity.values(), time.time() - ACTIVITY_STALE_S)

    def unsettled(self, now: float) -> frozenset[str]:
        """READY instances some live gateway has not reported on since it saw them ready:
        its waiting requests may be about to start there (no clocks compared)."""
        seen = [r.instances_rev for r in self.activity.values() if r.ts >= now - ACTIVITY_STALE_S]
        if not seen:  # none lately: no gateway at all, or we cannot tell (the bus was away)
            return frozenset(self.ready_rev) if self.activity else frozenset()
        return self.ready_rev.newer_than(min(seen))

    def activity_known(self, now: float) -> bool:
        """Whether the gateways' reports tell what is in use: some are fresh, or there are
        none at all. Reports that all went stale mean the bus was away, not that nothing is
        used: idle stops wait until the gateways report again."""
        return not self.activity or any(
            r.ts >= now - ACTIVITY_STALE_S for r in self.activity.values()
        )

    # ------------------------------------------------------------------ stored intent, events

    def on_desired(self, key: str, want: proto.DesiredModel, rev: int) -> None:
        self.desired[want.model] = want
        self.desired_rev[want.model] = rev
        if want.wanted:
            self.wake.set()

    def on_desired_del(self, key: str) -> None:
        for model in [m for m in self.desired if proto.kv_key(m) == key]:
            self.desired.pop(model, None)
            self.desired_rev.pop(model, None)

    async def on_demand(self, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            ev = proto.decode(msg.data, proto.Demand)
        except msgspec.ValidationError:
            return
        self.demanded[ev.model] = time.time()
        self.wake.set()

    def take_demand(self, now: float) -> dict[str, float]:
        """The demand events since the last pass (model -> when), those still fresh."""
        # Demand events are taken once; what still waits shows in the gateways' queues.
        fresh, self.demanded = self.demanded, {}
        for model, at in fresh.items():
            self.last_demand[model] = max(at, self.last_demand.get(model, 0.0))
        return {m: at for m, at in fresh.items() if now - at < DEMAND_FRESH_S}

    async def on_stop_requested(self, msg) -> None:  # type: ignore[no-untyped-def]
        # Only turned into a stored request (KV desired) by the leader's pass; `lls stop`
        # writes that request itself, so nothing depends on this event being heard.
        self._enqueue(msg.data, proto.StopRequested)

    async def on_file_request(self, msg) -> None:  # type: ignore[no-untyped-def]
        kinds = {"pull": proto.PullRequested, "delete": proto.DeleteRequested}
        self._enqueue(msg.data, kinds.get(msg.subject.split(".")[-2]))

    async def on_download(self, msg) -> None:  # type: ignore[no-untyped-def]
        kinds = {"failed": proto.DownloadFailed, "completed": proto.DownloadCompleted}
        self._enqueue(msg.data, kinds.get(msg.subject.rsplit(".", 1)[-1]))

    def _enqueue(self, data: bytes, typ: type | None) -> None:
        """Callbacks only hand events to the loop, which alone decides and writes."""
        if typ is not None:
            try:
                event = proto.decode(data, typ)
            except msgspec.ValidationError:
                return
            if len(self.inbox) < INBOX_MAX:
                self.inbox.append(event)
        self.wake.set()
