"""A waiting request's place in its model's queue, in the order it will be served; who waits,
per client, for the activity report; and the admission limit following the router's view of
ready instances (services/gateway/router.py's queue part, proxy.Upstream, admission.Gate)."""

from __future__ import annotations

import asyncio

import proto
from lls.config import parse
from services.gateway.admission import BY_ADDRESS
from services.gateway.metrics import Metrics
from services.gateway.proxy import Upstream
from services.gateway.report import count_clients
from services.gateway.router import Router, queue_position


def test_a_place_counts_those_past_admission_first_then_the_fair_order():
    arrivals = [1, 2, 3, 4, 5]  # 1 holds a slot (it waits for a start); 2-5 wait for one
    gated = [2, 5, 3, 4]  # 5 is another client's: it is served second
    assert queue_position(arrivals, gated, 1) == (1, 5)
    assert queue_position(arrivals, gated, 2) == (2, 5)
    assert queue_position(arrivals, gated, 5) == (3, 5)
    assert queue_position(arrivals, gated, 4) == (5, 5)
    assert queue_position(arrivals, gated, 9) == (0, 5)  # not waiting (any more)
    # a ticket the gate still lists but the router no longer has (left) counts for nothing
    assert queue_position([1, 4, 5], [2, 5, 3, 4], 4) == (3, 3)
    assert queue_position([7], [], 7) == (1, 1)  # no gate order given: arrival order


def test_clients_are_counted_by_key_name_and_addresses_only_as_a_sum():
    tickets = [1, 2, 3, 4]
    names = {1: "team-a", 2: BY_ADDRESS, 3: "team-a"}
    assert count_clients(tickets, names) == {"team-a": 2, BY_ADDRESS: 2}


def test_the_router_queue_keeps_each_waiter_s_client_until_it_stops_waiting():
    cfg = parse({"models": {"m": {"url": "file:///m.gguf"}}})
    r = Router(None, cfg, "g1")  # type: ignore[arg-type]  # the queue never touches the bus
    a = r.enqueue("m", "team-a")
    b = r.enqueue("m")
    c = r.enqueue("m", "team-b")
    assert count_clients(r.queued["m"], r.queued_by) == {"team-a": 1, BY_ADDRESS: 1, "team-b": 1}
    assert r.position("m", c, gated=[c, b]) == (2, 3)  # a is past admission: first
    r.dequeue("m", a)
    assert r.position("m", c, gated=[c, b]) == (1, 2)
    r.dequeue("m", b)
    r.dequeue("m", c)
    assert r.queued_by == {} and r.position("m", c) == (0, 0)


def host() -> proto.HostRecord:
    return proto.HostRecord(
        host_id="h1",
        ts=0.0,
        started_at=0.0,
        runtime="process",
        gpus=[],
        cpu_count=1,
        ram_total_mib=1,
        ram_free_mib=1,
        advertise_host="127.0.0.1",
        port_range=(39000, 39999),
    )


def ready(i: int) -> proto.InstanceRecord:
    return proto.InstanceRecord(
        instance_id=f"m-{i}",
        model="m",
        state=proto.InstanceState.READY,
        created=0.0,
        updated=0.0,
        host="h1",
        endpoint=f"http://127.0.0.1:{39000 + i}",
    )


def vouch(r: Router, rec: proto.InstanceRecord) -> None:
    """The placer's instance key for `rec`: the gateway routes only to what one vouches for."""
    key = proto.InstanceKey(
        instance_id=rec.instance_id, host=rec.host or "", model=rec.model, key="k" * 43, issued=0
    )
    r.on_key(proto.instance_key(key.host, key.instance_id), key, 0)


async def test_a_replica_that_becomes_ready_takes_waiters_at_once(tmp_path):
    cfg = parse(
        {
            "models": {"m": {"url": "file:///m.gguf", "args": ["-np", "2"]}},
            "gateway": {"overlap": False},  # the plain slot count, to read the limits
        }
    )
    r = Router(None, cfg, "g1")  # type: ignore[arg-type]
    up = Upstream(cfg, r, Metrics())
    r.on_reindex = up.ready_changed
    r.on_host(proto.kv_key("h1"), host(), 1)
    vouch(r, ready(0))
    r.on_instance("m-0", ready(0), 2)
    gate = up.gate("m")
    assert gate.limit == 2  # -np 2, one instance (max_in_flight 32 by default)
    await gate.enter("a")
    await gate.enter("a")
    waiting = [asyncio.create_task(gate.enter("a", t)) for t in range(3)]
    await asyncio.sleep(0)
    assert gate.queued == 3
    vouch(r, ready(1))
    r.on_instance("m-1", ready(1), 3)  # a replica: its slots are granted as it is indexed
    assert gate.limit == 4 and gate.in_flight == 4 and gate.queued == 1
    cfg.gateway.max_in_flight = 5  # a reload raises... and lowers nothing that runs
    up.reload(cfg)
    await asyncio.sleep(0)
    assert gate.in_flight == 4 and gate.queued == 1  # still 2 slots x 2 instances
    r.on_instance_deleted(proto.kv_key("m-1"))
    assert gate.limit == 2 and gate.in_flight == 4
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await up.aclose()
