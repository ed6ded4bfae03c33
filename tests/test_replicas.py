"""Replicas on the real stack (NATS, placer, agent, llama-server, gateway): a busy model gets
a second instance where there is room, and loses it again once idle; a model with
replicas.min 2 starts two on its first request. Two simulated GPUs, room for one on each."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec

import proto
from lls.bus import kv_snapshot
from stack import Stack

ONE_EACH = [{"name": "sim", "memory_mib": 2000}, {"name": "sim", "memory_mib": 2000}]


def start(tmp_path, nats_url, tiny_gguf, replicas: dict) -> Stack:  # noqa: ANN001
    models = {
        "busy": {
            "url": f"file://{tiny_gguf(40)}",
            "memory_mib": 1200,
            "ctx_size": 1024,
            "args": ["-t", "1", "-np", "1"],  # one slot: a third request waits at the gateway
            "replicas": replicas,
        }
    }
    s = Stack(tmp_path, nats_url, models, agent__gpus=ONE_EACH, placer={"failure_backoff": 10})
    s.start()
    return s


async def live(bus) -> list[proto.InstanceRecord]:  # noqa: ANN001
    recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
    return [r for r in recs.values() if r.state in proto.LIVE_STATES]


async def events(bus, into: list[proto.ReplicaChanged]):  # noqa: ANN001, ANN201
    async def on(msg) -> None:  # type: ignore[no-untyped-def]
        try:
            into.append(proto.decode(msg.data, proto.ReplicaChanged))
        except msgspec.ValidationError:
            pass

    return await bus.nc.subscribe(proto.evt("replica.*"), cb=on)


async def test_a_saturated_model_gets_a_replica_and_loses_it_when_idle(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, bus
):
    s = start(
        tmp_path, nats_url, tiny_gguf, {"min": 1, "max": 2, "target_wait": 0.5, "idle_after": 3}
    )
    seen: list[proto.ReplicaChanged] = []
    sub = await events(bus, seen)
    most = 0
    try:
        body = {"model": "busy", "prompt": "hello", "max_tokens": 300, "ignore_eos": True}
        load_until = time.monotonic() + 90
        statuses: list[int] = []

        async def client(c: httpx.AsyncClient) -> None:
            while time.monotonic() < load_until:
                r = await c.post(f"{s.base}/v1/completions", json=body)
                statuses.append(r.status_code)

        async with httpx.AsyncClient(timeout=120) as c:
            clients = [asyncio.create_task(client(c)) for _ in range(4)]
            ready: list[proto.InstanceRecord] = []
            while time.monotonic() < load_until:  # until a second instance serves
                recs = await live(bus)
                most = max(most, len(recs))
                ready = [r for r in recs if r.state == proto.InstanceState.READY]
                if len(ready) == 2:
                    break
                await asyncio.sleep(0.2)
            load_until = time.monotonic()  # the clients finish their current request
            await asyncio.gather(*clients)
        assert len(ready) == 2, s.logs()[-4000:]
        assert {tuple(r.gpus) for r in ready} == {(0,), (1,)}, "the replica goes to the other GPU"
        assert statuses and set(statuses) == {200}, statuses
        added = [e for e in seen if e.stage == "added"]
        assert added and added[0].model == "busy" and added[0].replicas == 2, seen
        assert "waited" in added[0].reason and "busy" in added[0].reason, added[0].reason

        # idle now: the replica above min goes within idle_after (3 s) plus a generous margin
        deadline = time.monotonic() + 30
        recs = await live(bus)
        while time.monotonic() < deadline and len(recs) > 1:
            await asyncio.sleep(0.2)
            recs = await live(bus)
            most = max(most, len(recs))
        assert len(recs) == 1 and recs[0].state == proto.InstanceState.READY, recs
        removed = [e for e in seen if e.stage == "removed"]
        assert removed and removed[0].replicas == 1, seen
        assert "replicas.idle_after 3 s" in removed[0].reason
        assert most <= 2, most
        # and the one left serves
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{s.base}/v1/completions", json={**body, "max_tokens": 4})
        assert r.status_code == 200, r.text
    finally:
        await sub.unsubscribe()
        s.stop()


async def test_a_model_with_min_two_starts_two_on_first_request(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, bus
):
    s = start(tmp_path, nats_url, tiny_gguf, {"min": 2, "max": 2, "idle_after": 3})
    try:
        body = {"model": "busy", "prompt": "hello", "max_tokens": 4}
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{s.base}/v1/completions", json=body)
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 40
        ready: list[proto.InstanceRecord] = []
        while time.monotonic() < deadline:
            recs = await live(bus)
            assert len(recs) <= 2, recs
            ready = [r for r in recs if r.state == proto.InstanceState.READY]
            if len(ready) == 2:
                break
            await asyncio.sleep(0.2)
        assert len(ready) == 2, s.logs()[-4000:]
        # min 2: idle_after (3 s) passes and neither is stopped
        await asyncio.sleep(5)
        recs = await live(bus)
        assert len([r for r in recs if r.state == proto.InstanceState.READY]) == 2, recs
    finally:
        s.stop()
