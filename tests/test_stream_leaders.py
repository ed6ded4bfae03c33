"""Raft leaders follow the leading placer (services/placer/stream_leaders.py): the pure
choice, then a real three-server cluster where the placer moves them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from test_nats_cluster import connect_when_ready, start_three_nodes

import proto
from services.placer.stream_leaders import LEASE_STREAM, Seat, lease_home, moves

ALL = frozenset({"n1", "n2", "n3"})


def seat(stream: str, leader: str, current: frozenset[str] = ALL, consumer: str = "") -> Seat:
    return Seat(stream, consumer, leader, current)


def standby(node: str, ts: float) -> proto.LeaseRecord:
    return proto.LeaseRecord(holder=f"placer-{node}", ts=ts, node=node)


def test_every_leader_but_the_lease_bucket_s_moves_to_the_placer_s_server() -> None:
    seats = [
        seat("EVENTS", "n3"),
        seat("KV_x", "n1"),  # already there
        seat("CMDS", "n2", consumer="agent-h3"),
        seat(LEASE_STREAM, "n1"),
    ]
    got = {(s.name, to) for s, to in moves(seats, "n1", "n2")}
    assert got == {("EVENTS", "n1"), ("CMDS/agent-h3", "n1"), (LEASE_STREAM, "n2")}


def test_a_leader_moves_only_to_a_current_replica_and_only_when_there_is_one() -> None:
    behind = frozenset({"n2", "n3"})  # n1 has not caught up
    assert moves([seat("EVENTS", "n3", behind)], "n1", "") == []
    assert moves([seat("EVENTS", "")], "n1", "") == []  # mid-election: nothing to step down


def test_with_no_standby_known_the_lease_bucket_s_leader_stays_where_it_is() -> None:
    assert moves([seat(LEASE_STREAM, "n1")], "n1", "") == []


def test_the_lease_goes_to_the_freshest_standby_on_another_server() -> None:
    now = 1000.0
    standbys = [standby("n2", now - 5), standby("n3", now - 1), standby("n1", now)]
    assert lease_home(standbys, "n1", now) == "n3"  # n1 is the leader's own
    assert lease_home([standby("n2", now - 60)], "n1", now) == ""  # stale
    assert lease_home([], "n1", now) == ""


@pytest.mark.nats
async def test_the_leading_placer_pulls_the_leaders_to_its_server_and_the_lease_to_a_standby(
    tmp_path: Path,
) -> None:
    from services.placer.lease import Lease
    from services.placer.stream_leaders import StreamLeaders

    nodes, url, folder = start_three_nodes(tmp_path)
    urls = url.split(",")
    buses = []
    try:
        # The leader attached to n1, a standby to n3 (urls are tried in order).
        lead = await connect_when_ready(urls[0], folder / "placer.json")
        buses.append(lead)
        other = await connect_when_ready(urls[2], folder / "placer.json")
        buses.append(other)
        assert (lead.server_name(), other.server_name()) == ("n1", "n3")

        leader_lease, standby_lease = (
            Lease(lead.leases, "placer-a"),
            Lease(other.leases, "placer-b"),
        )
        assert await leader_lease.try_acquire()
        await StreamLeaders(other, standby_lease, "h3").announce()
        leaders = StreamLeaders(lead, leader_lease, "h1")

        async def settled() -> dict[str, str]:
            return {s.name: s.leader for s in await leaders.seats()}

        deadline = time.monotonic() + 30
        while True:
            await leaders.seat()
            await asyncio.sleep(0.5)
            now = await settled()
            want = {name: ("n3" if name == LEASE_STREAM else "n1") for name in now}
            if now == want or time.monotonic() > deadline:
                break
        assert now == want, now
        assert proto.EVENTS_STREAM in now and f"KV_{proto.KV_INSTANCES}" in now
        # A write right after a move lands (the publish rides out the hand-over).
        await lead.put(lead.instances, "h1.probe", proto.LeaseRecord(holder="x", ts=0))
    finally:
        for b in buses:
            await b.close()
        for n in nodes:
            n.kill()
