"""Which instance serves a request: a watched view of the instances bucket, cold-start waits.

The hot path (`pick`) is a dict lookup: no bus round trip per request. A request for a model
with no ready instance publishes demand (at most once per DEMAND_EVERY_S per model, while
anyone waits) and waits, with a deadline, for the view to change. Placement failures and
failed starts wake the waiters, who answer 503 with the reason at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec

import proto
from lls.bus import Bus, kv_snapshot, watch_kv
from lls.config import Config, store_filename
from proto import InstanceRecord, InstanceState

from .errors import ApiError

log = logging.getLogger(__name__)

DEMAND_EVERY_S = 2.0  # resend demand this often while requests wait (the placer is level-triggered)
BAD_ENDPOINT_S = 5.0  # an endpoint that refused a connection is skipped this long


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
        self.failures: dict[str, Failure] = {}
        self.bad_until: dict[str, float] = {}  # endpoint -> monotonic time
        self.waiting: dict[str, int] = {}
        self.last_demand: dict[str, float] = {}
        self._changed: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------------ view upkeep

    def on_instance(self, _key: str, rec: InstanceRecord, _rev: int) -> None:
        old = self.instances.get(rec.instance_id)
        self.instances[rec.instance_id] = rec
        if rec.state == InstanceState.FAILED and (old is None or old.state != rec.state):
            age = time.time() - rec.updated
            left = self.cfg.placer.failure_backoff - age
            if left > 0:
                self._fail(rec.model, f"{rec.model} failed to start: {rec.reason}", left)
        elif rec.state == InstanceState.READY:
            self.failures.pop(rec.model, None)
        self._reindex(rec.model)

    def on_instance_deleted(self, key: str) -> None:
        rec = self.instances.pop(key, None)
        if rec is not None:
            self._reindex(rec.model)

    def _reindex(self, model: str) -> None:
        self.ready[model] = [
            r
            for r in self.instances.values()
            if r.model == model and r.state == InstanceState.READY and r.endpoint
        ]
        self._notify(model)

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
        sub = await self.bus.nc.subscribe(
            proto.evt("placement.failed"), cb=self._on_placement_failed
        )
        loaded = asyncio.Event()
        watcher = asyncio.create_task(
            watch_kv(
                self.bus,
                self.bus.instances,
                InstanceRecord,
                self.on_instance,
                self.on_instance_deleted,
                stop,
                on_initial_done=loaded.set,
            )
        )
        reporter = asyncio.create_task(self._report_activity(stop))
        try:
            await stop.wait()
        finally:
            await sub.unsubscribe()
            watcher.cancel()
            reporter.cancel()
            await asyncio.gather(watcher, reporter, return_exceptions=True)

    # ------------------------------------------------------------------ requests

    def pick(self, model: str) -> InstanceRecord | None:
        """The ready instance with the fewest requests in flight here (a dict lookup)."""
        candidates = self.ready.get(model)
        if not candidates:
            return None
        now = time.monotonic()
        usable = [r for r in candidates if self.bad_until.get(r.endpoint or "", 0) < now]
        if not usable:
            return None
        return min(usable, key=lambda r: self.in_flight.get(r.instance_id, 0))

    def mark_bad(self, rec: InstanceRecord) -> None:
        self.bad_until[rec.endpoint or ""] = time.monotonic() + BAD_ENDPOINT_S

    async def acquire(self, model: str, wait_s: float) -> InstanceRecord:
        """A ready instance of `model`, demanding one and waiting up to `wait_s` if none."""
        rec = self.pick(model)
        if rec is not None:
            return rec
        deadline = time.monotonic() + wait_s
        self.waiting[model] = self.waiting.get(model, 0) + 1
        try:
            while True:
                rec = self.pick(model)
                if rec is not None:
                    return rec
                now = time.monotonic()
                fail = self.failures.get(model)
                if fail is not None and now < fail.until:
                    raise ApiError(503, fail.reason, "model_unavailable", fail.until - now)
                if now >= deadline:
                    raise ApiError(
                        503,
                        f"model {model} is not ready after {wait_s:.0f} s "
                        f"({self.describe(model)}); try again shortly",
                        "cold_start_timeout",
                        5,
                    )
                if now - self.last_demand.get(model, -1e9) >= DEMAND_EVERY_S:
                    self.last_demand[model] = now
                    await self._demand(model)
                changed = self._changed.setdefault(model, asyncio.Event())
                try:
                    wait = min(deadline - now, DEMAND_EVERY_S)
                    await asyncio.wait_for(changed.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            self.waiting[model] -= 1

    async def _demand(self, model: str) -> None:
        try:
            await self.bus.emit(
                proto.Demand(
                    model=model, gateway_id=self.gateway_id, waiting=self.waiting.get(model, 1)
                )
            )
        except Exception as e:  # the wait's deadline still bounds the request
            log.warning("could not publish demand for %s: %s", model, e)

    def describe(self, model: str) -> str:
        live = [
            r for r in self.instances.values() if r.model == model and r.state in proto.LIVE_STATES
        ]
        if not live:
            return "no instance placed yet"
        r = max(live, key=lambda r: r.updated)
        where = f" on {r.host}" if r.host else ""
        return f"instance {r.instance_id} is {r.state.value}{where}"

    async def header_of(self, model: str) -> tuple[proto.GgufSummary | None, int | None]:
        """A model's GGUF summary and size: from a host's store, else as read from its source
        (KV models). Bus reads, for /api/show only: never on the request path."""
        filename = store_filename(model, self.cfg.models[model].url)
        try:
            hosts = await kv_snapshot(self.bus, self.bus.hosts, proto.HostRecord, timeout=2)
            for host in hosts.values():
                for f in host.files:
                    if f.filename == filename and f.gguf is not None:
                        return f.gguf, f.size
            entry = await self.bus.models.get(proto.kv_key(model))
            info = proto.decode(entry.value, proto.ModelInfo) if entry.value else None
        except Exception as e:  # noqa: BLE001 - no facts is an answer too (KeyNotFound, timeouts)
            log.debug("no header for %s: %r", model, e)
            return None, None
        if info is None or info.url != self.cfg.models[model].url:
            return None, None
        return info.gguf, info.size

    def state_of(self, model: str) -> str:
        """One word for /v1/models: ready, starting, downloading, failed, or stopped."""
        recs = [r for r in self.instances.values() if r.model == model]
        if self.ready.get(model):
            return "ready"
        live = [r for r in recs if r.state in proto.LIVE_STATES]
        if live:
            return max(live, key=lambda r: r.updated).state.value
        if model in self.failures and time.monotonic() < self.failures[model].until:
            return "failed"
        return "stopped"

    # ------------------------------------------------------------------ activity

    def begin(self, rec: InstanceRecord) -> None:
        iid = rec.instance_id
        self.in_flight[iid] = self.in_flight.get(iid, 0) + 1
        self.last_used[iid] = time.time()

    def end(self, rec: InstanceRecord) -> None:
        iid = rec.instance_id
        self.in_flight[iid] = max(0, self.in_flight.get(iid, 0) - 1)
        self.last_used[iid] = time.time()

    async def _report_activity(self, stop: asyncio.Event) -> None:
        """Once a second, tell the placer what this gateway uses (idle stop and eviction)."""
        while not stop.is_set():
            await asyncio.sleep(1.0)
            live = {i for i, r in self.instances.items() if r.state in proto.LIVE_STATES}
            for iid in list(self.last_used):
                if iid not in live and not self.in_flight.get(iid):
                    self.last_used.pop(iid, None)
                    self.in_flight.pop(iid, None)
            report = proto.ActivityReport(
                gateway_id=self.gateway_id,
                ts=time.time(),
                instances={
                    iid: proto.InstanceActivity(self.in_flight.get(iid, 0), used)
                    for iid, used in self.last_used.items()
                },
            )
            try:
                await self.bus.put(self.bus.activity, self.gateway_id, report)
            except Exception as e:  # next second tries again
                log.warning("activity report failed: %s", e)
