"""Which instance serves a request: a watched view of the instances bucket, cold-start waits.

The hot path (`pick`) is a dict lookup: no bus round trip per request. A request for a model
with no ready instance publishes demand (at most once per DEMAND_EVERY_S per model, while
anyone waits) and waits, with a deadline, for the view to change. Placement failures and
failed starts wake the waiters, who answer 503 with the reason at once.

A DRAINING instance (its model yields to a waiting one) gets no new requests: they wait for
the model's next turn. A lost host's instances leave the view on the placer's word
(lost_hosts.py), before their records say so.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

import proto
from lls.aio import wait_event
from lls.bus import Bus, watch_kv
from lls.config import Config, slots_of
from lls.records import InstanceIndex
from proto import InstanceRecord, InstanceState

from . import affinity, model_status
from .admission import BY_ADDRESS
from .errors import ApiError
from .lost_hosts import HOST_EVENTS, LostHosts
from .report import report_activity
from .stats import ServingStats
from .timing import Ewma
from .trust import endpoint_refusal, placement_refusal

log = logging.getLogger(__name__)

DEMAND_EVERY_S = 2.0  # resend demand this often while requests wait (the placer is level-triggered)
BAD_ENDPOINT_S = 5.0  # an endpoint that refused a connection is skipped this long
BUS_GRACE_S = 2.0  # a bus silent this long refuses cold requests (503) instead of waiting
BUS_RETRY_S = 5.0
IDLE_GAP_S = 1.0  # an instance idle longer than this between requests begins a new busy spell


def queue_position(
    arrivals: Iterable[int], gated: Sequence[int | None], ticket: int
) -> tuple[int, int]:
    """A waiting request's (1-based place, queue length); (0, length) once it is not waiting.
    `arrivals`: the model's waiting tickets in arrival order; `gated`: those still waiting for
    an admission slot, in the order the gate will grant them. The others hold a slot already
    (they wait for an instance to start or to free up) and so come first, oldest first."""
    waiting = list(arrivals)
    if ticket not in waiting:
        return 0, len(waiting)
    held = set(gated)
    ahead = [t for t in waiting if t not in held]
    if ticket in ahead:
        return ahead.index(ticket) + 1, len(waiting)
    present = set(waiting)
    order = [t for t in gated if t in present]
    return len(ahead) + order.index(ticket) + 1, len(waiting)


@dataclass(eq=False)
class Flight:
    """One request in flight on an instance: the task that carries it and, once its head
    came, the upstream reply (so a lost host's requests can be ended: Router.abort_lost)."""

    task: asyncio.Task[Any] | None
    reply: Any = None  # http.Reply


@dataclass
class Failure:
    reason: str
    until: float  # monotonic time until which new requests are refused at once


class Router:
    def __init__(self, bus: Bus, cfg: Config, gateway_id: str):
        self.bus = bus
        self.cfg = cfg
        self.gateway_id = gateway_id
        self.instances: dict[str, InstanceRecord] = {}
        self.ready: dict[str, list[InstanceRecord]] = {}  # model -> READY instances
        self.in_flight: dict[str, int] = {}  # instance id -> requests through this gateway
        self.last_used: dict[str, float] = {}
        self.busy_since: dict[str, float] = {}  # instance id -> when its busy spell began
        self.flights: dict[str, set[Flight]] = {}  # instance id -> requests in flight there
        self.lost: dict[asyncio.Task[Any], str] = {}  # task -> why abort_lost cancelled it
        self.failures: dict[str, Failure] = {}
        self.bad_until: dict[str, float] = {}  # endpoint -> monotonic time
        self._demanding: dict[str, asyncio.Task[None]] = {}  # model -> demand being sent
        self.last_demand: dict[str, float] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self.hosts: dict[str, proto.HostRecord] = {}  # from heartbeats: who may serve where
        self.lost_hosts = LostHosts(lambda rec: self.on_instance("", rec, self.view_rev))
        # instance id -> its API key, issued by the placer: the placer's word that the
        # instance was placed on that host, and what the gateway sends it (upstream_headers)
        self.keys: dict[str, proto.InstanceKey] = {}
        # One record per instance id, the placed host's (lls/records.py): the watch's puts
        # and deletes go through it to on_instance / on_instance_deleted.
        self.instance_index = InstanceIndex(
            self.on_instance, self.on_instance_deleted, lambda *a: self.bus.refuse_record(*a)
        )
        self._loading = 3  # initial loads of instances, hosts and keys still to come
        # Requests not yet sent to an instance (queued for a slot or for a ready instance),
        # per model in arrival order: ticket -> wall time it began to wait.
        self.queued: dict[str, dict[int, float]] = {}
        self.queued_by: dict[int, str] = {}  # ticket -> its client, as the report names it
        self._tickets = itertools.count()
        self.draining: set[str] = set()  # DRAINING instances this gateway has seen
        self.view_rev = 0  # the instances bucket's revision this view has reached
        self.keep_alive: dict[str, float] = {}  # instance id -> the last request's keep_alive
        self.swap_wait = Ewma()  # seconds a request waited for a model to become ready
        self.stats = ServingStats()  # per-model request counts and times, for the dashboard
        self.warnings: list[str] = []  # what `lls ps` shows about this gateway (app.py sets it)
        self._report_now = asyncio.Event()
        self.queue_began = asyncio.Event()  # set when a model's queue forms (stall.StallWatch)
        self.on_change: Callable[[InstanceRecord | None, InstanceRecord], None] | None = None
        self.on_reindex: Callable[[str], None] | None = None  # a model's ready set was redone
        # Routing among a model's replicas (pick): each model's hash ring, rebuilt only when
        # its usable replicas change, and its round-robin turn (advanced by acquire).
        self._rings: dict[str, affinity.Ring] = {}
        self._turn: dict[str, int] = {}
        self._slots: dict[str, int] = {}  # model -> slots its last ready instance reported

    # ------------------------------------------------------------------ view upkeep

    def on_instance(self, _key: str, rec: InstanceRecord, rev: int) -> None:
        self.view_rev = max(self.view_rev, rev)
        rec = self.lost_hosts.shown(rec)
        old = self.instances.get(rec.instance_id)
        self.instances[rec.instance_id] = rec
        if rec.state == InstanceState.DRAINING:
            if rec.instance_id not in self.draining:
                self.draining.add(rec.instance_id)
                self._report_now.set()  # the placer waits for every gateway to see it
        else:
            self.draining.discard(rec.instance_id)
            if rec.state == InstanceState.READY and (old is None or old.state != rec.state):
                self._report_now.set()  # its waiters start now; the placer should see them
        if rec.state == InstanceState.LOST and rec.instance_id in self.flights:
            self.abort_lost(rec)
        if rec.state == InstanceState.FAILED and (old is None or old.state != rec.state):
            age = time.time() - rec.updated
            left = self.cfg.placer.failure_backoff - age
            if left > 0:
                self._fail(rec.model, f"{rec.model} failed to start: {rec.reason}", left)
        elif rec.state == InstanceState.READY:
            self.failures.pop(rec.model, None)
            if rec.slots > 0:
                self._slots[rec.model] = rec.slots
        self._reindex(rec.model)
        if self.on_change is not None:  # after the re-index: it sees the instance as it is now
            self.on_change(old, rec)

    def on_instance_deleted(self, key: str) -> None:
        iid = proto.instance_of_key(key)
        self.lost_hosts.deleted(iid)
        rec = self.instances.pop(iid, None)
        self.draining.discard(iid)
        if rec is not None:
            self._reindex(rec.model)

    def _reindex(self, model: str) -> None:
        self.ready[model] = [
            r
            for r in self.instances.values()
            if r.model == model
            and r.state == InstanceState.READY
            and r.endpoint
            and self._trusted(r)
        ]
        self._notify(model)
        if self.on_reindex is not None:  # its waiters take what came free, now
            self.on_reindex(model)

    def _trusted(self, rec: InstanceRecord) -> bool:
        """Whether a READY record may get traffic: placed there (placement_refusal), at an
        endpoint its host advertises and the config allows (endpoint_refusal). Refusals are
        reported once the views are loaded (before that, a record may just be early)."""
        why = placement_refusal(rec, self.keys.get(rec.instance_id)) or endpoint_refusal(
            rec, self.hosts, self.cfg.gateway.allowed_upstreams
        )
        if why is not None and not self._loading:
            where = f"{rec.model} at {rec.endpoint}: {why}; it gets no traffic"
            self.bus.refuse_record(
                proto.KV_INSTANCES, proto.instance_key(rec.host or "", rec.instance_id), where
            )
        return why is None

    def key_for(self, rec: InstanceRecord) -> str:
        """The API key to send an instance that pick() chose (its key was there to trust it;
        "" if it went meanwhile: the instance then answers 401)."""
        key = self.keys.get(rec.instance_id)
        return key.key if key is not None and key.host == rec.host else ""

    def on_key(self, _key: str, key: proto.InstanceKey, _rev: int) -> None:
        self.keys[key.instance_id] = key
        self.instance_index.placed(key.instance_id, key.host)
        if (rec := self.instances.get(key.instance_id)) is not None:
            self._reindex(rec.model)

    def on_key_deleted(self, key: str) -> None:
        iid = proto.instance_of_key(key)
        if self.keys.pop(iid, None) is not None:
            self.instance_index.placed(iid, None)
            if (rec := self.instances.get(iid)) is not None:
                self._reindex(rec.model)

    def _loaded(self) -> None:
        """One of the three initial loads is done; after the last, every model is judged
        again, now with the whole view (and what it refuses is reported)."""
        self._loading -= 1
        if self._loading == 0:
            for model in {r.model for r in self.instances.values()}:
                self._reindex(model)

    def on_host(self, key: str, rec: proto.HostRecord, _rev: int) -> None:
        old = self.hosts.get(rec.host_id)
        self.hosts[rec.host_id] = rec
        if old is None or (old.advertise_host, old.port_range) != (
            rec.advertise_host,
            rec.port_range,
        ):
            self._reindex_host(rec.host_id)

    def on_host_deleted(self, key: str) -> None:
        if self.hosts.pop(key, None) is not None:
            self._reindex_host(key)

    def _reindex_host(self, host_id: str) -> None:
        for model in {r.model for r in self.instances.values() if r.host == host_id}:
            self._reindex(model)

    def reloaded(self) -> None:
        """Wake the waits of models a reload removed: they answer 404 now, not at their next
        check; judge every instance again (gateway.allowed_upstreams may have changed)."""
        for model in [m for m in self._changed if m not in self.cfg.models]:
            self._notify(model)
        for model in {r.model for r in self.instances.values()}:
            self._reindex(model)

    def _notify(self, model: str) -> None:
        ev = self._changed.pop(model, None)
        if ev is not None:
            ev.set()

    def _fail(self, model: str, reason: str, retry_after: float) -> None:
        self.failures[model] = Failure(reason, time.monotonic() + retry_after)
        self._notify(model)

    async def _on_placement_failed(self, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            ev = proto.decode(msg.data, proto.PlacementFailed)
        except msgspec.ValidationError:
            return
        self._fail(ev.model, ev.reason, ev.retry_after_s)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.bus.subscribe(proto.evt("placement.failed"), cb=self._on_placement_failed)
        on_host = functools.partial(self.lost_hosts.on_event, instances=self.instances.values)
        host_subs = [await self.bus.subscribe(s, cb=on_host) for s in HOST_EVENTS]
        # The watches whose first load is done (one set up again after a reconnect loads
        # again: counted once).
        loaded: set[int] = set()

        def first_load(i: int) -> None:
            if i not in loaded:
                loaded.add(i)
                self._loaded()

        index = self.instance_index
        watches = [
            (self.bus.instances, InstanceRecord, index.put, index.delete),
            (self.bus.hosts, proto.HostRecord, self.on_host, self.on_host_deleted),
            (self.bus.instance_keys, proto.InstanceKey, self.on_key, self.on_key_deleted),
        ]
        tasks = [
            asyncio.create_task(
                watch_kv(self.bus, kv, typ, put, delete, stop, lambda i=i: first_load(i))
            )
            for i, (kv, typ, put, delete) in enumerate(watches)
        ]
        tasks.append(asyncio.create_task(report_activity(self, self._report_now, stop)))
        try:
            await stop.wait()
        finally:
            for s in (sub, *host_subs):
                await s.unsubscribe()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ requests

    def pick(self, model: str, prefix: str | None = None) -> InstanceRecord | None:
        """The ready instance that should serve a request now (no bus, no await).

        One usable replica: it. Several: by `gateway.routing`: "prefix" with a `prefix`
        (affinity.prefix_key of the request) follows the key on the model's hash ring with
        bounded load (at most the model's slots per replica); "round_robin" takes the model's turn (which `acquire` advances, so that
        a mere look, such as the cold-start check, does not); otherwise, and for requests
        without a prompt, the one with the fewest requests in flight here."""
        candidates = self.ready.get(model)
        if not candidates:
            return None
        now = time.monotonic()
        usable = [r for r in candidates if self.bad_until.get(r.endpoint or "", 0) < now]
        if len(usable) <= 1:
            return usable[0] if usable else None
        routing = self.cfg.gateway.routing
        if routing == "prefix" and prefix is not None:
            ring = self._rings.get(model)
            ids = tuple(sorted(r.instance_id for r in usable))
            if ring is None or ring.ids != ids:  # a replica came, went or was skipped
                ring = self._rings[model] = affinity.Ring(ids)
            iid, _why = affinity.choose(
                ring,
                prefix,
                self.in_flight,
                self.cfg.gateway.prefix_load_factor,
                min(r.slots or self.slots_expected(model) for r in usable),
            )
            return next(r for r in usable if r.instance_id == iid)
        if routing == "round_robin":
            usable.sort(key=lambda r: r.instance_id)  # a stable order to rotate through
            return usable[self._turn.get(model, 0) % len(usable)]
        return min(usable, key=lambda r: self.in_flight.get(r.instance_id, 0))

    def slots_expected(self, model: str) -> int:
        """Requests one instance of `model` runs at once, before it says: what its last ready
        instance reported, else what its config implies (lls.config.slots_of)."""
        known = self._slots.get(model)
        if known:
            return known
        m = self.cfg.models.get(model)
        return slots_of(m) if m is not None else 1

    def sent_to(self, model: str) -> int:
        """Requests in flight on any of `model`'s instances (sent, answer not finished)."""
        return sum(
            n
            for iid, n in self.in_flight.items()
            if n and (rec := self.instances.get(iid)) and rec.model == model
        )

    def held_elsewhere(self, model: str, ready: Sequence[InstanceRecord]) -> int:
        """Requests in flight on `model`'s instances outside `ready` (draining ones)."""
        ids = {r.instance_id for r in ready}
        held = 0
        for iid, n in self.in_flight.items():
            if n and iid not in ids and (rec := self.instances.get(iid)) and rec.model == model:
                held += n
        return held

    def mark_bad(self, rec: InstanceRecord) -> None:
        log.warning("%s refused a connection; skipped for %g s", rec.endpoint, BAD_ENDPOINT_S)
        self.bad_until[rec.endpoint or ""] = time.monotonic() + BAD_ENDPOINT_S

    async def acquire(self, model: str, wait_s: float, prefix: str | None = None) -> InstanceRecord:
        """A ready instance of `model`, demanding one and waiting up to `wait_s` if none."""
        rec = self.pick(model, prefix)
        if rec is not None:
            self._turn[model] = self._turn.get(model, 0) + 1  # round_robin's next turn
            return rec
        t0 = time.monotonic()
        deadline = t0 + wait_s
        while True:
            rec = self.pick(model, prefix)
            if rec is not None:
                self._turn[model] = self._turn.get(model, 0) + 1
                self.swap_wait.add(model, time.monotonic() - t0)
                return rec
            now = time.monotonic()
            if model not in self.cfg.models:  # removed by a reload while it waited
                raise ApiError(404, f"model {model} was removed from the config", "model_not_found")
            fail = self.failures.get(model)
            if fail is not None and now < fail.until:
                raise ApiError(503, fail.reason, "model_unavailable", fail.until - now)
            if (bus_down := self.bus_down_reason()) is not None:  # no start without a bus
                raise ApiError(503, bus_down, "bus_unavailable", BUS_RETRY_S)
            if now >= deadline:
                raise ApiError(
                    503,
                    f"model {model} is not ready after {wait_s:.0f} s "
                    f"({self.describe(model)}); try again shortly",
                    "cold_start_timeout",
                    self.swap_wait.get(model, 5.0),
                )
            if now - self.last_demand.get(model, -1e9) >= DEMAND_EVERY_S:
                self.last_demand[model] = now
                self._send_demand(model)
            changed = self._changed.setdefault(model, asyncio.Event())
            await wait_event(changed, min(deadline - now, DEMAND_EVERY_S))

    def _send_demand(self, model: str) -> None:
        """Publish demand aside, one at a time per model: a wait must not hang on the bus
        (a frozen one holds a publish for its whole timeout)."""
        running = self._demanding.get(model)
        if running is None or running.done():
            self._demanding[model] = asyncio.create_task(self._demand(model))

    async def _demand(self, model: str) -> None:
        try:
            waiting = max(1, len(self.queued.get(model, {})))
            await self.bus.emit(
                proto.Demand(model=model, gateway_id=self.gateway_id, waiting=waiting)
            )
        except Exception as e:  # the wait's deadline still bounds the request
            log.warning("could not publish demand for %s: %s", model, e)

    def describe(self, model: str) -> str:
        """Where a model's wait stands, in words (for 503s and a waiting stream's comments)."""
        return model_status.describe(model, self.instances.values(), self.hosts)

    async def header_of(self, model: str) -> tuple[proto.GgufSummary | None, int | None]:
        return await model_status.header_of(self.bus, self.cfg, model)

    def state_of(self, model: str) -> str:
        """One word for /v1/models: ready, starting, downloading, failed, or stopped."""
        failure = self.failures.get(model)
        failed = failure is not None and time.monotonic() < failure.until
        return model_status.state_of(
            model, self.instances.values(), bool(self.ready.get(model)), failed
        )

    # ------------------------------------------------------------------ queues

    def enqueue(self, model: str, client: str = BY_ADDRESS) -> int:
        """A request for `model` begins to wait (for a slot or an instance); its ticket.
        `client`: who it is for the activity report (a key's name, or BY_ADDRESS)."""
        ticket = next(self._tickets)
        waits = self.queued.setdefault(model, {})
        if not waits:
            self._report_now.set()  # a new queue: the placer orders models by oldest wait
            self.queue_began.set()
        waits[ticket] = time.time()
        self.queued_by[ticket] = client
        return ticket

    def dequeue(self, model: str, ticket: int) -> float:
        """The request stopped waiting (sent, refused or gone); how long it waited."""
        since = self.queued.get(model, {}).pop(ticket, None)
        self.queued_by.pop(ticket, None)
        return time.time() - since if since is not None else 0.0

    def position(
        self, model: str, ticket: int, gated: Sequence[int | None] = ()
    ) -> tuple[int, int]:
        """(1-based place in the model's queue, its length); (0, n) once it stopped waiting.
        `gated`: the tickets waiting for an admission slot, in the order they will be granted
        (admission.Gate.order); the others are past admission, ahead of them."""
        return queue_position(self.queued.get(model, {}), gated, ticket)

    # ------------------------------------------------------------------ activity

    def begin(self, rec: InstanceRecord, keep_alive: float | None = None) -> Flight:
        """A request goes to `rec`: counted in flight there, and known by its task, so that
        it can be ended if the instance is lost (`abort_lost`). Pass the Flight to `end`."""
        iid = rec.instance_id
        flight = Flight(asyncio.current_task())
        self.flights.setdefault(iid, set()).add(flight)
        now = time.time()
        running = self.in_flight.get(iid, 0)
        if not running and now - self.last_used.get(iid, 0.0) > IDLE_GAP_S:
            self.busy_since[iid] = now  # a new busy spell (a short gap continues the last)
        self.in_flight[iid] = running + 1
        self.last_used[iid] = now
        if keep_alive is not None:
            self.keep_alive[iid] = keep_alive
        elif iid in self.keep_alive:
            del self.keep_alive[iid]  # an OpenAI request: the model's own idle timeout again
        return flight

    def end(self, rec: InstanceRecord, flight: Flight | None = None) -> None:
        iid = rec.instance_id
        if flight is not None and (flights := self.flights.get(iid)) is not None:
            flights.discard(flight)
            if not flights:
                del self.flights[iid]
        left = self.in_flight[iid] = max(0, self.in_flight.get(iid, 0) - 1)
        self.last_used[iid] = time.time()
        if left == 0 and (iid in self.draining or self._others_wait(rec.model)):
            self._report_now.set()  # a drain may be done, or room is free for who waits

    def abort_lost(self, rec: InstanceRecord) -> int:
        """The instance's host was lost: what is still in flight there would wait for a TCP
        peer that may never answer (a cut host sends no reset), past the client's deadline.
        Each such request is cancelled: one still waiting for its answer's head is sent
        again to another instance (`resend_lost`, proxy.Upstream), an answer already under
        way is cut and answers 502 with the reason (`lost_reason`). How many there were."""
        flights = self.flights.pop(rec.instance_id, set())
        why = (
            f"model {rec.model}: instance {rec.instance_id} was lost with its host "
            f"{rec.host} ({rec.reason or 'no heartbeat'}); try again"
        )
        for flight in flights:
            if flight.task is not None and not flight.task.done():
                self.lost[flight.task] = why
                flight.task.cancel()
            if flight.reply is not None:
                flight.reply.abort()
        if flights:
            log.warning("%d request(s) in flight on lost %s ended", len(flights), rec.instance_id)
        return len(flights)

    def resend_lost(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether `task`, cancelled by `abort_lost` before its answer's head came, may send
        its request again (to another instance): its cancel is undone. Not if anything else
        cancelled it too (its client left): that cancel stands, and so does the reason."""
        if task is None or task not in self.lost or task.cancelling() != 1:
            return False
        del self.lost[task]
        task.uncancel()
        return True

    def lost_reason(self, task: asyncio.Task[Any] | None) -> str | None:
        """Why `task` was cancelled by `abort_lost`, once; None if it was not."""
        return self.lost.pop(task, None) if task is not None else None

    def _others_wait(self, model: str) -> bool:
        return any(waits for m, waits in self.queued.items() if m != model)

    def forget_ended(self) -> None:
        """Drop what is kept per instance for those no longer live and with nothing in flight
        (before each activity report)."""
        live = {i for i, r in self.instances.items() if r.state in proto.LIVE_STATES}
        for iid in list(self.last_used):
            if iid not in live and not self.in_flight.get(iid):
                self.last_used.pop(iid, None)
                self.in_flight.pop(iid, None)
                self.keep_alive.pop(iid, None)
                self.busy_since.pop(iid, None)

    # ------------------------------------------------------------------ bus health (edge)

    def bus_down_reason(self, grace_s: float = BUS_GRACE_S) -> str | None:
        """Why no model can be started now: the bus has been unreachable for `grace_s`.

        nats-py keeps saying "connected" to a frozen server for minutes, so the bus's own
        probe (`Bus.start_probe`) asks it something every second and dates the silence.
        Warm requests never ask: they need no bus.
        """
        since = self.bus.silent_since
        if since is None and not self.bus.nc.is_connected:
            since = time.monotonic()  # lost just now; the probe will date it
        if since is None or time.monotonic() - since < grace_s:
            return None
        return (
            f"the message bus (NATS) has not answered for {time.monotonic() - since:.0f} s: "
            "models that are not running cannot be started until it is back"
        )
