"""Throughput that holds while instances change, on the real stack (NATS, placer, agent,
llama-server, gateway): the stall invariant (services/gateway/stall.py: no request waits
while a ready, non-draining instance of its model has a free slot) holds through a storm
with swaps, a replica coming up, a reload that replaces an instance, and a drain that is
cancelled; a model with requests waiting is never stopped as idle; a model with nothing
queued yields at once to a waiting one (issue 18)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import httpx
import msgspec
from test_reload import lls_reload, write_models
from test_swap import chat, hold_stream, post

import proto
from lls.bus import kv_snapshot
from stack import Stack

ROOM_FOR_TWO = [{"name": "sim", "memory_mib": 3072}]
ONE_EACH = [{"name": "sim", "memory_mib": 2000}, {"name": "sim", "memory_mib": 2000}]
STALL = re.compile(r'^lls_stall_(violations|seconds)_total\{model="([^"]*)"\} (\S+)$', re.M)


def stalls(base: str) -> dict[str, float]:
    """Violations per model from the gateway's /metrics (absent: none yet)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert "lls_stall_violations" in text  # the metric is exported
    return {m: float(v) for kind, m, v in STALL.findall(text) if kind == "violations"}


def stack(tmp_path, nats_url, models: dict, gpus=ROOM_FOR_TWO, **placer) -> Stack:  # noqa: ANN001
    s = Stack(
        tmp_path,
        nats_url,
        models,
        agent__gpus=gpus,
        placer={"failure_backoff": 10, **placer},
    )
    s.start()
    return s


def defaults(tiny_gguf, seeds: range, **extra: object) -> dict:  # noqa: ANN001
    """Models as a user configures them: no args (llama-server's own slots), a small context."""
    return {
        f"m{i}": {
            "url": f"file://{tiny_gguf(60 + i)}",
            "memory_mib": 1200,
            "ctx_size": 512,
            **extra,
        }
        for i in seeds
    }


async def loads(bus, model: str | None = None) -> int:  # noqa: ANN001
    recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
    return sum(1 for r in recs.values() if r.ready_at and model in (None, r.model))


async def test_no_stall_through_storms_with_swaps_and_a_reload(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, bus
):
    models = defaults(tiny_gguf, range(4))
    s = stack(tmp_path, nats_url, models)
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            for storm in range(3):
                if storm == 2:  # a reload that changes every limit the gateway admits by
                    s.patch_config(gateway={"max_in_flight": 3, "overlap": False})
                    assert (await asyncio.to_thread(lls_reload, s)).returncode == 0
                results = await asyncio.gather(
                    *(post(c, s.base, chat(f"m{i % 4}")) for i in range(120))
                )
                codes = [code for code, _, _ in results]
                assert codes.count(200) == 120, {k: codes.count(k) for k in set(codes)}
        assert await loads(bus) >= 4  # two fit at a time: every storm swapped
        assert sum(stalls(s.base).values()) == 0, stalls(s.base)
    finally:
        s.stop()


async def test_no_stall_while_a_replica_comes_up(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, bus
):
    models = defaults(
        tiny_gguf,
        range(1),
        args=["-np", "1"],  # one slot: a queue forms at the gateway and asks for a replica
        replicas={"min": 1, "max": 2, "target_wait": 0.3, "idle_after": 30},
    )
    s = stack(tmp_path, nats_url, models, gpus=ONE_EACH)
    try:
        # long answers (a few tenths of a second each): a replica whose slot were not
        # granted when it came up would sit idle until one of them ended, and that shows
        body = {"model": "m0", "prompt": "hi", "max_tokens": 600, "ignore_eos": True}
        until = time.monotonic() + 60
        codes: list[int] = []

        async def client(c: httpx.AsyncClient) -> None:
            while time.monotonic() < until:
                codes.append((await c.post(f"{s.base}/v1/completions", json=body)).status_code)

        async with httpx.AsyncClient(timeout=60) as c:
            clients = [asyncio.create_task(client(c)) for _ in range(6)]
            for _ in range(300):  # at most 60 s
                if await loads(bus, "m0") >= 2:
                    break
                await asyncio.sleep(0.2)
            assert await loads(bus, "m0") == 2, s.logs()[-3000:]
            until = time.monotonic() + 3  # both serve a while
            await asyncio.gather(*clients)
        assert codes and set(codes) == {200}, codes
        assert stalls(s.base).get("m0", 0) == 0
    finally:
        s.stop()


async def test_a_reload_that_replaces_an_instance_leaves_no_request_waiting(
    tmp_path, nats_url, llama_server_bin, tiny_gguf
):
    """The replacement is ready while the old one still finishes its requests (draining): its
    slots are free for the waiters at once, not once the old one's requests are done."""
    models = defaults(tiny_gguf, range(1), args=["-np", "1"])
    s = stack(tmp_path, nats_url, models)
    try:
        body = chat("m0", max_tokens=48)
        until = time.monotonic() + 8
        codes: list[int] = []

        async def client(c: httpx.AsyncClient) -> None:
            while time.monotonic() < until:
                code, _, _ = await post(c, s.base, body)
                codes.append(code)

        async with httpx.AsyncClient(timeout=60) as c:
            clients = [asyncio.create_task(client(c)) for _ in range(4)]
            await asyncio.sleep(2)
            write_models(s, {"m0": {**models["m0"], "args": ["-np", "2"]}})  # a new launch
            assert (await asyncio.to_thread(lls_reload, s)).returncode == 0
            await asyncio.gather(*clients)
        assert codes and set(codes) == {200}, {k: codes.count(k) for k in set(codes)}
        assert "replaced" in s.logs() or "reload" in s.logs()
        assert stalls(s.base).get("m0", 0) == 0
    finally:
        s.stop()


async def test_a_cancelled_drain_lets_the_model_serve_again_at_once(
    tmp_path, nats_url, llama_server_bin, tiny_gguf
):
    """m0 holds the only place with one stream (of its two slots) and nothing queued, so it
    yields to m1 at once; m1's client leaves before m0 has drained: the drain is cancelled,
    and m0's request that waited meanwhile is served on its free slot right away."""
    shift = {"args": ["-np", "2", "--context-shift"]}
    models = defaults(tiny_gguf, range(2), **shift)
    s = stack(tmp_path, nats_url, models, gpus=[{"name": "sim", "memory_mib": 2000}], min_turn=30)
    streaming, done = asyncio.Event(), asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            running = asyncio.create_task(hold_stream(c, s.base, "m0", streaming, done))
            await asyncio.wait_for(streaming.wait(), 30)
            leaving = asyncio.create_task(c.post(f"{s.base}/v1/chat/completions", json=chat("m1")))
            for _ in range(100):  # m0 is asked to yield (nothing queued for it)
                if "m0-" in s.logs() and "yielding to m1" in s.logs():
                    break
                await asyncio.sleep(0.1)
            assert "yielding to m1" in s.logs(), s.logs()[-3000:]
            await asyncio.sleep(1)  # m1's request has waited long enough to be counted
            later = asyncio.create_task(post(c, s.base, chat("m0")))  # queues behind the drain
            await asyncio.sleep(1)
            leaving.cancel()  # m1's client goes: nothing waits for m1 any more
            code, _, _ = await asyncio.wait_for(later, 30)
            assert code == 200
            done.set()
            assert await running == 200
        assert "swap cancelled: m1 no longer waits" in s.logs(), s.logs()[-3000:]
        assert stalls(s.base).get("m0", 0) == 0
    finally:
        s.stop()


async def test_a_model_with_requests_waiting_is_never_stopped_as_idle(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, bus
):
    """Ollama's keep_alive 0 means stop after the answer, not with a queue behind it: ten
    requests at once on one slot are all served by the one instance, then it stops."""
    models = defaults(tiny_gguf, range(1), args=["-np", "1"])
    s = stack(tmp_path, nats_url, models)
    try:
        ask = {"model": "m0", "prompt": "hi", "stream": False, "keep_alive": 0}
        ask["options"] = {"num_predict": 32}
        async with httpx.AsyncClient(timeout=60) as c:
            answers = await asyncio.gather(
                *(c.post(f"{s.base}/api/generate", json=ask) for _ in range(10))
            )
        assert [a.status_code for a in answers] == [200] * 10, answers[0].text
        assert await loads(bus, "m0") == 1, s.logs()[-3000:]
        for _ in range(50):  # at most 10 s
            if "keep_alive 0 s" in s.logs():
                break
            await asyncio.sleep(0.2)
        assert "keep_alive 0 s" in s.logs()  # and then it stopped, once nothing waited
    finally:
        s.stop()


async def test_a_model_with_nothing_queued_yields_at_once_to_a_waiting_one(
    tmp_path, nats_url, llama_server_bin, tiny_gguf
):
    """min_turn 30 s, and m0 busy with a 3-second stream but nothing queued: m1 is served
    once that stream ends, not after m0's min_turn."""
    models = defaults(tiny_gguf, range(2), args=["-np", "1", "--context-shift"])
    s = stack(tmp_path, nats_url, models, gpus=[{"name": "sim", "memory_mib": 2000}], min_turn=30)
    streaming, done = asyncio.Event(), asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            running = asyncio.create_task(hold_stream(c, s.base, "m0", streaming, done))
            await asyncio.wait_for(streaming.wait(), 30)
            waiting = asyncio.create_task(post(c, s.base, chat("m1")))
            await asyncio.sleep(3)
            done.set()  # the stream ends
            assert await running == 200
            code, body, waited = await asyncio.wait_for(waiting, 30)
        assert code == 200, body
        assert waited < 3 + 8, waited  # the stream's 3 s, then a swap: far from 30 s
    finally:
        s.stop()


async def test_requests_in_flight_on_a_lost_host_are_answered_not_left_hanging(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, bus
):
    """A host cut off sends no TCP reset: a request in flight there would wait for an answer
    that never comes, past any client's deadline. Once its instance is LOST, the gateway
    ends a stream under way at once, and sends a request whose answer had not begun again,
    to a new instance: it is served, not refused."""
    models = defaults(tiny_gguf, range(1), args=["--context-shift"])
    s = stack(tmp_path, nats_url, models)

    async def lose_m0() -> str:
        recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
        [(key, rec)] = [
            (k, r)
            for k, r in recs.items()
            if r.model == "m0" and r.state == proto.InstanceState.READY
        ]
        lost = msgspec.structs.replace(rec, state=proto.InstanceState.LOST, reason="test")
        await bus.instances.put(key, proto.encode(lost))  # as the placer writes it
        return rec.instance_id

    try:
        endless = {"model": "m0", "prompt": "a", "max_tokens": 10**6, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as c:
            # A non-streamed answer takes ~3 s here (measured): lost before it begins
            t0 = time.monotonic()
            r = await c.post(f"{s.base}/v1/completions", json={**endless, "max_tokens": 256})
            assert r.status_code == 200, r.text
            n = max(256, int(256 / (time.monotonic() - t0) * 3))
            body = {**endless, "max_tokens": n}
            running = asyncio.create_task(c.post(f"{s.base}/v1/completions", json=body))
            await asyncio.sleep(0.5)
            assert not running.done()
            first = await lose_m0()
            r = await asyncio.wait_for(running, 30)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == n
            recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
            assert any(x.model == "m0" and x.instance_id != first for x in recs.values())

            # A stream under way is cut at once (its head, 200, went long ago)
            async with c.stream(
                "POST", f"{s.base}/v1/completions", json={**endless, "stream": True}
            ) as resp:
                chunks = resp.aiter_raw()
                assert resp.status_code == 200 and await anext(chunks)
                await lose_m0()
                t0 = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    async for _ in chunks:
                        assert time.monotonic() - t0 < 5, "the stream went on"
        assert time.monotonic() - t0 < 5
    finally:
        s.stop()


def chat_body(max_tokens: int) -> dict:
    return {"model": "m0", "prompt": "a", "max_tokens": max_tokens}
