"""The placer: turns demand into instances, level-triggered.

One asyncio task (`_loop`) owns every decision; KV watchers only refresh the read views it
decides from. Each pass looks at what the instance records say and takes the next step:

    demand for M, size unknown      -> a downloader reads M's header from its source first
    demand for M, no live instance  -> place (pure `placement.place`) -> record PENDING
    ... only busy models in the way -> they yield in turn (pure `turns`): DRAINING, then
                                       stopped once their requests finish; M waits
    DRAINING, moot or past deadline -> back to READY (past deadline: M's requests refused)
    PENDING/DOWNLOADING on host H   -> file in H's store? start it : send a download
    STARTING with no word from H    -> resend the (idempotent) start
    READY and idle too long         -> stop; host heartbeat stale -> instances LOST
    M busy, requests wait too long  -> another instance in free room (pure `replicas.plan`);
                                       one above replicas.min idle -> retire it

The periodic steps (lost hosts, drains ending, retiring, start/stop resends, idle stops,
purges), the gates before a placement and demand's decision after them (group make-way,
refuse, swap, create) are decided by the pure planner in `plan.py` from a frozen View;
`_execute` here carries its actions out. Timing kept between passes lives in
one per-key `Backoff`.

Commands are idempotent by instance id, so a pass repeated after a crash or by a new leader
does no harm. Only the leaseholder acts, and only while its lease is valid: each command
and record write is checked against it, and commands carry its epoch, which agents and
downloaders use to refuse a deposed leader's (see `lease.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

import proto
from lls import instance_key
from lls.aio import wait_event
from lls.bus import new_id, watch_kv
from lls.config import ModelConfig, launch_fingerprint, store_filename_of
from lls.records import InstanceIndex
from lls.service import ServiceContext
from proto import InstanceRecord, InstanceState, lifecycle

from .desired import DemandIt, Done, StopThese, next_step, pinned, preload_due
from .lease import Lease, LeaseLost
from .memory import (
    CPU_OVERHEAD_MIB,
    GPU_OVERHEAD_MIB,
    MeasuredKey,
    estimate_mib,
    gpu_needs,
    remember_measured,
)
from .placement import Need, NoFit, Placed
from .placement_index import PlacementIndex, ReadyRevs
from .plan import (
    ACTIVITY_STALE_S,
    DEMAND_FRESH_S,
    END_RECORD_TTL_S,
    HEADER_WAIT,
    INSPECT,
    NEVER_FITS_RETRY_S,
    NO_ROOM,
    RESENT,
    START_GRACE_S,
    STOP_GRACE_S,
    Action,
    Backoff,
    Create,
    Download,
    Drain,
    EndDrain,
    Fail,
    Hold,
    HostBack,
    HostLost,
    Limits,
    MarkLost,
    Purge,
    Refuse,
    ResendStart,
    ResendStop,
    Stop,
    View,
    Wait,
    advance_gate,
    check_start,
    check_stop,
    demand_gate,
    merge_activity,
    place_at_rest,
    place_in,
    plan_demand,
    plan_drains,
    plan_hosts,
    plan_retire,
    plan_upkeep,
    recent_failure,
)
from .reload import plan as reload_plan
from .replicas import AddReplica, StopReplica
from .replicas import plan as replica_plan
from .turns import Waiting, merged_queues, waiting_order

# (re-exported: tests and benches import them from here)
__all__ = [
    "END_RECORD_TTL_S",
    "NEVER_FITS_RETRY_S",
    "RESENT",
    "START_GRACE_S",
    "STOP_GRACE_S",
    "Placer",
    "run",
]

log = logging.getLogger(__name__)

TICK_S = 1.0
HOSTS_GAP_BEATS = 3  # no heartbeat from any host for this many heartbeat periods: a bus stall
INBOX_MAX = 10_000  # events waiting for the next pass (a flood beyond it is dropped)
BUSY_WAIT_S = 10.0  # a placed instance waits this long for its evicted victims' memory
INSPECT_WAIT_S = 10.0  # demand for a model of unknown size waits this long for its header
INSPECT_RETRY_S = 300.0  # a header that never came is asked for again after this
KEY_SWEEP_S = 10.0  # instance keys of ended (or vanished) instances are deleted this often


class Placer:
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.bus = ctx.bus
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
        # The Limits of the config sections they were built from (rebuilt after a reload),
        # and the hosts and instances indexed for placement (placement_index.py), fed by
        # the watches below
        self._limits_of: tuple[object, ...] = ()
        self._limits_built = Limits()
        limits = self._limits()
        self.placement_index = PlacementIndex(
            ram_reserve_mib=limits.ram_reserve_mib, keep_loaded=limits.keep_loaded
        )
        self.activity: dict[str, proto.ActivityReport] = {}
        self.headers: dict[str, proto.ModelInfo] = {}  # model -> header read from its source
        self.lost: set[str] = set()
        self.wake = asyncio.Event()
        self.demanded: dict[str, float] = {}  # model -> demand since the last pass
        self.last_demand: dict[str, float] = {}  # model -> when demand last arrived
        # Stored intent (KV desired): model -> request, and the revision to update it at
        self.desired: dict[str, proto.DesiredModel] = {}
        self.desired_rev: dict[str, int] = {}
        self.refused: dict[str, tuple[float, str]] = {}  # model -> last PlacementFailed
        self.inbox: list[proto.Event] = []
        # Per-key timing (plan.Backoff): header asks and waits, no room after a download,
        # no new swap after an abandoned one
        self.backoff = Backoff()
        # DOWNLOADING instance -> the lease epoch its DownloadFile was last sent in
        self.download_epoch: dict[str, int] = {}
        self.replica_blocked: dict[str, str] = {}  # model -> why its last replica found no room
        self.fetched: dict[tuple[str, str], float] = {}  # (host, file) downloaded -> when
        self.deleted: dict[tuple[str, str], float] = {}  # (host, file) told to delete -> when
        # (model, ctx_size, GPU name) -> the most an instance was measured to hold: rebuilt
        # from heartbeats, so nothing is persisted
        self.measured: dict[MeasuredKey, int] = {}
        self.started = time.time()
        self.lease = Lease(self.bus.leases, f"placer-{ctx.host_id}-{new_id()}")
        # instance id -> the API key issued for it (KV instance keys, lls/instance_key.py),
        # and one record per instance id, the placed host's (lls/records.py)
        self.keys: dict[str, proto.InstanceKey] = {}
        self.instance_index = InstanceIndex(
            self._on_instance, self._on_instance_del, lambda *a: self.bus.refuse_record(*a)
        )
        self.keys_swept = 0.0

    # ------------------------------------------------------------------ views

    def _on_host(self, key: str, rec: proto.HostRecord, rev: int) -> None:
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

    def _on_host_del(self, key: str) -> None:
        self.hosts.pop(key, None)
        self.placement_index.delete_host(key)
        self.host_revs.pop(key, None)
        self.received.pop(key, None)

    def _heard(self) -> dict[str, float]:
        """When each host was last heard, on our clock; never before the bus last came back
        to us, nor before heartbeats came again after none came from any host: a placer
        must judge hosts by their silence, not by the bus's."""
        back = max(self.bus.back_at, self.hosts_back_at)
        if not self.received or back <= min(self.received.values()):
            return dict(self.received)  # (the usual case, without a Python loop over hosts)
        return {h: max(t, back) for h, t in self.received.items()}

    async def _confirm_silence(self, now: float) -> bool:
        """Read a host that has been silent for half of host_lost_after before judging it.
        A KV watch can die quietly with the NATS server behind it while the bus still answers
        through another server of the cluster; the placer must not call hosts lost, nor
        refuse placements, because its own view stopped. A heartbeat the watch missed is
        taken, and every watch is set up again. False when a read failed (the cluster is
        electing the bucket's leader): nobody is judged on this pass, and the next pass,
        once reads work, judges by the real silence (no penalty for the election)."""
        half = self.cfg.placer.host_lost_after / 2
        heard = self._heard()
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
                self._on_host(
                    entry.key, proto.decode(entry.value, proto.HostRecord), entry.revision or 0
                )
                missed = True
        if missed:
            log.warning("the hosts watch missed heartbeats: setting every watch up again")
            self.bus.reconnects += 1
        return True

    def _on_instance(self, key: str, rec: InstanceRecord, rev: int) -> None:
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
        self.wake.set()

    def _on_key(self, _key: str, placed: proto.InstanceKey, _rev: int) -> None:
        self.keys[placed.instance_id] = placed
        self.instance_index.placed(placed.instance_id, placed.host)

    def _on_key_del(self, key: str) -> None:
        iid = proto.instance_of_key(key)
        if self.keys.pop(iid, None) is not None:
            self.instance_index.placed(iid, None)

    def _on_instance_del(self, key: str) -> None:
        iid = proto.instance_of_key(key)
        self.instances.pop(iid, None)
        self.placement_index.delete_instance(iid)
        self.revisions.pop(iid, None)
        self.ready_rev.pop(iid, None)

    def _on_header(self, key: str, info: proto.ModelInfo, _rev: int) -> None:
        self.headers[info.model] = info
        self.wake.set()

    def _on_header_del(self, key: str) -> None:
        self.headers = {m: i for m, i in self.headers.items() if proto.kv_key(m) != key}

    def _on_activity(self, key: str, rep: proto.ActivityReport, _rev: int) -> None:
        self.activity[rep.gateway_id] = rep
        self._index_reports()
        if rep.draining or rep.queues:
            self.wake.set()  # a drain may be done, or a queue formed: decide now

    def _on_activity_del(self, key: str) -> None:
        self.activity.pop(key, None)
        self._index_reports()

    def _index_reports(self) -> None:
        """The reports that count now, merged into the placement index here rather than on
        the decision path (which merges again only what went stale since)."""
        fresh_after = time.time() - ACTIVITY_STALE_S
        self.placement_index.set_reports([r for r in self.activity.values() if r.ts >= fresh_after])

    def merged_activity(self) -> dict[str, proto.InstanceActivity]:
        """In-flight counts summed and last use maxed over every gateway's report."""
        return merge_activity(self.activity.values(), time.time() - ACTIVITY_STALE_S)

    def _limits(self) -> Limits:
        """The knobs the planner reads, built once per config (re)load: a reload swaps the
        config's sections (lls.service.apply_live), and only then is this built again."""
        cfg = self.cfg
        of = (cfg.models, cfg.placer, cfg.gateway, cfg.downloader, cfg.agent, cfg.idle_timeout)
        old = self._limits_of
        if len(old) == len(of) and all(a is b for a, b in zip(old[:-1], of[:-1], strict=True)):
            if old[-1] == of[-1]:
                return self._limits_built
        self._limits_of = of
        self._limits_built = Limits(
            host_lost_after=cfg.placer.host_lost_after,
            failure_backoff=cfg.placer.failure_backoff,
            drain_timeout=cfg.placer.drain_timeout,
            request_timeout=cfg.gateway.request_timeout,
            idle_timeout=cfg.idle_timeout,
            download_timeout=cfg.downloader.timeout,
            idle_timeouts={
                n: m.idle_timeout for n, m in cfg.models.items() if m.idle_timeout is not None
            },
            models=frozenset(cfg.models),
            groups={n: m.group for n, m in cfg.models.items() if m.group},
            keep_loaded=frozenset(n for n, m in cfg.models.items() if m.keep_loaded),
            strategy=cfg.placer.strategy,
            min_turn=cfg.placer.min_turn,
            max_turn=max(cfg.placer.max_turn, cfg.placer.min_turn),
            ram_reserve_mib=cfg.agent.ram_reserve_mib,
        )
        return self._limits_built

    def _view(self, queues: dict[str, Waiting] | None = None, now: float | None = None) -> View:
        """What the planner decides from: the current views, read-only. Built right before
        each step, so a step sees what the one before it wrote. With `now`, also which READY
        instances are unsettled (only placements read that)."""
        return View(
            instances=self.instances,
            hosts=self.hosts,
            heard=self._heard(),
            lost=frozenset(self.lost),
            reports=self.activity.values(),
            # What waits at the gateways, as of their last reports: every decision that could
            # stop an instance must see it (a model with requests queued is never idle).
            queues=queues if queues is not None else self._queues(),
            last_demand=self.last_demand,
            limits=self._limits(),
            holds=self.backoff.view(),
            started=self.started,
            pinned=pinned(self.desired),
            epoch=self.lease.epoch,
            download_epochs=self.download_epoch,
            unsettled=self._unsettled(now) if now is not None else frozenset(),
            index=self.placement_index,
        )

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        stop = self.ctx.stop
        buses = [
            watch_kv(
                self.bus, self.bus.hosts, proto.HostRecord, self._on_host, self._on_host_del, stop
            ),
            watch_kv(
                self.bus,
                self.bus.instances,
                InstanceRecord,
                self.instance_index.put,
                self.instance_index.delete,
                stop,
            ),
            watch_kv(
                self.bus,
                self.bus.instance_keys,
                proto.InstanceKey,
                self._on_key,
                self._on_key_del,
                stop,
            ),
            watch_kv(
                self.bus,
                self.bus.models,
                proto.ModelInfo,
                self._on_header,
                self._on_header_del,
                stop,
            ),
            watch_kv(
                self.bus,
                self.bus.activity,
                proto.ActivityReport,
                self._on_activity,
                self._on_activity_del,
                stop,
            ),
            watch_kv(
                self.bus,
                self.bus.desired,
                proto.DesiredModel,
                self._on_desired,
                self._on_desired_del,
                stop,
            ),
            self.lease.hold(stop),
        ]
        tasks = [asyncio.create_task(c) for c in buses]
        subs = [
            await self.bus.subscribe(proto.evt("demand"), cb=self._on_demand),
            await self.bus.subscribe(proto.evt("download.*"), cb=self._on_download),
            await self.bus.subscribe(proto.evt("stop.requested"), cb=self._on_stop_requested),
            await self.bus.subscribe(proto.evt("pull.requested"), cb=self._on_file_request),
            await self.bus.subscribe(proto.evt("delete.requested"), cb=self._on_file_request),
        ]
        try:
            await self._loop()
        finally:
            for s in subs:
                await s.unsubscribe()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_demand(self, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            ev = proto.decode(msg.data, proto.Demand)
        except msgspec.ValidationError:
            return
        self.demanded[ev.model] = time.time()
        self.wake.set()

    async def _on_stop_requested(self, msg) -> None:  # type: ignore[no-untyped-def]
        # Only turned into a stored request (KV desired) by the leader's pass; `lls stop`
        # writes that request itself, so nothing depends on this event being heard.
        self._enqueue(msg.data, proto.StopRequested)

    def _on_desired(self, key: str, want: proto.DesiredModel, rev: int) -> None:
        self.desired[want.model] = want
        self.desired_rev[want.model] = rev
        if want.wanted:
            self.wake.set()

    def _on_desired_del(self, key: str) -> None:
        for model in [m for m in self.desired if proto.kv_key(m) == key]:
            self.desired.pop(model, None)
            self.desired_rev.pop(model, None)

    async def _on_file_request(self, msg) -> None:  # type: ignore[no-untyped-def]
        kinds = {"pull": proto.PullRequested, "delete": proto.DeleteRequested}
        self._enqueue(msg.data, kinds.get(msg.subject.split(".")[-2]))

    async def _on_download(self, msg) -> None:  # type: ignore[no-untyped-def]
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

    async def _handle_inbox(self) -> None:
        events, self.inbox = self.inbox, []
        for ev in events:
            if isinstance(ev, proto.StopRequested):
                await self._ask(ev.model, proto.WANT_STOP, ev.requested_by, "StopRequested event")
            elif isinstance(ev, proto.DownloadCompleted):
                # The file is there now; the host's next heartbeat would say so up to a
                # second later, and a swap would wait for it.
                self.fetched[(ev.host, ev.filename)] = time.time()
                self.deleted.pop((ev.host, ev.filename), None)
            elif isinstance(ev, proto.DownloadFailed):
                for rec in self._live(ev.model):
                    if rec.host == ev.host and rec.state == InstanceState.DOWNLOADING:
                        await self._fail(rec, f"download failed: {ev.reason}")
            elif isinstance(ev, proto.PullRequested):
                await self._pull(ev)
            elif isinstance(ev, proto.DeleteRequested):
                await self._delete_file(ev)

    async def _loop(self) -> None:
        await asyncio.sleep(0.5)  # let the watchers load current state first
        failed = 0  # passes failed in a row
        while not self.ctx.stop.is_set():
            self.wake.clear()
            if self.lease.valid():
                try:
                    await self.reconcile()
                    failed = 0
                except LeaseLost as e:  # lapsed mid-pass: not one more command or write
                    log.warning("pass aborted: %s", e)
                except Exception as e:  # a bad pass must not kill the placer; the next retries
                    failed += 1
                    if failed == 1:
                        log.exception("reconcile pass failed")
                    else:
                        log.warning("reconcile pass failed (%d in a row): %r", failed, e)
                    # Not at once: while the NATS cluster elects a stream's leader, every
                    # write fails, and each heartbeat would wake another failing pass.
                    await wait_event(self.ctx.stop, min(0.25 * 2 ** (failed - 1), 2.0))
            else:
                self.inbox.clear()  # the leader handles these; a standby must not replay them
            await wait_event(self.wake, TICK_S)

    # ------------------------------------------------------------------ one pass

    async def reconcile(self) -> None:
        now = time.time()
        if self.bus.silent_since is not None:
            return  # the bus is away: nothing we see now is current, nothing we write lands
        await self._handle_inbox()
        await self._mark_lost_hosts(now)
        await self._follow_desired(now)
        for model in self.backoff.keys(HEADER_WAIT):
            held = self.backoff.since(HEADER_WAIT, model, now)
            if self._header(model) is not None or now - held >= INSPECT_WAIT_S:
                self.backoff.clear(HEADER_WAIT, model)
                self.demanded.setdefault(model, now)
        # Demand events are taken once; what still waits shows in the gateways' queues.
        fresh, self.demanded = self.demanded, {}
        for model, at in fresh.items():
            self.last_demand[model] = max(at, self.last_demand.get(model, 0.0))
        fresh = {m: at for m, at in fresh.items() if now - at < DEMAND_FRESH_S}
        queues = merged_queues(self.activity.values(), now - ACTIVITY_STALE_S)
        await self._advance_drains(now, queues)
        await self._follow_config(now)
        order = waiting_order(fresh, queues)
        view = self._view(queues)  # (live proxies: each model's gates see the writes before)
        for model in order:
            await self._demand(model, now, queues, view)
        await self._replicas(now, queues, order)
        for rec in list(self.instances.values()):
            if rec.state in (InstanceState.PENDING, InstanceState.DOWNLOADING):
                await self._advance(rec, now)
        await self._upkeep(now)

    # ------------------------------------------------------------------ the executor

    async def _execute(self, actions: list[Action], now: float) -> None:
        """Carry out the planner's actions, in order. An action on an instance applies only
        to the record it was planned from: one changed since (by an earlier action here, or
        by an agent meanwhile) is left to the next pass, which plans from the newer record.
        Writes and commands go through `_write` and `_command`, so each checks the lease."""
        # Taken before the first await: the revisions the planner saw.
        planned = {
            a.instance_id: self.revisions.get(a.instance_id)
            for a in actions
            if hasattr(a, "instance_id")
        }
        for act in actions:
            if isinstance(act, HostLost):
                await self.bus.emit(proto.HostLost(host_id=act.host, reason=act.reason))
                self.lost.add(act.host)
                continue
            if isinstance(act, HostBack):
                await self.bus.emit(proto.HostBack(host_id=act.host, reason=act.reason))
                self.lost.discard(act.host)
                continue
            if isinstance(act, Refuse):
                await self._refuse(act.model, act.reason, act.retry_after)
                continue
            if isinstance(act, Hold):
                self.backoff.note(act.kind, act.key, now, wait=act.until - now)
                continue
            if isinstance(act, Wait):
                continue
            if isinstance(act, Drain):
                victims = [v for i in act.victims if (v := self.instances.get(i)) is not None]
                await self._drain(act.model, victims, act.reason, now)
                continue
            if isinstance(act, Create):
                await self._create(act.model, act.need, act.decision, now)
                continue
            iid: str = act.instance_id
            rec = self.instances.get(iid)
            if rec is None or self.revisions.get(iid) != planned.get(iid):
                continue
            if isinstance(act, MarkLost):
                await self._write(rec, state=InstanceState.LOST, reason=act.reason)
            elif isinstance(act, Stop):
                await self._stop(rec, act.reason)
            elif isinstance(act, Fail):
                await self._fail(rec, act.reason)
            elif isinstance(act, Download):
                mcfg = self.cfg.models.get(rec.model)
                if mcfg is None or rec.host is None:
                    continue
                if act.first:  # (the download goes out even if the write lost: as before)
                    await self._write(rec, state=InstanceState.DOWNLOADING, reason=act.reason)
                filename = store_filename_of(rec.model, mcfg)
                await self._download(rec.host, rec.model, mcfg, filename, f"dl-{iid}")
                self.download_epoch[iid] = self.lease.epoch
            elif isinstance(act, EndDrain):
                await self._end_drain(rec, act.stage, act.reason, now)
            elif isinstance(act, ResendStart):
                await self._resend_start(rec, act.reason)
            elif isinstance(act, ResendStop):
                if await self._write(rec, reason=act.reason):
                    await self._command(
                        proto.cmd_agent(rec.host or ""),
                        proto.StopInstance(
                            cmd_id=act.cmd_id, instance_id=iid, reason=act.stop_reason
                        ),
                    )
            elif isinstance(act, Purge):
                self.lease.check()
                await self.bus.instances.delete(proto.instance_key(rec.host or "", iid))

    async def _upkeep(self, now: float) -> None:
        """Resends, idle stops and purges (pure `plan.plan_upkeep`), then forget per-key
        state of instances that moved on."""
        await self._execute(plan_upkeep(self._view(), now), now)
        await self._sweep_keys(now)
        for iid in [i for i in self.download_epoch if i not in self.instances or
                    self.instances[i].state != InstanceState.DOWNLOADING]:  # fmt: skip
            del self.download_epoch[iid]
        waiting = (InstanceState.PENDING, InstanceState.DOWNLOADING)
        self.backoff.prune(NO_ROOM, (i for i, r in self.instances.items() if r.state in waiting))

    # ------------------------------------------------------------------ stored intent

    async def _follow_desired(self, now: float) -> None:
        """Carry out the pending requests of KV desired (pure `desired.next_step`), and write
        the config's preload request where it is due: every pass, so nothing depends on a
        message having been heard or on what an earlier leader remembered."""
        for model, mcfg in self.cfg.models.items():
            if mcfg.preload and preload_due(self.desired.get(model), self.started):
                await self._ask(model, proto.WANT_RUN, "preload", "models.<name>.preload")
        seen = [r for r in self.instances.values() if r.host not in self.lost]
        for model, want in list(self.desired.items()):
            if not want.wanted:  # nothing pending; a pin alone is demand while none is ready
                step = next_step(
                    want, seen, configured=model in self.cfg.models, refused=None, now=now
                )
                if isinstance(step, DemandIt):
                    self.demanded.setdefault(model, now)
                continue
            if not want.seen_by:  # the asker learns that a placer took it up
                taken = await self._desired_write(want, seen_by=self.lease.holder)
                if taken is None:
                    continue  # changed meanwhile: the next pass sees the newer request
                want = taken
            step = next_step(
                want,
                seen,
                configured=model in self.cfg.models,
                refused=self.refused.get(model),
                now=now,
            )
            if isinstance(step, Done):
                log.info("%s %s (asked by %s): %s", want.wanted, model, want.by, step.outcome)
                await self._desired_write(want, wanted="", outcome=step.outcome, done_at=now)
            elif isinstance(step, DemandIt):
                self.demanded.setdefault(model, now)
            elif isinstance(step, StopThese):
                for iid in step.instance_ids:
                    if (rec := self.instances.get(iid)) is not None:
                        await self._stop(rec, f"stop requested by {want.by}")

    async def _ask(self, model: str, wanted: str, by: str, reason: str) -> None:
        """Store a request of the placer's own (preload, a StopRequested event): created if
        there is none, else compare-and-set over the one we see (a newer one wins)."""
        old = self.desired.get(model)
        keep_pin = old is not None and old.pinned and wanted != proto.WANT_STOP  # a stop unpins
        want = proto.DesiredModel(
            model=model,
            wanted=wanted,
            since=time.time(),
            by=by,
            request_id=f"placer-{new_id()}",
            reason=reason,
            pinned=keep_pin,
            pinned_by=old.pinned_by if keep_pin and old else "",
        )
        key = proto.kv_key(model)
        self.lease.check()  # only the leader stores requests of its own (aborts the pass)
        try:
            if model in self.desired_rev:
                rev = await self.bus.desired.update(
                    key, proto.encode(want), last=self.desired_rev[model]
                )
            else:
                rev = await self.bus.desired.create(key, proto.encode(want))
        except KeyWrongLastSequenceError:  # someone wrote first: theirs is the newer request
            log.info("request %s %s (%s) not stored: a newer one came first", wanted, model, by)
            return  # (preload: the next pass asks again if still due)
        log.info("stored request: %s %s (%s, %s)", wanted, model, by, reason)
        self._on_desired(key, want, rev)

    async def _desired_write(
        self, want: proto.DesiredModel, **changes: object
    ) -> proto.DesiredModel | None:
        """Compare-and-set a request we saw; None when it changed since (a newer request)."""
        new = msgspec.structs.replace(want, **changes)
        self.lease.check()  # a deposed leader must not mark a request done (aborts the pass)
        try:
            rev = await self.bus.desired.update(
                proto.kv_key(want.model), proto.encode(new), last=self.desired_rev.get(want.model)
            )
        except KeyWrongLastSequenceError:
            return None
        self._on_desired(proto.kv_key(want.model), new, rev)
        return new

    def _live(self, model: str) -> list[InstanceRecord]:
        return [
            r
            for r in self.instances.values()
            if r.model == model and r.state in proto.LIVE_STATES and r.host not in self.lost
        ]

    async def _demand(
        self, model: str, now: float, queues: dict[str, Waiting], view: View | None = None
    ) -> None:
        # The gates before a placement are pure (`plan.demand_gate`): unconfigured, live,
        # a swap under way, failed lately, no host yet.
        gate = demand_gate(view if view is not None else self._view(queues), model, now)
        if gate is not None:
            await self._execute([gate], now)
            return
        mcfg = self.cfg.models[model]
        need = self._need(model, mcfg, host=None)
        if not need.memory_mib and await self._wait_for_header(model, mcfg, now):
            return  # the next passes place it once the header is in, or after INSPECT_WAIT_S
        # The rest is pure (`plan.plan_demand`): the exclusive group makes way, then the
        # placement -> refused as never fitting, a swap (drain), a new instance, or a wait.
        actions = plan_demand(self._view(queues, now), model, need, now)
        for act in actions:
            if isinstance(act, Refuse):
                log.info("refusing %s: %s", model, act.reason)
        await self._execute(actions, now)

    async def _replicas(self, now: float, queues: dict[str, Waiting], order: list[str]) -> None:
        """One replica step per model (pure `replicas.plan`), models with the oldest waiting
        requests first. Runs after the demand pass: a model still without a live instance
        then waits for room, and no model gets a replica before it is placed."""
        by_model: dict[str, list[InstanceRecord]] = {}
        for r in self.instances.values():
            if r.state in proto.LIVE_STATES and r.host not in self.lost:
                by_model.setdefault(r.model, []).append(r)
        waiting = set(queues) | {
            m for m, at in self.last_demand.items() if now - at < DEMAND_FRESH_S
        }
        starved = {m for m in waiting if m in self.cfg.models and m not in by_model}
        activity = self.merged_activity()
        known = self._activity_known(now)
        first = [m for m in order if m in by_model]
        for model in first + sorted(set(by_model) - set(first)):
            mcfg = self.cfg.models.get(model)
            if mcfg is None:
                continue  # removed by a reload: _follow_config retires it
            action = replica_plan(
                model,
                by_model[model],
                activity,
                queues.get(model),
                mcfg.replicas,
                now=now,
                demanded=now - self.last_demand.get(model, -DEMAND_FRESH_S) < DEMAND_FRESH_S,
                others_waiting=starved,
            )
            if isinstance(action, AddReplica):
                await self._add_replica(model, action.reason, now, queues)
            elif isinstance(action, StopReplica) and known:
                await self._remove_replica(model, action)

    async def _remove_replica(self, model: str, action: StopReplica) -> None:
        """Retire an idle replica: it drains (gateways stop sending to it, and say so), then
        `_follow_config` stops it. The placer's view of its idleness is a report old, and a
        request sent to it since must not be cut off."""
        rec = self.instances.get(action.instance_id)
        if rec is None or rec.state != InstanceState.READY:
            return
        ok = await self._write(
            rec,
            state=InstanceState.DRAINING,
            drain_for="",
            drain_since=time.time(),
            reason=action.reason,
        )
        if not ok:
            return
        log.info("replica of %s removed (%s): %s", model, rec.instance_id, action.reason)
        await self.bus.emit(
            proto.ReplicaChanged(
                model=model,
                stage="removed",
                instance_id=rec.instance_id,
                replicas=self._replica_count(model),
                reason=action.reason,
            )
        )

    def _replica_count(self, model: str) -> int:
        """Live instances of `model` that stay (a draining one is on its way out)."""
        return sum(1 for r in self._live(model) if r.state != InstanceState.DRAINING)

    async def _add_replica(
        self, model: str, why: str, now: float, queues: dict[str, Waiting]
    ) -> None:
        """Another instance of a model that runs already, in free room only: a replica adds
        throughput, which never costs another model its instance."""
        if self._recent_failure(model, now) is not None:
            return  # one failed lately: no tight retry loop (placer.failure_backoff)
        need = self._need(model, self.cfg.models[model], host=None)
        if not need.memory_mib:
            return  # size unknown: only the demand path fetches first and checks after
        decision = self._place(need, now, queues=queues, may_evict=False)
        if isinstance(decision, NoFit):
            if self.replica_blocked.get(model) != decision.reason:
                log.info("no room for another %s (%s): %s", model, why, decision.reason)
            self.replica_blocked[model] = decision.reason
            return
        self.replica_blocked.pop(model, None)
        rec = await self._create(model, need, decision, now)
        log.info("replica of %s added (%s): %s", model, rec.instance_id, why)
        await self.bus.emit(
            proto.ReplicaChanged(
                model=model,
                stage="added",
                instance_id=rec.instance_id,
                replicas=self._replica_count(model),
                reason=f"{why}; {decision.reason}",
            )
        )

    async def _create(self, model: str, need: Need, decision: Placed, now: float) -> InstanceRecord:
        """Record a placed instance PENDING, stop what it evicts, and take its first step."""
        iid = f"{proto.kv_key(model)}-{new_id()[:8]}"
        rec = InstanceRecord(
            instance_id=iid,
            model=model,
            state=InstanceState.PENDING,
            created=now,
            updated=now,
            host=decision.host,
            gpus=list(decision.gpus),
            memory_mib=decision.memory_mib,
            reason="placed",
            placement=decision.reason if need.memory_mib else unknown_need(decision.host),
            config_fp=launch_fingerprint(self.cfg.models[model]),
        )
        key = proto.instance_key(decision.host, iid)
        # Its API key first: the placer's word that it is placed there (the gateway routes
        # only to what a key vouches for), sent to its host alone in the start command.
        placed = instance_key.issue(decision.host, iid, model)
        self.lease.check()
        await self.bus.instance_keys.create(key, proto.encode(placed))
        self._on_key(key, placed, 0)
        rev = await self.bus.instances.create(key, proto.encode(rec))
        self._on_instance(iid, rec, rev)  # our own write; the watcher confirms it
        await self._recorded(rec, rev)
        await self.bus.emit(
            proto.PlacementDecided(
                model=model,
                instance_id=iid,
                host=decision.host,
                gpus=list(decision.gpus),
                memory_mib=decision.memory_mib,
                reason=rec.placement,
                evicted=list(decision.evict),
            )
        )
        for victim in decision.evict:
            vic = self.instances.get(victim)
            if vic is None:
                continue
            if vic.state == InstanceState.DRAINING and vic.drain_for == model:
                await self._stop(vic, f"evicted to make room for {model} (drained first)")
                why = f"{vic.model} drained; {model} starts in its room"
                drained_in = now - (vic.drain_since or now)
                await self._swap_event(model, "done", [vic], why, drain_s=drained_in)
            else:
                await self._stop(vic, f"evicted to make room for {model}")
        # A fit decided with the header's estimate and no eviction holds as it is; after an
        # eviction, the fit is re-checked until the victims' memory is really free.
        sure = decision if need.memory_mib and not decision.evict else None
        await self._advance(rec, now, decided=sure)
        return rec

    async def _wait_for_header(self, model: str, mcfg: ModelConfig, now: float) -> bool:
        """Whether demand for a model of unknown size waits for a downloader to read its
        header, so that it is placed by its real memory need rather than downloaded to
        wherever the most memory is free and checked afterwards."""
        info = self._header(model)
        if info is not None and (info.gguf is not None or now - info.ts < INSPECT_RETRY_S):
            return False  # read, or failed lately: decide with what is known
        if self.backoff.get(HEADER_WAIT, model) is not None:
            return True
        if self.backoff.holding(INSPECT, model, now):
            return False  # asked lately and no answer came in time: go on without it
        self.backoff.note(INSPECT, model, now, wait=INSPECT_RETRY_S)
        self.backoff.note(HEADER_WAIT, model, now)
        await self._command(
            proto.cmd_inspect(),
            proto.InspectModel(
                cmd_id=f"inspect-{proto.kv_key(model)}-{int(now)}",
                model=model,
                url=mcfg.url,
                filename=store_filename_of(model, mcfg),
            ),
        )
        return True

    def _header(self, model: str) -> proto.ModelInfo | None:
        """The header read from the model's configured source, or its failure to read."""
        info = self.headers.get(model)
        mcfg = self.cfg.models.get(model)
        return info if info is not None and mcfg is not None and info.url == mcfg.url else None

    async def _advance(
        self, rec: InstanceRecord, now: float, decided: Placed | None = None
    ) -> None:
        """PENDING/DOWNLOADING: download the file to the chosen host, then start it there.
        The gates (pure `plan.advance_gate`) decide everything up to the file being there."""
        mcfg = self.cfg.models.get(rec.model)
        has_file = False
        if mcfg is not None and rec.host is not None:
            has_file = self._has_file(rec.host, rec.model, store_filename_of(rec.model, mcfg))
        gate = advance_gate(self._view(), rec, now, has_file=has_file)
        if gate is not None or mcfg is None or rec.host is None:
            if gate is not None:
                await self._execute([gate], now)
            return
        filename = store_filename_of(rec.model, mcfg)
        # The file is there: now its header tells the real memory need; re-check the fit.
        # A copy beside a live instance (a replica, a reload's replacement) only takes free
        # room, and its failure is no reason to refuse requests the others serve.
        copy = any(
            r.instance_id != rec.instance_id and r.created <= rec.created
            for r in self._live(rec.model)
        )
        if decided is not None:
            decision: Placed | NoFit = decided
        else:
            # Free room only: the room was made when it was placed (its victims drained
            # and stopped then); what still holds memory is on its way out, or a model
            # that must yield through a drain, never one stopped here unasked.
            need = self._need(rec.model, mcfg, host=rec.host)
            decision = self._place(need, now, exclude=rec.instance_id, may_evict=False)
        if isinstance(decision, NoFit):
            # Room may be on its way (an evicted instance still stopping, busy ones finishing):
            # retry on the next passes, for a bounded time, before failing.
            since = self.backoff.since(NO_ROOM, rec.instance_id, now)
            if now - since < BUSY_WAIT_S:
                return
            self.backoff.clear(NO_ROOM, rec.instance_id)
            await self._fail(rec, decision.reason)
            if not copy:
                await self._refuse(rec.model, decision.reason, 5)
            return
        self.backoff.clear(NO_ROOM, rec.instance_id)
        ok = await self._write(
            rec,
            state=InstanceState.STARTING,
            gpus=list(decision.gpus),
            memory_mib=decision.memory_mib,
            reason="file in store; start sent",
            placement=decision.reason,
        )
        if ok:
            await self._send_start(rec, mcfg, filename, decision)

    def _has_file(self, host_id: str, model: str, filename: str) -> bool:
        """Whether `host_id`'s store holds the model's file as far as we know: its heartbeat
        lists it and it was not just deleted there, or a download just completed there."""
        host = self.hosts.get(host_id)
        listed = host is not None and any(f.filename == filename for f in host.files)
        if listed and host_id in self._file_hosts(filename):
            return True  # (listed, but just deleted there: its heartbeat has not caught up)
        return self._fetched_and_sized(host_id, model, filename)

    def _fetched_and_sized(self, host: str, model: str, filename: str) -> bool:
        """A download completed on `host` that its heartbeat does not list yet, for a model
        whose memory need is known without the file's header (configured, or read)."""
        at = self.fetched.get((host, filename))
        if at is None or time.time() - at > ACTIVITY_STALE_S:
            return False  # by then the heartbeat lists it, or the file is gone
        mcfg = self.cfg.models[model]
        header = self._header(model)
        return bool(mcfg.memory_mib) or (header is not None and header.gguf is not None)

    async def _send_start(
        self, rec: InstanceRecord, mcfg: ModelConfig, filename: str, decision: Placed
    ) -> None:
        # model and placement only: the agent builds argv (ctx_size, args, embeddings) from
        # its own config, so nobody on the bus can hand it flags. The chat template's text
        # travels (the agent runs it only if its own config has the same)
        await self._command(
            proto.cmd_agent(rec.host or ""),
            proto.StartInstance(
                cmd_id=f"start-{rec.instance_id}-{int(time.time())}",
                instance_id=rec.instance_id,
                model=rec.model,
                filename=filename,
                n_gpu_layers=decision.n_gpu_layers,
                gpus=list(decision.gpus),
                memory_mib=decision.memory_mib,
                chat_template=mcfg.chat_template,
                api_key=await self._api_key(rec),
            ),
        )

    async def _api_key(self, rec: InstanceRecord) -> str:
        """The key issued for `rec`: the same on every resend (its server may run with it
        already); read from KV when this placer did not see it issued (a new leader); issued
        now for a record placed before instance keys existed."""
        host = rec.host or ""
        placed = self.keys.get(rec.instance_id)
        if placed is None or placed.host != host:
            placed = await instance_key.read(self.bus, host, rec.instance_id)
        if placed is None or placed.host != host or placed.model != rec.model:
            placed = instance_key.issue(host, rec.instance_id, rec.model)
            self.lease.check()
            key = proto.instance_key(host, rec.instance_id)
            await self.bus.instance_keys.put(key, proto.encode(placed))
        self._on_key("", placed, 0)
        return placed.key

    async def _sweep_keys(self, now: float) -> None:
        """Delete the keys of instances that ended (their server is gone) or whose record
        went; every KEY_SWEEP_S. A key is written before its record: one younger than that
        may be waiting for it."""
        if now - self.keys_swept < KEY_SWEEP_S:
            return
        self.keys_swept = now
        for iid, placed in list(self.keys.items()):
            rec = self.instances.get(iid)
            ended = (
                rec.state in proto.END_STATES
                if rec is not None
                else now - placed.issued > KEY_SWEEP_S
            )
            if ended:
                self.lease.check()
                await self.bus.instance_keys.delete(proto.instance_key(placed.host, iid))
                self._on_key_del(proto.instance_key(placed.host, iid))

    async def _check_start(self, rec: InstanceRecord, now: float) -> None:
        """A STARTING instance its agent never took up: resend (pure `plan.check_start`)."""
        cur = self.instances.get(rec.instance_id)
        act = check_start(self._view(), cur, now) if cur is not None else None
        if act is not None:
            await self._execute([act], now)

    async def _resend_start(self, rec: InstanceRecord, why: str) -> None:
        mcfg = self.cfg.models.get(rec.model)
        if mcfg is None:
            return
        decision = Placed(
            host=rec.host or "",
            gpus=tuple(rec.gpus),
            n_gpu_layers=999 if rec.gpus else 0,
            memory_mib=rec.memory_mib,
            reason=rec.placement,
        )
        if await self._write(rec, reason=why):
            await self._send_start(rec, mcfg, store_filename_of(rec.model, mcfg), decision)

    async def _check_stop(self, rec: InstanceRecord, now: float) -> None:
        """A STOPPING instance its agent never reported stopped: its stop again, with a new
        id, every STOP_GRACE_S (pure `plan.check_stop`)."""
        cur = self.instances.get(rec.instance_id)
        act = check_stop(self._view(), cur, now) if cur is not None else None
        if act is not None:
            await self._execute([act], now)

    # ------------------------------------------------------------------ decisions

    def _need(self, model: str, mcfg: ModelConfig, host: str | None) -> Need:
        filename = store_filename_of(model, mcfg)
        # (hosts whose heartbeat lists the file, from the index: not a scan of every store)
        file_hosts = frozenset(self.placement_index.file_hosts(filename))
        memory = mcfg.memory_mib or 0
        cpu_memory = 0  # a CPU process has no GPU overhead; 0: the same as on a GPU
        n_layers = 0
        if not memory:
            info = self.placement_index.file_info(filename, host)
            header = self._header(model) if info is None else None
            if info is not None and info.gguf is not None:
                memory = estimate_mib(info.gguf, info.size, mcfg.ctx_size).total_mib
                cpu_memory = estimate_mib(
                    info.gguf, info.size, mcfg.ctx_size, n_gpu_layers=0
                ).total_mib
                n_layers = info.gguf.n_layers
            elif info is not None:
                memory = info.size // (1 << 20) + GPU_OVERHEAD_MIB
                cpu_memory = info.size // (1 << 20) + CPU_OVERHEAD_MIB
            elif header is not None and header.gguf is not None:
                if header.gguf.tensor_bytes or header.size:  # else the weights are unknown
                    size = header.size or 0
                    memory = estimate_mib(header.gguf, size, mcfg.ctx_size).total_mib
                    cpu_memory = estimate_mib(
                        header.gguf, size, mcfg.ctx_size, n_gpu_layers=0
                    ).total_mib
                    n_layers = header.gguf.n_layers
        return Need(
            model=model,
            memory_mib=memory,
            n_layers=n_layers,
            pin_host=host or mcfg.host,
            pin_gpus=tuple(mcfg.gpus),
            file_hosts=file_hosts,
            cpu_memory_mib=cpu_memory,
            # what agents measured, per GPU kind, where above the estimate (not over an override)
            gpu_memory_mib=gpu_needs(memory, self.measured, model, mcfg.ctx_size)
            if memory and not mcfg.memory_mib
            else {},
        )

    def _place(
        self,
        need: Need,
        now: float,
        *,
        exclude: str | None = None,
        queues: dict[str, Waiting] | None = None,
        may_evict: bool = True,
    ) -> Placed | NoFit:
        """The pure placement (`plan.place_in`) over the current views."""
        return place_in(self._view(queues, now), need, now, exclude=exclude, may_evict=may_evict)

    def _queues(self) -> dict[str, Waiting]:
        """What waits per model at the gateways that reported lately."""
        return merged_queues(self.activity.values(), time.time() - ACTIVITY_STALE_S)

    def _unsettled(self, now: float) -> frozenset[str]:
        """READY instances some live gateway has not reported on since it saw them ready:
        its waiting requests may be about to start there (no clocks compared)."""
        seen = [r.instances_rev for r in self.activity.values() if r.ts >= now - ACTIVITY_STALE_S]
        if not seen:  # none lately: no gateway at all, or we cannot tell (the bus was away)
            return frozenset(self.ready_rev) if self.activity else frozenset()
        return self.ready_rev.newer_than(min(seen))

    def _activity_known(self, now: float) -> bool:
        """Whether the gateways' reports tell what is in use: some are fresh, or there are
        none at all. Reports that all went stale mean the bus was away, not that nothing is
        used: idle stops wait until the gateways report again."""
        return not self.activity or any(
            r.ts >= now - ACTIVITY_STALE_S for r in self.activity.values()
        )

    def _place_at_rest(self, need: Need, now: float) -> Placed | NoFit:
        """Where `need` goes once every model that may yield has stopped."""
        return place_at_rest(self._view(), need, now)

    # ------------------------------------------------------------------ turns

    async def _drain(self, model: str, victims: list[InstanceRecord], why: str, now: float) -> None:
        """The first step of a swap: `victims` stop taking requests, for `model`'s sake."""
        log.info("swap for %s: %s drain; %s", model, ", ".join(v.instance_id for v in victims), why)
        for vic in victims:
            await self._write(
                vic, state=InstanceState.DRAINING, drain_for=model, drain_since=now, reason=why
            )
        await self._swap_event(model, "draining", victims, why)

    async def _swap_event(
        self,
        model: str,
        stage: str,
        victims: list[InstanceRecord],
        why: str,
        drain_s: float | None = None,
    ) -> None:
        await self.bus.emit(
            proto.SwapChanged(
                model=model,
                stage=stage,
                yielding=[v.instance_id for v in victims],
                yielding_models=sorted({v.model for v in victims}),
                reason=why,
                drain_s=drain_s,
            )
        )

    async def _advance_drains(self, now: float, queues: dict[str, Waiting]) -> None:
        """Drains that became moot end, ones past placer.drain_timeout are abandoned (the
        waiting model is refused), drained ones in an exclusive group stop (pure
        `plan.plan_drains`)."""
        await self._execute(plan_drains(self._view(queues), now), now)

    # ------------------------------------------------------------------ config reloads

    async def _follow_config(self, now: float) -> None:
        """After a reload: instances of removed models, and of models whose launch config
        changed, are stopped or retired (drained, then stopped); a changed model gets a
        current instance beside its stale one first (pure `reload.plan`)."""
        live = [r for r in self.instances.values() if r.host not in self.lost]
        todo = reload_plan(self.cfg.models, live)
        for iid, why in todo.stop:
            if (rec := self.instances.get(iid)) is not None:
                await self._stop(rec, why)
        for iid, why in todo.retire:
            if (rec := self.instances.get(iid)) is not None:
                log.info("retiring %s: %s", iid, why)
                await self._write(
                    rec, state=InstanceState.DRAINING, drain_for="", drain_since=now, reason=why
                )
        for model in todo.replace:
            await self._replace(model, now)
        # Retiring ones (a reload's stale instance, a replica above replicas.min gone idle)
        # stop once drained (pure `plan.plan_retire`).
        await self._execute(plan_retire(self._view(), now), now)

    async def _replace(self, model: str, now: float) -> None:
        """Place a current instance of `model` beside its stale one, which serves until the
        new one is READY. Without room beside it, the stale one drains and stops first:
        requests then wait (queued, within their deadline) for the one their demand places."""
        if self._recent_failure(model, now) is not None:
            return  # the replacement failed (bad new args?): the stale one serves; retry later
        need = self._need(model, self.cfg.models[model], host=None)
        decision = self._place(need, now)
        if isinstance(decision, Placed) and not decision.evict:
            log.info("replacing %s: its config changed; a new instance first", model)
            await self._create(model, need, decision, now)
            return
        why = f"{model}'s config changed (reload); no room for a new instance beside it"
        for rec in self._live(model):
            if rec.state == InstanceState.READY:
                await self._write(
                    rec, state=InstanceState.DRAINING, drain_for="", drain_since=now, reason=why
                )

    async def _end_drain(self, rec: InstanceRecord, stage: str, why: str, now: float) -> None:
        log.info("swap %s: %s", stage, why)
        if await self._write(rec, state=InstanceState.READY, drain_for="", drain_since=None):
            drained_for = now - (rec.drain_since or now)
            await self._swap_event(rec.drain_for, stage, [rec], why, drain_s=drained_for)

    def _recent_failure(self, model: str, now: float) -> InstanceRecord | None:
        return recent_failure(self.instances.values(), model, now, self.cfg.placer.failure_backoff)

    async def _mark_lost_hosts(self, now: float) -> None:
        """Hosts not heard from are lost, and their live instances (pure `plan_hosts`)."""
        if not await self._confirm_silence(now):
            return
        await self._execute(plan_hosts(self._view(), now), now)

    # ------------------------------------------------------------------ pull and delete

    def _file_hosts(self, filename: str) -> set[str]:
        """Hosts whose store holds `filename` as far as we know: listed in a heartbeat or just
        downloaded, and not just told to delete it (a heartbeat may still list it)."""
        now = time.time()
        hosts = {
            h.host_id for h in self.hosts.values() if any(f.filename == filename for f in h.files)
        }
        hosts |= {
            h
            for (h, f), at in self.fetched.items()
            if f == filename and now - at <= ACTIVITY_STALE_S
        }
        return {
            h
            for h in hosts
            if now - self.deleted.get((h, filename), -ACTIVITY_STALE_S) >= ACTIVITY_STALE_S
        }

    async def _pull(self, ev: proto.PullRequested) -> None:
        """Ollama's pull: the model's file to the host it would be placed on, with the same
        DownloadFile a cold start sends; a host that holds it already is the answer."""
        mcfg = self.cfg.models.get(ev.model)
        if mcfg is None:
            await self._answer_pull(ev, "refused", reason=f"model {ev.model!r} is not configured")
            return
        filename = store_filename_of(ev.model, mcfg)
        holders = sorted(self._file_hosts(filename) - self.lost)
        if holders:
            await self._answer_pull(ev, "present", holders[0], filename)
            return
        now = time.time()
        need = self._need(ev.model, mcfg, host=None)
        decision = self._place(need, now)
        if isinstance(decision, NoFit):  # room taken now: where it goes in its turn
            decision = self._place_at_rest(need, now)
        if isinstance(decision, NoFit):
            await self._answer_pull(ev, "refused", reason=decision.reason)
            return
        await self._download(decision.host, ev.model, mcfg, filename, f"pull-{ev.request_id}")
        await self._answer_pull(ev, "downloading", decision.host, filename)

    async def _download(
        self, host: str, model: str, mcfg: ModelConfig, filename: str, cmd_id: str
    ) -> None:
        """Tell `host`'s downloader to fetch the model's file (a cold start, or a pull)."""
        await self._command(
            proto.cmd_download(host),
            proto.DownloadFile(
                cmd_id=cmd_id, model=model, url=mcfg.url, filename=filename, sha256=mcfg.sha256
            ),
        )

    async def _answer_pull(
        self,
        ev: proto.PullRequested,
        status: str,
        host: str = "",
        filename: str = "",
        reason: str = "",
    ) -> None:
        log.info("pull %s: %s %s", ev.model, status, reason or host)
        await self.bus.emit(
            proto.PullAnswered(
                model=ev.model,
                request_id=ev.request_id,
                status=status,
                host=host,
                filename=filename,
                reason=reason,
            )
        )

    async def _delete_file(self, ev: proto.DeleteRequested) -> None:
        """Ollama's delete: refused while the model has a live instance (its file is in use or
        about to be); otherwise each host holding the file is told to delete it."""
        mcfg = self.cfg.models.get(ev.model)
        answer = proto.DeleteAnswered(model=ev.model, request_id=ev.request_id, status="refused")
        live = self._live(ev.model)
        if mcfg is None:
            answer.reason = f"model {ev.model!r} is not configured"
        elif live:
            r = max(live, key=lambda r: r.updated)
            answer.reason = (
                f"model {ev.model} is in use: instance {r.instance_id} is {r.state.value} on "
                f"{r.host}; stop it first (lls stop {ev.model}) or wait for its idle stop"
            )
        else:
            answer.filename = filename = store_filename_of(ev.model, mcfg)
            answer.hosts = sorted(self._file_hosts(filename) - self.lost)
            answer.status = "deleting" if answer.hosts else "absent"
            now = time.time()
            for host in answer.hosts:
                self.deleted[(host, filename)] = now
                self.fetched.pop((host, filename), None)
                await self._command(
                    proto.cmd_download(host),
                    proto.DeleteFile(
                        cmd_id=f"del-{ev.request_id}-{host}", model=ev.model, filename=filename
                    ),
                )
        log.info("delete %s: %s %s", ev.model, answer.status, answer.reason or answer.hosts)
        await self.bus.emit(answer)

    # ------------------------------------------------------------------ writes

    async def _stop(self, rec: InstanceRecord, reason: str) -> None:
        if rec.state not in proto.LIVE_STATES:
            return
        if await self._write(rec, state=InstanceState.STOPPING, reason=reason):
            await self._command(
                proto.cmd_agent(rec.host or ""),
                proto.StopInstance(
                    cmd_id=f"stop-{rec.instance_id}", instance_id=rec.instance_id, reason=reason
                ),
            )

    async def _fail(self, rec: InstanceRecord, reason: str) -> None:
        await self._write(rec, state=InstanceState.FAILED, reason=reason)

    async def _refuse(self, model: str, reason: str, retry_after: float) -> None:
        """Tell waiting gateways this model cannot be served now (they answer 503)."""
        self.refused[model] = (time.time(), reason)  # a pending `lls load` fails with it
        await self.bus.emit(
            proto.PlacementFailed(model=model, reason=reason, retry_after_s=max(1.0, retry_after))
        )

    async def _command(
        self, subject: str, cmd: proto.AgentCommand | proto.DownloaderCommand | proto.InspectModel
    ) -> None:
        """Send a command as the leader: only while the lease is valid (else LeaseLost aborts
        the pass), stamped with its epoch, so that once another placer took over, agents and
        downloaders refuse what this one may still have on its way."""
        self.lease.check()
        await self.bus.command(subject, msgspec.structs.replace(cmd, epoch=self.lease.epoch))

    async def _write(self, rec: InstanceRecord, **changes: object) -> bool:
        """Compare-and-set an instance record; False when someone else changed it first, or
        when the lifecycle does not let the placer make this change (proto/lifecycle.py)."""
        new = msgspec.structs.replace(rec, updated=time.time(), **changes)
        why = lifecycle.refusal(lifecycle.PLACER, rec.state, new.state)
        if why is not None:
            log.warning("not writing %s %s: %s", rec.instance_id, new.state.value, why)
            return False
        rev = self.revisions.get(rec.instance_id)
        self.lease.check()  # a deposed or lapsed leader writes nothing (aborts the pass)
        try:
            rev = await self.bus.instances.update(
                proto.instance_key(rec.host or "", rec.instance_id), proto.encode(new), last=rev
            )
        except KeyWrongLastSequenceError:
            return False  # the next pass sees the newer record and decides again
        self._on_instance(rec.instance_id, new, rev)
        await self._recorded(new, rev)
        return True

    async def _recorded(self, rec: InstanceRecord, rev: int) -> None:
        """The event of a write: the whole record and its revision (lls/history.py)."""
        await self.bus.emit_record(
            proto.InstanceChanged(
                instance_id=rec.instance_id,
                model=rec.model,
                state=rec.state,
                host=rec.host,
                endpoint=rec.endpoint,
                reason=rec.reason,
                record=rec,
                revision=rev,
            )
        )


def unknown_need(host: str) -> str:
    return (
        f"{host} fetches the file first; its memory need is checked against free memory "
        "once its GGUF header can be read"
    )


async def run(ctx: ServiceContext) -> None:
    placer = Placer(ctx)
    ctx.on_reload.append(lambda _old, _new: placer.wake.set())  # act on it now, not next tick
    await placer.run()
