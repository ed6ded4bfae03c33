"""The faults of issue 13 driven on a HostLab, with their measurements: shared by the tests
(tests/test_hosts.py asserts on what these return) and the report (bench/bench_hosts.py
prints it), so the scenario exists once.

Each fault runs under a bounded steady load (lab/load.py). A driver measures and returns;
it asserts only its own preconditions, and raises `NotInTime` (lab/observe.py) when a wait
runs out. The caller owns the bus and heals the lab afterwards (`healed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

import proto
from lab.load import REFUSALS, Load
from lab.observe import (
    EventTap,
    NotInTime,
    ask,
    duplicates,
    events_since,
    last_seq,
    lease,
    live,
    ok,
    read,
    ready_one,
    records,
    settled_disagreements,
    steady_lease,
    until,
)
from lls.bus import Bus, kv_snapshot, new_id
from lls.config import ModelConfig, store_filename_of
from proto import InstanceRecord, LeaseRecord

if TYPE_CHECKING:
    from lab.hosts import HostLab

MOVE_WITHIN_S = 35.0  # a lost host's model (or the lease) must have moved by then

# A client of a NATS node that is cut off (not killed: its packets just vanish) learns it
# only from its pings (lls/bus.py: every 2 s, 3 unanswered = gone, so ~6 s), and nats-py
# shuffles the server list, so some service on a healthy host is often attached to the cut
# host's node and stalls that long before it fails over: `attached` names them.
STALLED = (
    "was a service attached to the cut-off host's NATS node stalled past its pings "
    "(lls/bus.py PING_INTERVAL_S x MAX_OUTSTANDING_PINGS)? see the report in the test output"
)


# ------------------------------------------------------------------ the lab's shape


def fault_lab(
    gguf: Callable[[int], Path], host_lost_after: float, hosts: int = 3
) -> dict[str, Any]:
    """HostLab's arguments for these faults. The last host (h3 of 3: a NATS node's host; h4
    of 4: a host with no NATS node) has a 1024 MiB (simulated) GPU, the others 2048 MiB.
    Model "m" (500 MiB) and "wide" (1500 MiB) have their files on the last host only, so
    "m" goes there (it fits: the file is there) and "wide" to h1 or h2 (downloaded there);
    "n" (300 MiB) is stored nowhere. `gguf(seed)`: a tiny GGUF's path per seed."""
    models = {
        "m": {"url": f"file://{gguf(41)}", "ctx_size": 256, "memory_mib": 500},
        "wide": {"url": f"file://{gguf(42)}", "ctx_size": 256, "memory_mib": 1500},
        "n": {"url": f"file://{gguf(43)}", "ctx_size": 256, "memory_mib": 300},
    }
    seeds = {
        store_filename_of(name, msgspec.convert(models[name], ModelConfig)): gguf(seed)
        for name, seed in (("m", 41), ("wide", 42))
    }
    return {
        "models": models,
        "hosts": hosts,
        "config": {"placer": {"host_lost_after": host_lost_after, "failure_backoff": 5}},
        "gpus": {f"h{hosts}": [{"name": "sim-1g", "memory_mib": 1024}]},
        "seed_files": {f"h{hosts}": seeds},
    }


# ------------------------------------------------------------------ the lab


def llama_counts(lab: HostLab) -> dict[str, int]:
    return {h.name: len(lab.llama_pids(h.name)) for h in lab.hosts}


def attached(lab: HostLab, host: str) -> list[str]:
    """The clients of `host`'s NATS node that live on other hosts (they stall when it is cut)."""
    addr = lab.host(host).addr
    return [c for c in lab.connections().get(host, []) if not c.endswith("@" + addr)]


async def healed(lab: HostLab, bus: Bus, model: str = "m", within: float = 60) -> None:
    """Every link up, every gateway serving `model`, every host heard within the last 3 s."""
    for h in lab.hosts:
        lab.link_up(h.name)

    async def fresh() -> bool:
        hosts = await kv_snapshot(bus, bus.hosts, proto.HostRecord)
        now = time.time()
        return all(h.name in hosts and now - hosts[h.name].ts < 3 for h in lab.hosts)

    await until(fresh, within, "every host's heartbeat fresh again")
    for host in lab.coordinators:
        r = await until(lambda h=host: ok(ask(lab.gateway_url(h), model)), within, f"{host} serves")
        assert r.status_code == 200


async def cold_start(bus: Bus, base: str, model: str) -> tuple[float, InstanceRecord]:
    """Ask for a model with no instance; seconds from the request to its record READY (the
    model's own load time here: placement, download if any, llama-server start)."""
    assert not await live(bus, model), f"{model} is already running"
    t0 = time.monotonic()
    asked = asyncio.create_task(ask(base, model))
    try:
        rec = await until(lambda: ready_one(bus, model), 60, f"{model} ready")
        took = time.monotonic() - t0
        r = await asked
    finally:
        asked.cancel()
    assert r.status_code == 200, r.text
    return took, rec


# ------------------------------------------------------------------ 2. a short drop


@dataclass
class ShortDrop:
    cut: str
    seconds: float
    before: InstanceRecord
    after: InstanceRecord
    host_lost: list[proto.HostLost]
    load: Load


async def short_drop(lab: HostLab, bus: Bus, model: str, gateway: str, seconds: float) -> ShortDrop:
    """Cut the host serving `model` for `seconds` (under host_lost_after), then wait past
    host_lost_after: nothing should be rescheduled nor any host declared lost."""
    r = await ask(lab.gateway_url(gateway), model)
    assert r.status_code == 200, r.text
    before = await until(lambda: ready_one(bus, model), 30, f"{model} ready")
    seq = await last_seq(bus)
    host_lost_after = float(lab.config_for(gateway)["placer"]["host_lost_after"])
    async with Load(lab.gateway_url(gateway), model) as load:
        await asyncio.sleep(1)
        lab.link_down(before.host)
        await asyncio.sleep(seconds)
        lab.link_up(before.host)
        await asyncio.sleep(host_lost_after + 2)  # past host_lost_after: a late verdict shows
    after = await until(lambda: ready_one(bus, model), 10, f"{model} ready")
    lost = [e for e in await read(lambda: events_since(bus, seq)) if isinstance(e, proto.HostLost)]
    return ShortDrop(before.host, seconds, before, after, lost, load)


# ------------------------------------------------------------------ 1. a host lost


@dataclass
class HostLost:
    cut: str
    before: InstanceRecord
    stalls: list[str]  # clients of the cut host's NATS node from other hosts
    load: Load
    moved: InstanceRecord | None = None  # None: not ready elsewhere within MOVE_WITHIN_S
    t_moved: float = 0.0  # seconds from the cut to the model READY elsewhere
    old: InstanceRecord | None = None  # the cut host's instance as KV says after the move
    served_by_move: int = 0
    during: tuple[int, int, int] = (0, 0, 0)  # (served, refused, hung) from cut to move
    t_stale: float = 0.0  # seconds from the heal to the stale llama-server gone
    final: list[InstanceRecord] = field(default_factory=list)  # the model's live instances
    duplicates: list[str] = field(default_factory=list)  # models live twice after the heal


async def host_lost(lab: HostLab, bus: Bus, model: str, gateway: str) -> HostLost:
    """Cut the host serving `model` for good (past host_lost_after) until the model is
    READY elsewhere, serve from there a while, then heal: the stale copy must go."""
    r = await ask(lab.gateway_url(gateway), model)
    assert r.status_code == 200, r.text
    before = await until(lambda: ready_one(bus, model), 30, f"{model} ready")
    cut = before.host
    out = HostLost(cut, before, attached(lab, cut), Load(lab.gateway_url(gateway), model))
    async with out.load as load:
        await asyncio.sleep(1)
        lab.link_down(cut)
        t_cut = time.monotonic()
        try:
            out.moved = await until(
                lambda: ready_one(bus, model, not_on=cut), MOVE_WITHIN_S, f"{model} elsewhere"
            )
        except NotInTime:
            lab.link_up(cut)
            return out
        t_move = time.monotonic()
        out.t_moved = t_move - t_cut
        out.during = load.counts(t_cut, t_move)
        recs = await read(lambda: records(bus))
        out.old = next((r for r in recs if r.instance_id == before.instance_id), None)
        out.served_by_move = load.served
        await asyncio.sleep(2)  # served from the new place for a while
        lab.link_up(cut)
        t_heal = time.monotonic()

        # The stale copy on the healed host is stopped (or adopted): one per model.
        async def one_left() -> bool:
            counts = llama_counts(lab)
            running = [r for r in await records(bus) if r.state in proto.LIVE_STATES]
            return counts[cut] == 0 and sum(counts.values()) == len(running)

        await until(one_left, 30, f"the stale llama-server on {cut} stopped")
        out.t_stale = time.monotonic() - t_heal
        await asyncio.sleep(2)
    out.final = await read(lambda: live(bus, model))
    out.duplicates = await read(lambda: duplicates(bus))
    return out


# ------------------------------------------------------------------ 4. the leader cut off


@dataclass
class LeaderCut:
    cut: str
    other: str
    before: LeaseRecord
    stalls: list[str]
    load: Load
    after: LeaseRecord | None = None  # None: no take-over within MOVE_WITHIN_S
    t_over: float = 0.0  # seconds from the cut to another placer holding the lease
    during: tuple[int, int, int] = (0, 0, 0)  # (served, refused, hung) from cut to take-over
    refusal: proto.CommandRefused | None = None  # the deposed leader's late stop, refused
    target: InstanceRecord | None = None  # what that stop aimed at
    still: InstanceRecord | None = None  # the target afterwards
    final: LeaseRecord | None = None
    old_log: str = ""
    duplicates: list[str] = field(default_factory=list)


async def leader_cut(lab: HostLab, bus: Bus, model: str) -> LeaderCut:
    """Cut the leading placer's host until another placer holds the lease; heal; then send a
    stop as the deposed leader would (its old epoch): the agent must refuse it. `bus` must
    not use a coordinator's NATS node."""
    before = await steady_lease(bus)
    cut = before.holder.split("-")[1]  # placer-<host>-<id>
    other = next(h for h in lab.coordinators if h != cut)
    refused: list[proto.CommandRefused] = []

    async def on_refused(msg: Any) -> None:
        refused.append(proto.decode(msg.data, proto.CommandRefused))

    sub = await bus.nc.subscribe(proto.evt("command.refused"), cb=on_refused)
    out = LeaderCut(cut, other, before, attached(lab, cut), Load(lab.gateway_url(other), model))
    try:
        async with out.load as load:
            await asyncio.sleep(1)
            now = await lease(bus)  # still the leader we cut, so the time measured is true
            assert (now.holder, now.epoch) == (before.holder, before.epoch), (before, now)
            lab.link_down(cut)
            t_cut = time.monotonic()

            async def taken_over() -> LeaseRecord | None:
                rec = await lease(bus)
                return rec if rec.epoch > before.epoch and rec.holder else None

            try:
                out.after = await until(taken_over, MOVE_WITHIN_S, "another placer holds the lease")
            except NotInTime:
                lab.link_up(cut)
                return out
            t_over = time.monotonic()
            out.t_over = t_over - t_cut
            out.during = load.counts(t_cut, t_over)
            await asyncio.sleep(2)
            lab.link_up(cut)
            host_lost_after = float(lab.config_for(other)["placer"]["host_lost_after"])
            await asyncio.sleep(host_lost_after)  # the old leader is back, and hears of it
            # What it may still send carries its old epoch: refused, never run. Send one as
            # it would (a stop of a serving instance) to see the fence hold.
            # Aim it at the model's one ready instance, wherever it is now: judged lost and
            # replaced, or kept on the cut host when the whole cluster was silent with it
            # (the placer then counts nobody's silence). It is settled by now either way.
            target = await until(lambda: ready_one(bus, model), 60, f"{model} ready")
            out.target = target
            late = proto.StopInstance(
                cmd_id=new_id(), instance_id=target.instance_id, reason="late", epoch=before.epoch
            )
            await read(lambda: bus.command(proto.cmd_agent(target.host), late))

            async def refusal() -> proto.CommandRefused | None:
                return next((r for r in refused if r.cmd_id == late.cmd_id), None)

            out.refusal = await until(refusal, 20, "the agent refuses the deposed leader's stop")
            await asyncio.sleep(1)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    out.still = await read(lambda: ready_one(bus, model))
    out.final = await read(lambda: lease(bus))
    out.old_log = lab.log("placer", cut)
    out.duplicates = await read(lambda: duplicates(bus))
    return out


# ------------------------------------------------------------------ 3. a NATS node killed


@dataclass
class NatsKill:
    killed: str
    load: Load
    tap: EventTap
    cold: list[tuple[int, str, str]] = field(default_factory=list)  # status, Retry-After, body
    cold_before: list[InstanceRecord] = field(default_factory=list)  # its live ones before
    host_lost: list[str] = field(default_factory=list)  # hosts declared lost meanwhile
    served_by: list[str] = field(default_factory=list)  # the load model's instances, before/after
    t_cold: float = 0.0  # seconds from the kill to the cold model served
    t_down: float = 0.0  # seconds the node was down
    t_again: float = 0.0  # seconds from its restart to its host's gateway serving again
    during: tuple[int, int, int] = (0, 0, 0)  # (served, refused, hung) while it was down
    longest_gap: float = 0.0  # longest time without a served request while it was down
    last: int = 0  # the event stream's last sequence at the end
    problems: list[str] = field(default_factory=list)  # KV vs the event log
    replicas: dict[str, int] = field(default_factory=dict)  # stream -> its replicas
    cold_live: list[InstanceRecord] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


async def nats_kill(lab: HostLab, bus: Bus, killed: str, model: str, cold: str) -> NatsKill:
    """SIGKILL `killed`'s NATS node under load, ask for the cold model `cold` meanwhile
    (commands and records needed while it is down), restart it: count events, compare KV
    with the event log, wait for every command consumed and every replica current. `bus`
    must not use `killed`'s node."""
    gateway = next(h for h in lab.coordinators if h != killed)
    async with EventTap(bus) as tap:
        out = NatsKill(killed, Load(lab.gateway_url(gateway), model), tap)
        out.cold_before = await read(lambda: live(bus, cold))
        out.served_by = [r.instance_id for r in await read(lambda: live(bus, model))]
        async with out.load as load:
            await asyncio.sleep(1)
            lab.kill_nats(killed)
            t_kill = time.monotonic()
            # A gateway may refuse the cold model (clearly) while the cluster elects new
            # leaders; a client asks again after Retry-After.
            while time.monotonic() - t_kill < 60:
                r = await ask(lab.gateway_url(gateway), cold)
                out.cold.append((r.status_code, r.headers.get("retry-after", ""), r.text[:200]))
                if r.status_code == 200 or r.status_code not in REFUSALS:
                    break
                if not r.headers.get("retry-after"):
                    break
                await asyncio.sleep(min(5.0, float(r.headers["retry-after"])))
            if r.status_code != 200:
                return out
            out.t_cold = time.monotonic() - t_kill
            await asyncio.sleep(2)
            lab.start_nats(killed)
            t_back = time.monotonic()
            out.t_down = t_back - t_kill
            out.during = load.counts(t_kill, t_back)
            out.longest_gap = load.longest_gap(t_kill, t_back)
            # Services reconnect by themselves: the killed node's host serves again.
            await until(lambda: ok(ask(lab.gateway_url(killed), cold)), 60, f"{killed} serves")
            out.t_again = time.monotonic() - t_back
            await healed(lab, bus, model)
            await asyncio.sleep(1)
        out.last = await tap.settle()
    seen = await read(lambda: events_since(bus, tap.seq0), 60)
    out.host_lost = [e.host_id for e in seen if isinstance(e, proto.HostLost)]
    out.served_by += [r.instance_id for r in await read(lambda: live(bus, model))]
    out.problems = await read(lambda: settled_disagreements(bus), 60)

    async def drained() -> bool:
        info = await bus.js.stream_info(proto.CMDS_STREAM)
        return info.state.messages == 0

    await until(drained, 20, "every command consumed")
    for name in (proto.EVENTS_STREAM, proto.CMDS_STREAM, f"KV_{proto.KV_INSTANCES}"):
        info = await read(lambda name=name: bus.js.stream_info(name))
        out.replicas[name] = info.config.num_replicas

        async def caught_up(name: str = name) -> bool:
            c = (await bus.js.stream_info(name)).cluster
            return (
                c is not None
                and len(c.replicas or []) == 2
                and all(p.current for p in c.replicas or [])
            )

        await until(caught_up, 30, f"{name}: every replica current again")
    out.cold_live = await read(lambda: live(bus, cold))
    out.duplicates = await read(lambda: duplicates(bus))
    return out
