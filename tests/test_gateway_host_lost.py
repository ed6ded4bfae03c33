"""The gateway takes a lost host's instances out of its view when the placer's host.lost event
comes, before the watch brings their LOST records (services/gateway/lost_hosts.py): the watch may
wait for a NATS election when the lost host ran a NATS server, and requests sent meanwhile
would wait on a host that never answers."""

from __future__ import annotations

import asyncio
import time

import msgspec
from test_instance_security import host_record
from test_instance_security import ready as ready_record

import proto
from lls.bus import Bus
from lls.config import parse
from services.gateway import lost_hosts
from services.gateway.router import Router

CFG = parse({"models": {"m": {"url": "file:///m.gguf"}}})


def host(hid: str, port: int = 39000) -> proto.HostRecord:
    return host_record(host_id=hid, advertise_host="127.0.0.1", port_range=(port, port + 99))


def ready(iid: str, on: str, port: int) -> proto.InstanceRecord:
    return ready_record(f"http://127.0.0.1:{port}", on, iid, 1.0)


def key_of(rec: proto.InstanceRecord) -> proto.InstanceKey:
    return proto.InstanceKey(
        instance_id=rec.instance_id, host=rec.host or "", model=rec.model, key="k" * 43, issued=0
    )


def serving_one(rec: proto.InstanceRecord) -> Router:
    """A gateway's router (no bus: events come by method here) with `rec` ready on h1."""
    r = Router(None, CFG, "g1")  # type: ignore[arg-type]
    r.on_host("h1", host("h1"), 1)
    r.on_key("", key_of(rec), 1)
    r.on_instance("", rec, 2)
    assert serving(r) == {rec.instance_id}
    return r


def lose(r: Router, host_id: str) -> None:
    """The placer's host.lost for `host_id`, as the gateway's subscription hands it on."""
    r.lost_hosts.host_lost(host_id, "no heartbeat for 4 s", r.instances.values())


def serving(r: Router) -> set[str]:
    return {x.instance_id for x in r.ready.get("m", [])}


async def test_host_lost_takes_its_instances_out_and_ends_their_requests_at_once() -> None:
    r = Router(None, CFG, "g1")  # type: ignore[arg-type]  # the events come by method here
    a, b = ready("m-aaaaaaaa", "h1", 39000), ready("m-bbbbbbbb", "h2", 39100)
    for h, port in (("h1", 39000), ("h2", 39100)):
        r.on_host(h, host(h, port), 1)
    for rec in (a, b):
        r.on_key("", key_of(rec), 1)
        r.on_instance("", rec, 2)
    assert serving(r) == {a.instance_id, b.instance_id}

    async def in_flight() -> None:
        r.begin(a)
        await asyncio.sleep(30)  # a request to a host that never answers

    task = asyncio.create_task(in_flight())
    await asyncio.sleep(0)
    lose(r, "h1")
    assert serving(r) == {b.instance_id}
    assert r.instances[a.instance_id].state == proto.InstanceState.LOST
    await asyncio.sleep(0)
    assert task.cancelled()
    assert "lost with its host h1 (no heartbeat for 4 s)" in (r.lost_reason(task) or "")

    # The watch delivering the record the loss overrode (a watch set up again) changes nothing
    r.on_instance("", a, 2)
    assert serving(r) == {b.instance_id}
    # The host back: its instance is what its record says again
    r.lost_hosts.host_back("h1")
    assert serving(r) == {a.instance_id, b.instance_id} and not r.lost_hosts.marks


async def test_a_request_its_lost_host_never_answered_is_sent_again_elsewhere(bus: Bus) -> None:
    """In flight on a host that is lost before any answer came (a cut host sends nothing):
    sent once more, to the instance placed anew, and served; the lost one is never waited on
    past the event."""
    from services.gateway.metrics import Metrics
    from services.gateway.proxy import Upstream

    heard: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(65536))  # takes the request, never answers
        await asyncio.sleep(60)

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    cut = await asyncio.start_server(silent, "127.0.0.1", 0)
    other = await asyncio.start_server(answers, "127.0.0.1", 0)
    p1, p2 = (s.sockets[0].getsockname()[1] for s in (cut, other))
    r = Router(bus, CFG, "g1")  # (its demand goes out on a real bus; the events come here)
    up = Upstream(CFG, r, Metrics())
    r.on_reindex = up.ready_changed
    a, b = ready("m-aaaaaaaa", "h1", p1), ready("m-bbbbbbbb", "h2", p2)
    r.on_host("h1", host("h1", p1), 1)
    r.on_host("h2", host("h2", p2), 1)
    r.on_key("", key_of(a), 1)
    r.on_instance("", a, 2)
    try:
        sending = asyncio.create_task(up.open("m", "/v1/completions", b"{}", {}))
        await until(lambda: bool(heard))  # it reached the host that will be lost
        lose(r, "h1")
        await asyncio.sleep(0.05)
        assert not sending.done()  # waiting for another instance, not refused
        r.on_key("", key_of(b), 3)  # the placer's new instance elsewhere
        r.on_instance("", b, 4)
        resp, release = await asyncio.wait_for(sending, 5)
        assert (resp.status_code, await resp.aread()) == (200, b"ok")
        release()
        assert r.in_flight == {a.instance_id: 0, b.instance_id: 0} and not r.lost
    finally:
        await up.aclose()
        for server in (cut, other):
            server.close()


async def test_a_newer_record_of_an_instance_overrides_the_loss() -> None:
    a = ready("m-aaaaaaaa", "h1", 39000)
    r = serving_one(a)
    lose(r, "h1")
    assert not serving(r)
    # The placer's own LOST record comes: the mark has done its work
    lost = msgspec.structs.replace(a, state=proto.InstanceState.LOST, updated=2.0, reason="x")
    r.on_instance("", lost, 3)
    assert not r.lost_hosts.marks and r.instances[a.instance_id].reason == "x"
    # Adopted again later (a new revision): served, the loss long forgotten
    back = msgspec.structs.replace(a, updated=3.0)
    r.on_instance("", back, 4)
    assert serving(r) == {a.instance_id}


async def test_a_loss_nobody_confirms_lapses(monkeypatch) -> None:
    """No LOST record and no host.back heard (a missed event): after LOST_MARK_S the record
    is trusted again, so a missed message never takes an instance out for good."""
    monkeypatch.setattr(lost_hosts, "LOST_MARK_S", 0.05)
    a = ready("m-aaaaaaaa", "h1", 39000)
    r = serving_one(a)
    lose(r, "h1")
    assert not serving(r)
    await asyncio.sleep(0.1)
    assert serving(r) == {a.instance_id} and not r.lost_hosts.marks


async def test_the_gateway_hears_host_lost_on_the_bus_before_any_record_changes(
    bus: Bus,
) -> None:
    """Over a real NATS server: the KV records still say READY, the event alone takes the
    instance out; host.back brings it back."""
    a = ready("m-aaaaaaaa", "h1", 39000)
    await bus.hosts.put("h1", proto.encode(host("h1")))
    await bus.instance_keys.put(proto.instance_key("h1", a.instance_id), proto.encode(key_of(a)))
    await bus.instances.put(proto.instance_key("h1", a.instance_id), proto.encode(a))
    r = Router(bus, CFG, "g1")
    stop = asyncio.Event()
    run = asyncio.create_task(r.run(stop))
    try:
        await until(lambda: serving(r) == {a.instance_id})
        await bus.emit(proto.HostLost(host_id="h1", reason="no heartbeat for 4 s"))
        await until(lambda: not serving(r))
        assert r.instances[a.instance_id].state == proto.InstanceState.LOST
        entry = await bus.instances.get(proto.instance_key("h1", a.instance_id))
        assert proto.decode(entry.value, proto.InstanceRecord).state == proto.InstanceState.READY
        await bus.emit(proto.HostBack(host_id="h1", reason="heard again"))
        await until(lambda: serving(r) == {a.instance_id})
    finally:
        stop.set()
        await run


async def until(cond, within: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.02)
