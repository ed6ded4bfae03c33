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

This module is the wiring: it builds the parts, sets up the watches and subscriptions, runs
the loop, and `reconcile` gives the order of a pass. The parts (DESIGN.md section 10):

    watches.py        the read views the KV watches and event subscriptions keep
    planning.py       the planner's View, a model's Need, placements over the views
    executor.py       actions carried out at their planned revisions; create -> start
    writes.py         record compare-and-set writes, epoch-stamped commands, their events
    demand.py         the demand step          (pure: plan_demand.py)
    scaling.py        the replica step         (pure: replicas.py)
    config_follow.py  following a reload       (pure: reload.py)
    intent.py         following KV desired     (pure: desired.py)
    files.py          where files are; downloads, pulls, deletes
    keys.py           instance API keys
    lease.py          the leader lease and its epochs
    stream_leaders.py the NATS raft leaders kept with the leader (and the lease's with a standby)

Commands are idempotent by instance id, so a pass repeated after a crash or by a new leader
does no harm. Only the leaseholder acts, and only while its lease is valid: each command
and record write is checked against it, and commands carry its epoch, which agents and
downloaders use to refuse a deposed leader's (see `lease.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import proto
from lls.aio import wait_event
from lls.bus import new_id, watch_kv
from lls.service import ServiceContext
from proto import InstanceRecord, InstanceState

from .activity import ACTIVITY_STALE_S
from .backoff import NO_ROOM, Backoff
from .config_follow import ConfigFollower
from .demand import Demand
from .executor import Executor
from .files import Files
from .intent import IntentFollower
from .keys import Keys
from .lease import Lease, LeaseLost
from .placement_index import PlacementIndex
from .plan import plan_drains, plan_hosts, plan_upkeep
from .planning import Planning, limits_of
from .scaling import Scaling
from .stream_leaders import StreamLeaders
from .turns import Waiting, merged_queues, waiting_order
from .watches import Watches
from .writes import Writer

__all__ = ["Placer", "run"]

log = logging.getLogger(__name__)

TICK_S = 1.0
LOADED_WITHIN_S = 10.0  # the first pass waits this long at most for the watchers to load


class Placer:
    """The parts of the placer, built once and handed to each other (collaborators, not
    mixins: DESIGN.md section 10), and the loop that runs a pass of them."""

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.cfg = cfg = ctx.cfg
        self.bus = bus = ctx.bus
        self.wake = asyncio.Event()
        self.started = time.time()
        self.lease = lease = Lease(self.bus.leases, f"placer-{ctx.host_id}-{new_id()}")
        # Per-key timing (backoff.Backoff): header asks and waits, no room after a download,
        # no new swap after an abandoned one
        self.backoff = backoff = Backoff()
        # The hosts and instances indexed for placement (placement_index.py), fed by the watches
        limits = limits_of(cfg)
        index = PlacementIndex(
            ram_reserve_mib=limits.ram_reserve_mib, keep_loaded=limits.keep_loaded
        )
        self.watches = w = Watches(cfg, bus, self.wake, index)
        self.planning = plan = Planning(cfg, w, backoff=backoff, lease=lease, started=self.started)
        self.writer = writer = Writer(bus, lease, w)
        self.keys = Keys(bus, lease, w)
        self.files = Files(cfg, bus, w, plan, writer)
        self.executor = ex = Executor(
            cfg,
            bus,
            lease=lease,
            backoff=backoff,
            watches=w,
            planning=plan,
            writer=writer,
            files=self.files,
            keys=self.keys,
        )
        self.demand = Demand(
            cfg, backoff=backoff, watches=w, planning=plan, writer=writer, executor=ex
        )
        self.scaling = Scaling(cfg, bus, watches=w, planning=plan, writer=writer, executor=ex)
        self.config_follower = ConfigFollower(
            cfg, watches=w, planning=plan, writer=writer, executor=ex
        )
        self.intent = IntentFollower(
            cfg, bus, lease=lease, watches=w, writer=writer, started=self.started
        )
        self.stream_leaders = StreamLeaders(bus, lease, ctx.host_id)

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        stop = self.ctx.stop
        w, bus = self.watches, self.bus
        buses = [
            watch_kv(bus, bus.hosts, proto.HostRecord, w.on_host, w.on_host_del, stop),
            watch_kv(
                bus,
                bus.instances,
                InstanceRecord,
                w.instance_index.put,
                w.instance_index.delete,
                stop,
                w.instances_loaded.set,
            ),
            watch_kv(
                bus,
                bus.instance_keys,
                proto.InstanceKey,
                w.on_key,
                w.on_key_del,
                stop,
                w.keys_loaded.set,
            ),
            watch_kv(bus, bus.models, proto.ModelInfo, w.on_header, w.on_header_del, stop),
            watch_kv(
                bus, bus.activity, proto.ActivityReport, w.on_activity, w.on_activity_del, stop
            ),
            watch_kv(bus, bus.desired, proto.DesiredModel, w.on_desired, w.on_desired_del, stop),
            self.lease.hold(stop),
            self.stream_leaders.run(stop),
        ]
        tasks = [asyncio.create_task(c) for c in buses]
        subs = [
            await bus.subscribe(proto.evt("demand"), cb=w.on_demand),
            await bus.subscribe(proto.evt("download.*"), cb=w.on_download),
            await bus.subscribe(proto.evt("stop.requested"), cb=w.on_stop_requested),
            await bus.subscribe(proto.evt("pull.requested"), cb=w.on_file_request),
            await bus.subscribe(proto.evt("delete.requested"), cb=w.on_file_request),
        ]
        try:
            await self._loop()
        finally:
            for s in subs:
                await s.unsubscribe()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _loaded(self) -> None:
        """Let the watchers load current state first: the instances, and the keys that vouch
        for them (a live record is counted only with its key), then a moment for the rest."""
        w = self.watches
        for what, loaded in (("instance keys", w.keys_loaded), ("instances", w.instances_loaded)):
            if not await wait_event(loaded, LOADED_WITHIN_S):
                log.warning("%s not loaded in %.0f s; going on", what, LOADED_WITHIN_S)
        await asyncio.sleep(0.5)

    async def _loop(self) -> None:
        await self._loaded()
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
                # the leader handles these; a standby must not replay them
                self.watches.inbox.clear()
            await wait_event(self.wake, TICK_S)

    # ------------------------------------------------------------------ one pass

    async def reconcile(self) -> None:
        now = time.time()
        if self.bus.silent_since is not None:
            return  # the bus is away: nothing we see now is current, nothing we write lands
        await self._handle_inbox()
        await self._mark_lost_hosts(now)
        await self.intent.follow(now)
        self.demand.release_header_waits(now)
        fresh = self.watches.take_demand(now)
        queues = merged_queues(self.watches.activity.values(), now - ACTIVITY_STALE_S)
        await self._advance_drains(now, queues)
        await self.config_follower.follow(now)
        order = waiting_order(fresh, queues)
        # (live proxies: each model's gates see the writes before)
        view = self.planning.view(queues)
        for model in order:
            await self.demand.decide(model, now, queues, view)
        await self.scaling.scale(now, queues, order)
        for rec in list(self.watches.instances.values()):
            if rec.state in (InstanceState.PENDING, InstanceState.DOWNLOADING):
                await self.executor.advance(rec, now)
        await self._upkeep(now)

    async def _handle_inbox(self) -> None:
        events, self.watches.inbox = self.watches.inbox, []
        for ev in events:
            if isinstance(ev, proto.StopRequested):
                await self.intent.ask(
                    ev.model, proto.WANT_STOP, ev.requested_by, "StopRequested event"
                )
            elif isinstance(ev, proto.DownloadCompleted):
                self.files.downloaded(ev)
            elif isinstance(ev, proto.DownloadFailed):
                for rec in self.watches.live(ev.model):
                    if rec.host == ev.host and rec.state == InstanceState.DOWNLOADING:
                        await self.writer.fail(rec, f"download failed: {ev.reason}")
            elif isinstance(ev, proto.PullRequested):
                await self.files.pull(ev)
            elif isinstance(ev, proto.DeleteRequested):
                await self.files.delete_file(ev)

    async def _mark_lost_hosts(self, now: float) -> None:
        """Hosts not heard from are lost, and their live instances (pure `plan_hosts`)."""
        if not await self.watches.confirm_silence(now):
            return
        await self.executor.execute(plan_hosts(self.planning.view(), now), now)

    async def _advance_drains(self, now: float, queues: dict[str, Waiting]) -> None:
        """Drains that became moot end, ones past placer.drain_timeout are abandoned (the
        waiting model is refused), drained ones in an exclusive group stop (pure
        `plan.plan_drains`)."""
        await self.executor.execute(plan_drains(self.planning.view(queues), now), now)

    async def _upkeep(self, now: float) -> None:
        """Resends, idle stops and purges (pure `plan.plan_upkeep`), then forget per-key
        state of instances that moved on."""
        w = self.watches
        await self.executor.execute(plan_upkeep(self.planning.view(), now), now)
        await self.keys.sweep(now)
        for iid in [i for i in w.download_epoch if i not in w.instances or
                    w.instances[i].state != InstanceState.DOWNLOADING]:  # fmt: skip
            del w.download_epoch[iid]
        waiting = (InstanceState.PENDING, InstanceState.DOWNLOADING)
        self.backoff.prune(NO_ROOM, (i for i, r in w.instances.items() if r.state in waiting))


async def run(ctx: ServiceContext) -> None:
    placer = Placer(ctx)
    ctx.on_reload.append(lambda _old, _new: placer.wake.set())  # act on it now, not next tick
    await placer.run()
