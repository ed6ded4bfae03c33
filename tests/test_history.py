"""The event log as the history: the instances table rebuilt from InstanceChanged events
equals what KV holds (lls/history.py)."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
import pytest
from nats.js.api import DeliverPolicy

import proto
from lls.bus import kv_snapshot
from lls.history import HostEntry, diff, diff_hosts, rebuild, rebuild_hosts
from proto import InstanceChanged, InstanceRecord, InstanceState
from stack import Stack

S = InstanceState


def rec(iid: str, state: InstanceState, reason: str = "") -> InstanceRecord:
    return InstanceRecord(iid, "m", state, created=1.0, updated=2.0, host="h", reason=reason)


def changed(r: InstanceRecord, revision: int) -> InstanceChanged:
    return InstanceChanged(
        instance_id=r.instance_id, model=r.model, state=r.state, record=r, revision=revision
    )


def test_the_highest_revision_wins_whatever_order_the_events_come_in():
    events = [changed(rec("a", S.READY), 5), changed(rec("a", S.PENDING), 1)]
    events += [changed(rec("a", S.STARTING), 3), proto.Demand(model="m", gateway_id="g")]
    assert rebuild(events)["a"] == (5, rec("a", S.READY))
    assert rebuild(reversed(events))["a"] == (5, rec("a", S.READY))


def test_events_without_a_record_are_not_history():
    old = InstanceChanged(instance_id="a", model="m", state=S.READY)  # an older service's
    assert rebuild([old]) == {}


def test_diff_names_every_disagreement_and_accepts_purged_ended_records():
    rebuilt = rebuild(
        [
            changed(rec("same", S.READY), 4),
            changed(rec("stale", S.READY), 4),
            changed(rec("purged", S.STOPPED), 9),
            changed(rec("vanished", S.READY), 2),
        ]
    )
    kv = {
        "same": rec("same", S.READY),
        "stale": rec("stale", S.STOPPING, "idle"),
        "unlogged": rec("unlogged", S.PENDING),
    }
    problems = diff(rebuilt, kv)
    assert len(problems) == 3, problems
    assert any(p.startswith("stale: KV says stopping") for p in problems)
    assert any(p.startswith("unlogged: in KV") for p in problems)
    assert any(p.startswith("vanished: the log says ready") for p in problems)
    assert diff(rebuild([changed(rec("x", S.READY), 1)]), {"x": rec("x", S.READY)}) == []


def test_hosts_are_rebuilt_from_joined_lost_and_back_in_stream_order():
    events = [
        proto.HostJoined(host_id="a", gpus=2, runtime="docker"),
        proto.HostLost(host_id="ghost", reason="never joined: ignored"),
        proto.HostJoined(host_id="b", gpus=0, runtime="process"),
        proto.HostLost(host_id="a", reason="no heartbeat for 10 s"),
        proto.HostLost(host_id="b", reason="no heartbeat for 10 s"),
        proto.HostBack(host_id="b", reason="heard again"),
    ]
    table = rebuild_hosts(events)
    assert table == {
        "a": HostEntry(2, "docker", lost=True, reason="no heartbeat for 10 s"),
        "b": HostEntry(0, "process", lost=False, reason="heard again"),
    }
    restarted = rebuild_hosts([*events, proto.HostJoined(host_id="a", gpus=1, runtime="docker")])
    assert restarted["a"] == HostEntry(1, "docker")  # an agent that starts again has joined
    kv = {
        "a": proto.HostRecord("a", 1.0, 1.0, "docker", [], 4, 1, 1),
        "c": proto.HostRecord("c", 1.0, 1.0, "process", [], 4, 1, 1),
    }
    assert diff_hosts(table, kv, lost=set()) == [
        "a: KV says 0 GPU(s), docker; the log 2, docker",
        "a: the log says lost",
        "c: in KV but it never joined in the log",
    ]


async def all_events(bus) -> list[proto.Event]:  # noqa: ANN001
    """Every event in the stream, oldest first."""
    got: list[proto.Event] = []
    done = asyncio.Event()

    async def on_msg(msg) -> None:  # noqa: ANN001
        try:
            got.append(proto.decode(msg.data, proto.Event))
        except msgspec.ValidationError:
            pass
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await bus.js.subscribe(
        proto.EVENTS_SUBJECTS, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await sub.unsubscribe()
    return got


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {
        "a": {"url": f"file://{tiny_gguf(21)}", "ctx_size": 512},
        "b": {"url": f"file://{tiny_gguf(22)}", "ctx_size": 512, "idle_timeout": 1},
    }
    s = Stack(tmp_path, nats_url, models)
    s.start()
    yield s
    s.stop()


async def test_the_state_rebuilt_from_the_event_log_equals_kv(stack: Stack, bus):
    async with httpx.AsyncClient(timeout=60) as c:
        for model in ("a", "b"):
            body = {"model": model, "prompt": "hi", "max_tokens": 2}
            r = await c.post(f"{stack.base}/v1/completions", json=body)
            assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30  # b stops once idle: placer and agent both write
    while time.monotonic() < deadline:
        kv = await kv_snapshot(bus, bus.instances, InstanceRecord)
        states = {r.model: r.state for r in kv.values()}
        if states.get("b") == S.STOPPED and states.get("a") == S.READY:
            break
        await asyncio.sleep(0.3)
    assert states == {"a": S.READY, "b": S.STOPPED}, states
    await asyncio.sleep(0.5)  # the last event follows its write
    kv_by_id = {r.instance_id: r for r in kv.values()}
    events = await all_events(bus)
    rebuilt = rebuild(events)
    assert set(rebuilt) == set(kv_by_id)
    assert diff(rebuilt, kv_by_id) == []
    hosts = {r.host_id: r for r in (await kv_snapshot(bus, bus.hosts, proto.HostRecord)).values()}
    assert set(rebuild_hosts(events)) == set(hosts) == {"h1"}
    assert diff_hosts(rebuild_hosts(events), hosts, lost=set()) == []
