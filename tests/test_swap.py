"""Taking turns on the real stack: more models wanted than fit are served in turns, not
refused (NATS, placer, agent, llama-server, gateway; one simulated GPU with room for two)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import proto
from lls.bus import kv_snapshot
from stack import Stack

SLOT_MIB = 1200
ROOM_FOR_TWO = [{"name": "sim", "memory_mib": 3072}]


def chat(model: str, max_tokens: int = 8, **kw: object) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **kw,
    }


def start(tmp_path, nats_url, tiny_gguf, models: dict, gpus=ROOM_FOR_TWO, **placer) -> Stack:  # noqa: ANN001
    cfg = {
        name: {
            "url": f"file://{tiny_gguf(seed)}",
            "memory_mib": SLOT_MIB,
            "ctx_size": 1024,
            "args": ["-np", "4"],
            **extra,
        }
        for name, (seed, extra) in models.items()
    }
    s = Stack(
        tmp_path,
        nats_url,
        cfg,
        agent__gpus=gpus,
        placer={"failure_backoff": 10, "min_turn": 1, "drain_timeout": 30, **placer},
    )
    s.start()
    return s


async def post(c: httpx.AsyncClient, base: str, body: dict) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    r = await c.post(f"{base}/v1/chat/completions", json=body)
    return r.status_code, r.json(), time.monotonic() - t0


async def hold_stream(
    c: httpx.AsyncClient, base: str, model: str, streaming: asyncio.Event, done: asyncio.Event
) -> int:
    """A streamed answer read until `done` (a model with --context-shift generates for as
    long as it is read); `streaming` is set once it flows. Its status."""
    body = chat(model, max_tokens=1_000_000, stream=True)
    async with c.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        chunks = 0
        async for _ in r.aiter_raw():
            chunks += 1
            if chunks >= 10:
                streaming.set()
            if done.is_set():
                break
        return r.status_code


@pytest.fixture
def four_models(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    s = start(tmp_path, nats_url, tiny_gguf, {f"m{i}": (10 + i, {}) for i in range(4)})
    yield s
    s.stop()


async def test_a_storm_over_more_models_than_fit_is_served_in_turns(four_models):
    base = four_models.base
    async with httpx.AsyncClient(timeout=60) as c:
        results = await asyncio.gather(*(post(c, base, chat(f"m{i % 4}")) for i in range(120)))
        statuses = [s for s, _, _ in results]
        assert statuses.count(200) == 120, {s: statuses.count(s) for s in set(statuses)}
        metrics = (await c.get(f"{base}/metrics")).text
    assert 'lls_queue_wait_seconds_count{model="m3"}' in metrics
    # two fit at a time, so at least two of the four models were swapped in later
    loads = four_models.logs().count(": ready")
    assert loads >= 4, four_models.logs()[-3000:]


async def test_a_flooded_model_cannot_starve_the_others(four_models):
    base = four_models.base
    stop = time.monotonic() + 12
    flood_ok = 0

    async def flood(c: httpx.AsyncClient, model: str) -> None:
        nonlocal flood_ok
        while time.monotonic() < stop:
            status, _, _ = await post(c, base, chat(model, max_tokens=32))
            flood_ok += status == 200

    async with httpx.AsyncClient(timeout=60) as c:
        floods = [asyncio.create_task(flood(c, m)) for m in ("m0", "m1") for _ in range(4)]
        await asyncio.sleep(3)  # m0 and m1 hold both places and never go idle
        status, body, waited = await post(c, base, chat("m2"))
        assert status == 200, body
        # its wait is bounded by a turn (min_turn 1 s) plus a drain and a start, not the flood
        assert waited < 10, waited
        await asyncio.gather(*floods)
    assert flood_ok > 0
    assert "make room for m2 (drained first)" in four_models.logs()


async def test_a_streaming_request_waiting_for_its_turn_hears_its_place(four_models):
    base = four_models.base
    stop = time.monotonic() + 8

    async def flood(c: httpx.AsyncClient, model: str) -> None:
        while time.monotonic() < stop:
            await post(c, base, chat(model, max_tokens=64))

    async with httpx.AsyncClient(timeout=60) as c:
        floods = [asyncio.create_task(flood(c, m)) for m in ("m0", "m1") for _ in range(3)]
        await asyncio.sleep(3)
        lines = []
        async with c.stream(
            "POST", f"{base}/v1/chat/completions", json=chat("m3", stream=True)
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                lines.append(line)
        await asyncio.gather(*floods)
    text = "\n".join(lines)
    assert ": waiting for m3: position 1 of 1" in text, text[:2000]
    assert "data: [DONE]" in text


def test_a_model_that_never_fits_beside_a_kept_one_is_refused_at_once(
    tmp_path, nats_url, llama_server_bin, tiny_gguf
):
    s = start(
        tmp_path,
        nats_url,
        tiny_gguf,
        {"kept": (20, {"keep_loaded": True}), "other": (21, {})},
        gpus=[{"name": "sim", "memory_mib": 2000}],
    )
    try:
        assert httpx.post(f"{s.base}/v1/chat/completions", json=chat("kept"), timeout=60).is_success
        t0 = time.monotonic()
        r = httpx.post(f"{s.base}/v1/chat/completions", json=chat("other"), timeout=60)
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 10
        assert "never fits" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
        # the kept model was never asked to yield
        assert "swap for" not in s.logs()
        assert httpx.post(f"{s.base}/v1/chat/completions", json=chat("kept"), timeout=60).is_success
    finally:
        s.stop()


async def test_a_drain_past_its_deadline_is_abandoned_with_a_clear_answer(
    tmp_path, nats_url, llama_server_bin, tiny_gguf
):
    """A request on the only model that could yield outlasts placer.drain_timeout: the
    waiting model's request gets a 503 naming why, and the running request is not cut off."""
    s = start(
        tmp_path,
        nats_url,
        tiny_gguf,
        {"long": (30, {"args": ["-np", "1", "--context-shift"]}), "waits": (31, {})},
        gpus=[{"name": "sim", "memory_mib": 2000}],
        drain_timeout=2,
        min_turn=0.5,
    )
    streaming, done = asyncio.Event(), asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            running = asyncio.create_task(hold_stream(c, s.base, "long", streaming, done))
            await asyncio.wait_for(streaming.wait(), 30)
            status, body, waited = await post(c, s.base, chat("waits"))
            assert status == 503, body
            assert "drain_timeout" in body["error"]["message"]
            assert waited < 15
            await asyncio.sleep(1)
            assert not running.done(), "the running answer was cut off"
            done.set()
            assert await running == 200
        assert "could not take its turn" in s.logs()
    finally:
        s.stop()


def test_ollama_keep_alive_zero_unloads_after_the_answer(four_models):
    base = four_models.base
    ask = {"model": "m0", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    bad = httpx.post(f"{base}/api/chat", json={**ask, "keep_alive": "soon"}, timeout=60)
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]
    r = httpx.post(f"{base}/api/chat", json={**ask, "keep_alive": 0}, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "keep_alive 0 s" in four_models.logs():
            break
        time.sleep(0.2)
    assert "the last request's keep_alive 0 s" in four_models.logs()
    assert httpx.get(f"{base}/api/ps", timeout=10).json()["models"] == []


def test_models_of_an_exclusive_group_never_run_together(
    tmp_path, nats_url, llama_server_bin, tiny_gguf
):
    s = start(
        tmp_path,
        nats_url,
        tiny_gguf,
        {"ga": (40, {"group": "g"}), "gb": (41, {"group": "g"}), "free": (42, {})},
        gpus=[{"name": "sim", "memory_mib": 8000}],  # room for all three
    )
    try:
        for model in ("ga", "free", "gb", "ga"):
            r = httpx.post(f"{s.base}/v1/chat/completions", json=chat(model), timeout=60)
            assert r.status_code == 200, r.text
        ps = httpx.get(f"{s.base}/api/ps", timeout=10).json()["models"]
        assert sorted(m["name"] for m in ps) == ["free", "ga"]
        assert s.logs().count("exclusive group g: ") >= 2  # ga stopped for gb, gb for ga
    finally:
        s.stop()


async def test_a_client_that_leaves_while_queued_frees_its_place(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, bus
):
    # m0 and m1 each hold a stream and are in a long turn: m2's request has to wait
    shift = {"args": ["-np", "1", "--context-shift"]}
    models = {"m0": (50, shift), "m1": (51, shift), "m2": (52, {})}
    s = start(tmp_path, nats_url, tiny_gguf, models, min_turn=60)

    async def queued_for(model: str) -> int:
        reports = await kv_snapshot(bus, bus.activity, proto.ActivityReport)
        return sum(q.waiting for r in reports.values() for m, q in r.queues.items() if m == model)

    flowing = [asyncio.Event(), asyncio.Event()]
    done = asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            holds = [
                asyncio.create_task(hold_stream(c, s.base, m, ev, done))
                for m, ev in zip(("m0", "m1"), flowing, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in flowing)), 30)
            with pytest.raises(httpx.ReadTimeout):
                await c.post(f"{s.base}/v1/chat/completions", json=chat("m2"), timeout=1.5)
            for _ in range(25):  # the next reports (at most 5 s)
                if not await queued_for("m2"):
                    break
                await asyncio.sleep(0.2)
            assert await queued_for("m2") == 0  # its place in the queue is gone
            done.set()
            assert await asyncio.gather(*holds) == [200, 200]
        await asyncio.sleep(3)  # m0 and m1 are idle now: nothing would stop m2 loading
        recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
        assert not [r for r in recs.values() if r.model == "m2"]  # nobody waits: not loaded
    finally:
        s.stop()
