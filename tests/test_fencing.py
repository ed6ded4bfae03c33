"""A fenced leader: the placer lease judged by local time only, epochs that grow with every
take-over, and agents and downloaders that refuse a deposed leader's commands.

Pure judgements first (services/placer/lease.py, lls/fence.py) with plain values; then the
lease on real NATS, a real agent and downloader refusing stale epochs, and two real placer
processes where the leader is frozen (SIGSTOP) past its lease.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_agent import (
    Agents,
    agent_config,
    agents,  # noqa: F401 - fixture
    eventually,
    get_record,
    new_iid,
    place,
    put_model,
    start_cmd,
    unique_host,
    wait_state,
)
from test_cluster import (
    ask,
    cluster,  # noqa: F401 - fixture
    gguf_models,
    hosts_joined,
    instances,
    wait_for,
)

import proto
from lls.bus import Bus, new_id
from lls.config import parse, store_filename_of
from lls.fence import Fence, stale
from lls.service import ServiceContext
from proto import InstanceState, LeaseRecord, StopInstance
from services.downloader.service import run as run_downloader
from services.placer.lease import (
    KEY,
    Lease,
    LeaseLost,
    Seen,
    may_take_over,
    next_epoch,
    observe,
    valid_until,
)
from services.placer.plan import STOP_GRACE_S
from services.placer.service import Placer

TTL, MARGIN = 3.0, 1.0

# ---------------------------------------------------------------- pure: the standby's view


def test_a_standby_counts_from_when_it_first_saw_a_revision_and_restarts_on_a_new_one() -> None:
    seen = observe(None, 7, now=100.0)
    assert seen == Seen(7, 100.0)
    assert observe(seen, 7, now=102.9) is seen  # unchanged: the count goes on
    assert observe(seen, 8, now=102.9) == Seen(8, 102.9)  # a renewal: counted afresh


def test_a_standby_takes_over_only_after_the_ttl_of_its_own_time_with_the_record_unchanged() -> (
    None
):
    held = LeaseRecord(holder="p1", ts=0.0, epoch=3)
    seen = observe(None, 12, now=50.0)
    assert not may_take_over(seen, held, now=50.0, ttl_s=TTL)
    assert not may_take_over(seen, held, now=52.99, ttl_s=TTL)
    assert may_take_over(seen, held, now=53.0, ttl_s=TTL)
    # the record's own wall-clock ts means nothing: one from 1970 is not "expired"
    assert not may_take_over(observe(None, 12, 50.0), held, now=51.0, ttl_s=TTL)
    # a renewal seen just before the TTL restarts the count
    renewed = observe(seen, 13, now=52.5)
    assert not may_take_over(renewed, held, now=54.0, ttl_s=TTL)
    assert may_take_over(renewed, held, now=55.5, ttl_s=TTL)


def test_a_handed_over_or_never_held_lease_is_taken_at_once_a_deleted_one_after_the_ttl() -> None:
    handed = LeaseRecord(holder="", ts=0.0, epoch=4)
    assert may_take_over(observe(None, 20, 9.0), handed, now=9.0, ttl_s=TTL)
    assert may_take_over(observe(None, 0, 9.0), None, now=9.0, ttl_s=TTL)
    # deleted while someone may still lead (an operator's `kv del`): wait it out
    tombstone = observe(None, 21, 9.0)
    assert not may_take_over(tombstone, None, now=11.0, ttl_s=TTL)
    assert may_take_over(tombstone, None, now=12.0, ttl_s=TTL)


def test_epochs_grow_with_every_take_over_even_across_a_deleted_record() -> None:
    assert next_epoch(None, 0) == 1  # the first leader ever
    # the only key in its bucket: the take-over write's revision is the epoch
    assert next_epoch(LeaseRecord(holder="p1", ts=0.0, epoch=1), 40) == 41
    assert next_epoch(LeaseRecord(holder="", ts=0.0, epoch=41), 41) == 42  # after a hand-over
    assert next_epoch(None, 45) == 46  # deleted at revision 45: still above 42
    # a record from a placer older than epochs (epoch 0) or an odd epoch: still above both
    assert next_epoch(LeaseRecord(holder="old", ts=0.0), 9) == 10
    assert next_epoch(LeaseRecord(holder="p", ts=0.0, epoch=99), 9) == 100
    # the bucket lost (a NATS server started afresh): the placer's own last epoch still counts
    assert next_epoch(None, 0, known=7) == 8


@pytest.mark.parametrize("leader_offset", [-1e6, -3600.0, 0.0, 7.5, 1e9])
@pytest.mark.parametrize("standby_offset", [-1e6, 0.0, 3600.0, 1e9])
@pytest.mark.parametrize("drift", [-1e-3, 0.0, 1e-3])
def test_the_leader_stops_acting_before_any_standby_may_take_over_whatever_the_clocks(
    leader_offset: float, standby_offset: float, drift: float
) -> None:
    """Real time t; each host's clock reads offset + t (the standby's ticking `drift` faster
    or slower). The leader sends its last renewal at real 10.0; the record lands any time
    after, and the standby reads it any time after that. At no real time may the leader
    still act while the standby may already take over."""

    def leader(t: float) -> float:
        return leader_offset + t

    def standby(t: float) -> float:
        return standby_offset + t * (1 + drift)

    sent = 10.0
    until = valid_until(leader(sent), TTL, MARGIN)
    held = LeaseRecord(holder="p1", ts=-5e8, epoch=2)  # its wall clock: way off, ignored
    for landed in (sent, sent + 0.01, sent + 0.4):
        for read in (landed, landed + 0.3, landed + 2.0):
            seen = observe(None, 5, standby(read))
            t = read
            while t < read + 2 * TTL:
                leads = leader(t) < until
                may = may_take_over(seen, held, standby(t), TTL)
                assert not (leads and may), (landed, read, t)
                t += 0.01
    # and the leader does stop: not an empty claim
    assert leader(sent + TTL - MARGIN - 0.01) < until <= leader(sent + TTL - MARGIN)


# ---------------------------------------------------------------- pure: the receivers' fence


def test_a_command_from_an_older_epoch_is_refused_with_the_reason() -> None:
    assert stale(3, 4) == "stale leader epoch 3 < 4"
    assert stale(4, 4) is None and stale(5, 4) is None
    assert stale(0, 4) is None  # no leader sent it (`lls pull`, a pre-epoch placer)
    fence = Fence()
    assert fence.admit(2) is None and fence.highest == 2
    assert fence.admit(0) is None and fence.highest == 2
    fence.saw(6)  # from the lease record
    assert fence.admit(5) == "stale leader epoch 5 < 6"
    assert fence.admit(7) is None and fence.highest == 7


# ---------------------------------------------------------------- the lease on real NATS


def quick_lease(bus: Bus, name: str) -> Lease:
    return Lease(bus.leases, name, ttl_s=1.5, renew_s=0.2, margin_s=0.5)


async def lease_record(bus: Bus) -> tuple[LeaseRecord, int]:
    entry = await bus.leases.get(KEY)
    return proto.decode(entry.value, LeaseRecord), entry.revision


async def test_racing_placers_exactly_one_leads_and_epochs_grow_across_take_overs(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "services.placer.lease")
    leases = [quick_lease(bus, f"p{i}") for i in range(4)]
    won = await asyncio.gather(*(lease.try_acquire() for lease in leases))
    assert won.count(True) == 1, won
    first = leases[won.index(True)]
    rec, rev = await lease_record(bus)
    assert (rec.holder, rec.epoch) == (first.holder, first.epoch) and first.epoch == rev == 1
    assert [lease.valid() for lease in leases] == won
    with pytest.raises(LeaseLost):
        leases[won.index(False)].check()

    # Renewals keep the epoch; the standbys keep waiting while they come.
    for _ in range(10):
        last_renewal = time.monotonic()
        assert await first.try_acquire()
        assert not any(await asyncio.gather(*(s.try_acquire() for s in leases if s is not first)))
        await asyncio.sleep(0.2)
    assert (await lease_record(bus))[0].epoch == first.epoch

    # The leader stops renewing (frozen): one standby takes over, only once the leader's
    # own clock says it stopped acting.
    standbys = [s for s in leases if s is not first]
    t0 = time.monotonic()
    while True:
        won = await asyncio.gather(*(s.try_acquire() for s in standbys))
        if any(won):
            break
        assert time.monotonic() - t0 < 10, "no standby took over"
        await asyncio.sleep(0.05)
    took = time.monotonic() - last_renewal
    assert won.count(True) == 1, won
    second = standbys[won.index(True)]
    assert not first.valid(), "the old leader still acts after the take-over"
    assert second.epoch > first.epoch
    epochs = [first.epoch, second.epoch]
    assert took >= 1.5  # a TTL of the standby's own time after it saw the last renewal

    # The old leader wakes: its renewal fails, it says so, and it does not act.
    assert not await first.try_acquire()
    assert not first.valid()
    assert f"placer {first.holder} lost the lease to {second.holder}" in caplog.text

    # A clean stop hands over at once: the next leader's epoch is higher again.
    await second.release()
    t1 = time.monotonic()
    won = await asyncio.gather(*(s.try_acquire() for s in leases if s is not second))
    assert won.count(True) == 1 and time.monotonic() - t1 < 1.0
    third = [s for s in leases if s is not second][won.index(True)]
    assert third.epoch > epochs[1] > epochs[0]
    rec, _ = await lease_record(bus)
    assert (rec.holder, rec.epoch) == (third.holder, third.epoch)


async def test_holding_placers_never_both_act_and_a_clean_stop_hands_over(bus: Bus) -> None:
    a, b = quick_lease(bus, "a"), quick_lease(bus, "b")
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(a.hold(stop_a)), asyncio.create_task(b.hold(stop_b))]
    try:
        led = 0
        for _ in range(60):  # 3 s
            assert not (a.valid() and b.valid())
            led += a.valid() or b.valid()
            await asyncio.sleep(0.05)
        assert led >= 50, "nobody led most of the time"
        leader, other = (a, b) if a.valid() else (b, a)
        epoch = leader.epoch
        (stop_a if leader is a else stop_b).set()
        await eventually(_async(other.valid), 5, "the standby takes over after the hand-over")
        assert other.epoch > epoch and not leader.valid()
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(*tasks)
    rec, _ = await lease_record(bus)
    assert rec.holder == ""  # both stopped: handed over, epoch kept for the next leader
    assert rec.epoch == max(a.epoch, b.epoch)


def _async(fn: Callable[[], bool]) -> Callable[[], asyncio.Future[bool]]:
    async def call() -> bool:
        return fn()

    return call  # type: ignore[return-value]


# ---------------------------------------------------------------- receivers refuse


class Refusals:
    def __init__(self) -> None:
        self.items: list[proto.CommandRefused] = []

    async def cb(self, msg) -> None:  # type: ignore[no-untyped-def]
        self.items.append(proto.decode(msg.data, proto.CommandRefused))

    async def of(self, cmd_id: str, within: float = 20) -> proto.CommandRefused:
        async def found() -> proto.CommandRefused | None:
            return next((r for r in self.items if r.cmd_id == cmd_id), None)

        return await eventually(found, within, f"a CommandRefused for {cmd_id}")


@pytest.fixture
async def refusals(bus: Bus) -> AsyncIterator[Refusals]:
    r = Refusals()
    sub = await bus.nc.subscribe(proto.evt("command.refused"), cb=r.cb)
    yield r
    await sub.unsubscribe()


async def test_an_agent_refuses_commands_of_an_older_epoch_and_runs_current_ones(
    agents: Agents,  # noqa: F811
    bus: Bus,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
    refusals: Refusals,
) -> None:
    host = unique_host()
    filename = put_model(tmp_path, tiny_gguf(1), "tiny")
    await agents.start(parse(agent_config(tmp_path, host)), host)
    subject = proto.cmd_agent(host)

    # The epoch a command carries is learned: epoch 5 runs, then epoch 4 is refused.
    a = new_iid()
    await place(bus, host, start_cmd(a, filename, epoch=5))
    assert (await wait_state(bus, a, InstanceState.READY, InstanceState.FAILED)).state == "ready"
    old_stop = StopInstance(cmd_id=new_id(), instance_id=a, reason="deposed", epoch=4)
    await bus.command(subject, old_stop)
    refused = await refusals.of(old_stop.cmd_id)
    assert (refused.host, refused.command, refused.instance_id) == (host, "stop", a)
    assert refused.reason == "stale leader epoch 4 < 5"

    # A take-over is learned from the lease record too, before any command of the new epoch.
    await bus.leases.put(KEY, proto.encode(LeaseRecord(holder="p2", ts=time.time(), epoch=9)))

    async def learned() -> proto.CommandRefused | None:
        probe = StopInstance(cmd_id=new_id(), instance_id=new_iid(), epoch=8)
        await bus.command(subject, probe)
        await asyncio.sleep(0.3)
        return next((r for r in refusals.items if r.cmd_id == probe.cmd_id), None)

    assert (await eventually(learned, 20, "the agent learns epoch 9")).reason.endswith("8 < 9")
    b = new_iid()
    late_start = start_cmd(b, filename, epoch=8)
    await place(bus, host, late_start)
    refused = await refusals.of(late_start.cmd_id)
    assert (refused.command, refused.model, refused.reason) == (
        "start",
        "tiny",
        "stale leader epoch 8 < 9",
    )
    assert (await get_record(bus, b)).state == InstanceState.PENDING  # not run, not failed

    # Current-epoch commands still run (a new cmd_id: as the new leader would resend).
    await bus.command(subject, start_cmd(b, filename, epoch=9))
    assert (await wait_state(bus, b, InstanceState.READY, InstanceState.FAILED)).state == "ready"
    assert (await get_record(bus, a)).state == InstanceState.READY  # the stale stop did nothing
    await bus.command(subject, StopInstance(cmd_id=new_id(), instance_id=a, epoch=9))
    await wait_state(bus, a, InstanceState.STOPPED)

    # Refused commands were acked: nothing waits for redelivery.
    async def settled() -> bool:
        info = await bus.js.consumer_info(proto.CMDS_STREAM, f"agent-{host}")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled, 10, "every command acked")


async def test_a_downloader_refuses_commands_of_an_older_epoch(
    bus: Bus, tmp_path: Path, refusals: Refusals, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLS_OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf"))
    host = unique_host()
    store = tmp_path / "store"
    models = {n: {"url": f"file:///nowhere/{n}.gguf"} for n in ("m", "x")}
    cfg = parse({"agent": {"store": str(store), "host_id": host}, "models": models})
    name = store_filename_of("m", cfg.models["m"])
    store.mkdir(parents=True, exist_ok=True)
    (store / name).write_bytes(b"GGUF kept")
    deleted: list[proto.FileDeleted] = []

    async def on_deleted(msg) -> None:  # type: ignore[no-untyped-def]
        deleted.append(proto.decode(msg.data, proto.FileDeleted))

    sub = await bus.nc.subscribe(proto.evt("file.deleted"), cb=on_deleted)
    ctx = ServiceContext(name="downloader", cfg=cfg, bus=bus, host_id=host)
    task = asyncio.create_task(run_downloader(ctx))
    try:
        # A take-over is learned from the lease record: probes of epoch 5 (deleting x, which
        # is absent: harmless while they still run) until one is refused.
        await bus.leases.put(KEY, proto.encode(LeaseRecord(holder="p", ts=0.0, epoch=6)))
        x = store_filename_of("x", cfg.models["x"])

        async def learned() -> proto.CommandRefused | None:
            probe = proto.DeleteFile(cmd_id=new_id(), model="x", filename=x, epoch=5)
            await bus.command(proto.cmd_download(host), probe)
            await asyncio.sleep(0.3)
            return next((r for r in refusals.items if r.cmd_id == probe.cmd_id), None)

        await eventually(learned, 20, "the downloader learns epoch 6")
        stale_delete = proto.DeleteFile(cmd_id=new_id(), model="m", filename=name, epoch=5)
        await bus.command(proto.cmd_download(host), stale_delete)
        got = await refusals.of(stale_delete.cmd_id)
        assert (got.host, got.command, got.model, got.reason) == (
            host,
            "delete",
            "m",
            "stale leader epoch 5 < 6",
        )
        assert (store / name).read_bytes() == b"GGUF kept"
        # the current leader's delete runs (the same cmd_id: dedup is per epoch)
        current = proto.DeleteFile(cmd_id=stale_delete.cmd_id, model="m", filename=name, epoch=6)
        await bus.command(proto.cmd_download(host), current)

        async def gone() -> bool:
            return any(e.model == "m" and e.existed for e in deleted)

        await eventually(gone, 20, "the current epoch's delete")
        assert not (store / name).exists()
    finally:
        await sub.unsubscribe()
        ctx.stop.set()
        async with asyncio.timeout(15):
            await task


# ---------------------------------------------------------------- two placer processes


async def test_a_frozen_leader_is_replaced_and_does_not_act_when_it_wakes(
    cluster,  # noqa: ANN001, F811
    bus: Bus,
    tiny_gguf: Callable[[int], Path],
) -> None:
    c = cluster(gguf_models(tiny_gguf, ["m", "n"], 500))
    c.agent("h1", [{"name": "sim", "memory_mib": 4000}])
    p1 = c.spawn("placer", "placer-1")

    async def leads(name: str) -> bool:
        return "holds the lease" in c.logs(name)

    await wait_for(lambda: leads("placer-1"), 30, "placer-1 leads")
    c.spawn("placer", "placer-2")
    c.spawn("gateway")
    c.wait_gateway()
    await hosts_joined(bus, 1)
    assert (await ask(c.base, "m")).status_code == 200
    before, _ = await lease_record(bus)

    p1.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()

        async def taken_over() -> LeaseRecord | None:
            rec, _ = await lease_record(bus)
            return rec if rec.holder != before.holder and rec.holder else None

        after = await wait_for(taken_over, 30, "placer-2 takes the lease")
        took = time.monotonic() - t0
        assert after.epoch > before.epoch
        assert await leads("placer-2")
        # the new leader serves: a cold start of another model while the old one is frozen
        r = await ask(c.base, "n")
        assert r.status_code == 200, r.text
        print(f"take-over {took:.2f} s after SIGSTOP (epoch {before.epoch} -> {after.epoch})")
    finally:
        p1.send_signal(signal.SIGCONT)

    async def noticed() -> bool:
        return "lost the lease" in c.logs("placer-1")

    await wait_for(noticed, 20, "placer-1 says it lost the lease")
    await asyncio.sleep(2.0)  # room for anything it would still do
    live = [i for i in await instances(bus) if i.state in proto.LIVE_STATES]
    assert sorted(i.model for i in live) == ["m", "n"], live
    rec, _ = await lease_record(bus)
    assert (rec.holder, rec.epoch) == (after.holder, after.epoch)
    # and the served model still answers through the new leader's records
    assert (await ask(c.base, "m")).status_code == 200


# ---------------------------------------------------------------- the placer stops mid-pass


async def test_a_placer_whose_lease_lapsed_mid_pass_sends_and_writes_nothing(bus: Bus) -> None:
    """The checks right before each command and record write: a pass that overran the
    lease (frozen, or renewals slow) aborts at its next step, with LeaseLost."""
    cfg = parse({"models": {"m": {"url": "file:///nowhere/m.gguf", "memory_mib": 100}}})
    placer = Placer(ServiceContext(name="placer", cfg=cfg, bus=bus, host_id="p"))
    clock = [1000.0]
    placer.lease.clock = lambda: clock[0]  # (the lease its parts share, on a clock we move)
    assert await placer.lease.try_acquire()
    iid = new_iid("m")
    t = time.time()
    rec = proto.InstanceRecord(
        instance_id=iid, model="m", state=InstanceState.PENDING, created=t, updated=t, host="h1"
    )
    key = proto.instance_key("h1", iid)
    placer.watches.on_instance(key, rec, await bus.instances.create(key, proto.encode(rec)))
    subject = proto.cmd_agent("h1")

    # While valid: writes land, and commands carry the epoch.
    assert await placer.writer.write(rec, state=InstanceState.DOWNLOADING, reason="downloading")
    await placer.writer.command(subject, StopInstance(cmd_id="stop-1", instance_id=iid))
    sent = await bus.js.get_last_msg(proto.CMDS_STREAM, subject)
    assert proto.decode(sent.data, proto.AgentCommand).epoch == placer.lease.epoch >= 1

    clock[0] += 2.5  # past TTL - margin since the last renewal was sent, no renewal since
    with pytest.raises(LeaseLost):
        await placer.writer.write(placer.watches.instances[iid], state=InstanceState.STARTING)
    with pytest.raises(LeaseLost):
        await placer.writer.command(subject, StopInstance(cmd_id="stop-2", instance_id=iid))
    assert (await get_record(bus, iid)).state == InstanceState.DOWNLOADING
    assert (await bus.js.get_last_msg(proto.CMDS_STREAM, subject)).seq == sent.seq
    # a renewal that lands (nobody took over) makes it valid again, in the same epoch
    epoch = placer.lease.epoch
    assert await placer.lease.try_acquire() and placer.lease.epoch == epoch


async def test_a_stop_never_reported_done_is_sent_again_with_a_new_id(bus: Bus) -> None:
    """A STOPPING record whose agent never reported it stopped (its stop lost, or refused as
    a deposed leader's) gets its stop resent after STOP_GRACE_S, with a new id (dedup)."""
    cfg = parse({"models": {"m": {"url": "file:///nowhere/m.gguf", "memory_mib": 100}}})
    placer = Placer(ServiceContext(name="placer", cfg=cfg, bus=bus, host_id="p"))
    assert await placer.lease.try_acquire()
    iid = new_iid("m")
    t = time.time()
    rec = proto.InstanceRecord(
        instance_id=iid, model="m", state=InstanceState.STOPPING, created=t, updated=t,
        host="h1", reason="idle for 300 s",
    )  # fmt: skip
    key = proto.instance_key("h1", iid)
    placer.watches.on_instance(key, rec, await bus.instances.create(key, proto.encode(rec)))
    subject = proto.cmd_agent("h1")

    stopping = placer.watches.instances[iid]
    await placer.executor.check_stop(stopping, t + 1)  # within the grace: nothing
    with pytest.raises(Exception):  # noqa: B017 - no message on the subject yet
        await bus.js.get_last_msg(proto.CMDS_STREAM, subject)
    later = t + STOP_GRACE_S + 1
    await placer.executor.check_stop(placer.watches.instances[iid], later)
    sent = proto.decode((await bus.js.get_last_msg(proto.CMDS_STREAM, subject)).data,
                        proto.AgentCommand)  # fmt: skip
    assert isinstance(sent, StopInstance) and sent.instance_id == iid
    assert sent.cmd_id == f"stop-{iid}-{int(later)}" and sent.epoch == placer.lease.epoch
    again = await get_record(bus, iid)
    assert again.state == InstanceState.STOPPING and again.reason == "idle for 300 s (stop resent)"
    now = placer.watches.instances[iid].updated + 1  # the resend restarted the grace: not yet again
    await placer.executor.check_stop(placer.watches.instances[iid], now)
    assert (await bus.js.get_last_msg(proto.CMDS_STREAM, subject)).data == proto.encode(sent)
