"""Reading whole KV buckets on a real NATS server."""

from __future__ import annotations

import asyncio
import dataclasses

from nats.js.api import KeyValueConfig

import proto
from lls.bus import Bus, kv_snapshot, new_id


async def _bucket(bus: Bus):  # noqa: ANN202
    return await bus.js.create_key_value(KeyValueConfig(bucket=f"t_{new_id()}", history=1))


def _lease(i: int) -> proto.LeaseRecord:
    return proto.LeaseRecord(holder=f"h{i}", ts=float(i))


async def test_snapshot_of_an_empty_bucket_is_empty(bus: Bus) -> None:
    assert await kv_snapshot(bus, await _bucket(bus), proto.LeaseRecord) == {}


async def test_snapshot_holds_the_latest_value_of_every_key_and_no_deleted_or_bad_ones(
    bus: Bus,
) -> None:
    kv = await _bucket(bus)
    for i in range(300):  # more than one fetch batch
        await kv.put(f"k{i}", proto.encode(_lease(i)))
    await kv.put("k0", proto.encode(_lease(1000)))
    await kv.delete("k1")
    await kv.put("bad", b"{not json")
    got = await kv_snapshot(bus, kv, proto.LeaseRecord)
    assert len(got) == 299 and "k1" not in got and "bad" not in got
    assert got["k0"].holder == "h1000" and got["k299"] == _lease(299)


async def test_concurrent_snapshots_during_writes_never_miss_an_existing_key(bus: Bus) -> None:
    # nats-py's kv.keys() can end early on a busy server; the agent relies on a full listing
    # to tell its own instances from strangers.
    kv = await _bucket(bus)
    for i in range(200):
        await kv.put(f"k{i}", proto.encode(_lease(i)))

    async def churn() -> None:
        for i in range(200, 400):
            await kv.put(f"k{i}", proto.encode(_lease(i)))

    writer = asyncio.create_task(churn())
    snaps = await asyncio.gather(*(kv_snapshot(bus, kv, proto.LeaseRecord) for _ in range(20)))
    await writer
    for snap in snaps:
        assert {f"k{i}" for i in range(200)} <= snap.keys()


async def test_streams_get_size_limits_and_an_operators_own_limits_stay(nats_url: str) -> None:
    from lls.bus import connect
    from lls.config import NatsLimits

    first = await connect(nats_url, "t1")
    try:
        info = await first.js.stream_info(proto.EVENTS_STREAM)
        assert info.config.max_bytes == 1 << 30 and info.config.max_msg_size == 1 << 20
        assert info.config.max_age == 7 * 86400  # the history: a week, or 1 GiB
        kv = await first.js.stream_info(f"KV_{proto.KV_INSTANCES}")
        assert kv.config.max_bytes == 64 << 20
        # An operator shrinks the event stream by hand (nats stream edit).
        await first.js.update_stream(dataclasses.replace(info.config, max_bytes=200 << 20))
    finally:
        await first.close()
    again = await connect(nats_url, "t2")  # a restart with no limits in its config
    try:
        info = await again.js.stream_info(proto.EVENTS_STREAM)
        assert info.config.max_bytes == 200 << 20  # not overwritten
    finally:
        await again.close()
    limits = NatsLimits(
        commands_max_bytes=32 << 20, bucket_max_bytes=8 << 20, events_max_age_days=2.5
    )
    configured = await connect(nats_url, "t3", limits=limits)  # a limit set in the config
    try:
        cmds = await configured.js.stream_info(proto.CMDS_STREAM)
        kv = await configured.js.stream_info(f"KV_{proto.KV_HOSTS}")
        events = await configured.js.stream_info(proto.EVENTS_STREAM)
        assert cmds.config.max_bytes == 32 << 20 and kv.config.max_bytes == 8 << 20
        assert events.config.max_bytes == 200 << 20
        assert events.config.max_age == 2.5 * 86400
    finally:
        await configured.close()


async def test_the_command_loop_runs_at_most_its_concurrency_and_hands_every_message_on(
    bus: Bus,
) -> None:
    from lls.consume import consume

    host = f"c{new_id()[:6]}"
    subject = proto.cmd_agent(host)
    for i in range(5):
        await bus.command(subject, proto.StopInstance(cmd_id=f"s{i}", instance_id=f"m-{i:08x}"))
    release, two_running, all_seen = asyncio.Event(), asyncio.Event(), asyncio.Event()
    running = peak = 0
    seen: list[str] = []

    async def handle(msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 2:
            two_running.set()
        await release.wait()
        seen.append(proto.decode(msg.data, proto.AgentCommand).cmd_id)
        running -= 1
        await msg.ack()
        if len(seen) == 5:
            all_seen.set()

    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.create_task(
        consume(bus, f"agent-{host}", subject, handle, stop, stream=proto.CMDS_STREAM,
                tasks=tasks, concurrency=2)
    )  # fmt: skip
    async with asyncio.timeout(10):
        await two_running.wait()
    await asyncio.sleep(1.5)  # room for more fetches: none may start past the bound
    assert peak == 2 and len(tasks) == 2
    release.set()
    async with asyncio.timeout(15):
        await all_seen.wait()
    assert sorted(seen) == [f"s{i}" for i in range(5)] and peak == 2
    stop.set()
    async with asyncio.timeout(5):
        await loop
    info = await bus.js.consumer_info(proto.CMDS_STREAM, f"agent-{host}")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_watch_whose_consumer_vanished_is_set_up_again_within_seconds(bus: Bus) -> None:
    """A KV watch's consumer lives on one NATS server; when that server is lost the watch
    hears nothing more. Its idle heartbeats (WATCH_HEARTBEAT_S) tell: it is set up again
    from where it was within about two of them, not nats-py's default of ten seconds."""
    from lls.bus import WATCH_HEARTBEAT_S, watch_kv

    seen: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        watch_kv(bus, bus.desired, dict, lambda k, v, r: seen.append(k), lambda k: None, stop)
    )
    try:
        await bus.desired.put("before", b"{}")
        await until_true(lambda: "before" in seen, 5)
        stream = f"KV_{proto.KV_DESIRED}"
        names = [c.name async for c in consumers(bus, stream)]
        assert names, "the watch's consumer"
        for name in names:  # as if the server holding it were gone
            await bus.js._jsm.delete_consumer(stream, name)
        await bus.desired.put("after", b"{}")
        t0 = asyncio.get_running_loop().time()
        await until_true(lambda: "after" in seen, 6.0)  # nats-py's own: 10 to 20 s
        took = asyncio.get_running_loop().time() - t0
        assert took <= 4 * WATCH_HEARTBEAT_S + 1 and seen.count("before") == 1  # not replayed
    finally:
        stop.set()
        await task


async def consumers(bus: Bus, stream: str):  # type: ignore[no-untyped-def]
    for info in await bus.js._jsm.consumers_info(stream):
        yield info


async def until_true(cond, within: float) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.05)
