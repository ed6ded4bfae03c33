"""Following the event stream on a real NATS server: each event once, in order, whatever the
subscription underneath did (lls.event_feed)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import proto
from lab.observe import until
from lls.bus import Bus
from lls.event_feed import EventFeed


async def _emit(bus: Bus, n: int) -> None:
    for i in range(n):
        await bus.emit(proto.Demand(model=f"m{i}", gateway_id="g", waiting=1))


async def _last(bus: Bus) -> int:
    return (await bus.js.stream_info(proto.EVENTS_STREAM)).state.last_seq


async def _until(cond, within: float = 10) -> None:  # noqa: ANN001
    async def check() -> bool:
        return bool(cond())

    await until(check, within, "the events delivered")


def _msg(seq: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(sequence=SimpleNamespace(stream=seq)))


async def test_a_hole_in_the_deliveries_resubscribes_and_every_event_arrives_once(
    bus: Bus,
) -> None:
    await _emit(bus, 3)
    seqs: list[int] = []

    async def on_event(msg) -> None:  # noqa: ANN001
        seqs.append(msg.metadata.sequence.stream)

    feed = EventFeed(bus, on_event, after=1)
    await feed.start()
    try:
        await _until(lambda: seqs == [2, 3])
        # A delivery that skips sequence 4 (what a node failure once handed the ordered
        # consumer): not passed on; the feed resubscribes from 4.
        await feed._on_msg(_msg(6))
        assert seqs == [2, 3] and feed.heals == 1
        await _emit(bus, 4)
        await _until(lambda: len(seqs) >= 6)
        await asyncio.sleep(0.3)  # a repeat would show by now
        assert seqs == [2, 3, 4, 5, 6, 7] and list(feed.holes) == []
    finally:
        await feed.stop()


async def test_a_reconnect_resubscribes_after_the_last_event_without_repeats(bus: Bus) -> None:
    seqs: list[int] = []

    async def on_event(msg) -> None:  # noqa: ANN001
        seqs.append(msg.metadata.sequence.stream)

    feed = EventFeed(bus, on_event, after=await _last(bus))
    await feed.start()
    try:
        await _emit(bus, 3)
        await _until(lambda: len(seqs) == 3)
        bus.reconnects += 1  # as Bus does when the server answers again
        await _until(lambda: feed.heals == 1, within=5)
        await _emit(bus, 2)
        await _until(lambda: len(seqs) >= 5)
        await asyncio.sleep(0.3)
        assert seqs == list(range(seqs[0], seqs[0] + 5))
    finally:
        await feed.stop()


async def test_a_deleted_event_is_passed_over_after_fresh_subscriptions_show_it_missing(
    bus: Bus,
) -> None:
    await _emit(bus, 5)
    await bus.js.delete_msg(proto.EVENTS_STREAM, 3)
    seqs: list[int] = []

    async def on_event(msg) -> None:  # noqa: ANN001
        seqs.append(msg.metadata.sequence.stream)

    feed = EventFeed(bus, on_event, after=0)
    await feed.start()
    try:
        # Deliveries go 2, 4: the feed resubscribes from 3 a few times, sees the same, and
        # then believes the stream.
        await _until(lambda: seqs == [1, 2, 4, 5])
        assert list(feed.holes) == [(3, 3)] and feed.heals == 3
    finally:
        await feed.stop()
