"""Waiting for and reading the cluster's state during a fault: instance records, the
placer's lease, the event stream and its replicas, KV against the event log. Reads are
tried again while JetStream elects new leaders; a wait that runs out raises NotInTime."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

import proto
from lab.load import DEADLINE_S
from lls.bus import Bus, kv_snapshot
from lls.event_feed import EventFeed
from lls.history import diff, rebuild
from proto import InstanceRecord, InstanceState, LeaseRecord

T = TypeVar("T")


class NotInTime(AssertionError):
    """A wait ran past its deadline (an AssertionError: a test fails with its message)."""


async def until(check: Callable[[], Awaitable[T | None]], within: float, what: str) -> T:
    """The first truthy result of `check`, polled until `within` seconds have passed."""
    deadline = time.monotonic() + within
    error: Exception | None = None
    while True:
        try:
            got = await check()
        except Exception as e:  # noqa: BLE001 - the bus may be away mid-fault: try again
            got, error = None, e
        if got:
            return got
        if time.monotonic() >= deadline:
            raise NotInTime(f"not within {within:.0f} s: {what} ({error!r})")
        await asyncio.sleep(0.2)


async def read(call: Callable[[], Awaitable[T]], within: float = 30, what: str = "a read") -> T:
    """`call()`'s result, tried again while it raises: after a fault JetStream may answer
    'unavailable' or time out for a few seconds while its streams elect new leaders."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except Exception as e:  # noqa: BLE001 - a stream without a leader yet: try again
            if time.monotonic() >= deadline:
                raise NotInTime(f"not within {within:.0f} s: {what} ({e!r})") from e
            await asyncio.sleep(0.5)


async def records(bus: Bus) -> list[InstanceRecord]:
    return list((await kv_snapshot(bus, bus.instances, InstanceRecord)).values())


async def live(bus: Bus, model: str) -> list[InstanceRecord]:
    return [r for r in await records(bus) if r.model == model and r.state in proto.LIVE_STATES]


async def ready_one(bus: Bus, model: str, not_on: str = "") -> InstanceRecord | None:
    """The model's only live instance, when it is ready (and not on `not_on`)."""
    recs = await live(bus, model)
    if len(recs) == 1 and recs[0].state == InstanceState.READY and recs[0].host != not_on:
        return recs[0]
    return None


async def duplicates(bus: Bus) -> list[str]:
    """Models with more than one live instance (each wants one here)."""
    per_model = [r.model for r in await records(bus) if r.state in proto.LIVE_STATES]
    return sorted({m for m in per_model if per_model.count(m) > 1})


async def lease(bus: Bus) -> LeaseRecord:
    return proto.decode((await bus.leases.get("placer")).value, LeaseRecord)


async def steady_lease(bus: Bus) -> LeaseRecord:
    """The lease record once it has been renewed by the same holder for a while (a take-over
    left by the previous fault has settled)."""

    async def steady() -> LeaseRecord | None:
        first = await lease(bus)
        await asyncio.sleep(1.5)
        again = await lease(bus)
        same = (first.holder, first.epoch) == (again.holder, again.epoch) and first.holder
        return again if same else None

    return await until(steady, 30, "one placer holding the lease")


async def ask(base: str, model: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=DEADLINE_S) as c:
        body = {"model": model, "prompt": "a", "max_tokens": 2}
        return await c.post(f"{base}/v1/completions", json=body)


async def ok(call: Awaitable[httpx.Response]) -> httpx.Response | None:
    try:
        r = await call
    except httpx.HTTPError:
        return None
    return r if r.status_code == 200 else None


async def last_seq(bus: Bus) -> int:
    return (await bus.js.stream_info(proto.EVENTS_STREAM)).state.last_seq


async def events_since(bus: Bus, seq: int, within: float = 20) -> list[proto.Event]:
    """Every event of the stream after sequence `seq`, oldest first."""
    got: list[proto.Event] = []
    done = asyncio.Event()
    info = await bus.js.stream_info(proto.EVENTS_STREAM)
    last = info.state.last_seq
    if last <= seq:
        return []

    async def on_msg(msg: Any) -> None:
        with contextlib.suppress(msgspec.ValidationError):
            got.append(proto.decode(msg.data, proto.Event))
        if msg.metadata.sequence.stream >= last:
            done.set()

    sub = await bus.js.subscribe(
        proto.EVENTS_SUBJECTS,
        cb=on_msg,
        ordered_consumer=True,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq + 1
        ),
    )
    try:
        async with asyncio.timeout(within):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return got


class EventTap:
    """An ordered consumer of the event stream from the sequence after `seq0` on, as the
    dashboard follows it (lls.event_feed): which stream sequences reached it (a gap or a
    shortfall is a lost event), and how often it had to resubscribe."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.seq0 = 0
        self.seqs: list[int] = []
        self.feed: EventFeed | None = None

    async def __aenter__(self) -> EventTap:
        self.seq0 = await last_seq(self.bus)

        async def on_event(msg: Any) -> None:
            self.seqs.append(msg.metadata.sequence.stream)

        self.feed = EventFeed(self.bus, on_event, after=self.seq0)
        await self.feed.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.feed is not None:
            await self.feed.stop()

    @property
    def heals(self) -> int:
        return self.feed.heals if self.feed is not None else 0

    async def settle(self, within: float = 20) -> int:
        """Wait until every event the stream holds now has arrived; the stream's last
        sequence then."""
        last = await read(lambda: last_seq(self.bus))

        async def all_seen() -> bool:
            return last <= self.seq0 or (bool(self.seqs) and self.seqs[-1] >= last)

        await until(all_seen, within, "every event delivered")
        return last

    @property
    def published(self) -> int:
        return (self.seqs[-1] - self.seq0) if self.seqs else 0

    @property
    def gaps(self) -> bool:
        return self.seqs != list(range(self.seq0 + 1, self.seq0 + 1 + len(self.seqs)))

    def describe_gaps(self) -> str:
        """What broke the order, in words: missing, repeated and out-of-order sequences."""
        seen = Counter(self.seqs)
        top = max(self.seqs, default=self.seq0)
        missing = [s for s in range(self.seq0 + 1, top + 1) if s not in seen]
        repeated = sorted(s for s, n in seen.items() if n > 1)
        backwards = [(a, b) for a, b in itertools.pairwise(self.seqs) if b <= a]
        return (
            f"after {self.seq0}: {len(self.seqs)} delivered up to {top}; missing {missing[:20]}, "
            f"repeated {repeated[:20]}, backwards steps {backwards[:10]}; resubscribed "
            f"{self.heals} times; holes in the stream {list(self.feed.holes) if self.feed else []}"
        )


async def stream_leaders(bus: Bus) -> dict[str, str]:
    """Stream (KV buckets included) -> the NATS node leading it (its Raft leader): writes to
    a stream whose leader is cut off wait for a new leader to be elected."""
    out = {}
    for name in await bus.js.streams_info():
        cluster = name.cluster
        if cluster is not None and cluster.leader:
            out[name.config.name or "?"] = cluster.leader
    return out


async def disagreements(bus: Bus) -> list[str]:
    """Where KV's instance records and the ones rebuilt from the event log differ, each with
    both revisions (KV's below the event's: that write is gone from KV)."""
    table = rebuild(await events_since(bus, 0))
    kv = {r.instance_id: r for r in await records(bus)}
    out = []
    for line in diff(table, kv):
        iid = line.split(":", 1)[0]
        rec = kv.get(iid)
        got = table.get(iid)
        rev = None
        if rec is not None:
            with contextlib.suppress(Exception):
                entry = await bus.instances.get(proto.instance_key(rec.host or "", iid))
                rev = entry.revision
        out.append(f"{line} [KV revision {rev}, event revision {got[0] if got else None}]")
    return out


async def settled_disagreements(bus: Bus) -> list[str]:
    problems = await disagreements(bus)
    if problems:  # events follow their writes: give a late one a moment
        await asyncio.sleep(5)
        problems = await disagreements(bus)
    return problems
