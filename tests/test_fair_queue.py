"""Fair queues on the real stack, with the default gateway config (max_in_flight 32, the
hand-off overlap on) and a model with one slot (`-np 1`, so the order is easy to see): one
API key flooding a model cannot make another wait behind its whole flood,
the activity report counts who waits, and a queued stream hears its place go down
(services/gateway/admission.py; the running limit is the model's slots)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import re
import time
from collections.abc import Callable

import httpx
import pytest

import proto
from lls.bus import connect, kv_snapshot
from stack import Stack

FLOOD = "flood-key-123456"
POLITE = "polite-key-123456"
# about 0.3 s each on a CPU (far longer than the gateway's own work per request)
BODY = {"model": "tiny", "prompt": "a", "max_tokens": 1200, "ignore_eos": True, "seed": 1}


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {"tiny": {"url": f"file://{tiny_gguf(4)}", "ctx_size": 2048, "args": ["-np", "1"]}}
    gateway = {  # max_in_flight left at its default (32): the slot count limits the model
        "max_queue": 64,
        "api_keys": [{"key": FLOOD, "name": "flood"}, {"key": POLITE, "name": "polite"}],
    }
    s = Stack(tmp_path, nats_url, models)
    s.patch_config(gateway=gateway)
    s.start()
    yield s
    s.stop()


def ask(base: str, key: str) -> tuple[float, float]:
    t0 = time.monotonic()
    r = httpx.post(
        f"{base}/v1/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}"},
        timeout=180,
    )
    assert r.status_code == 200, r.text
    return t0, time.monotonic()


def service_time(base: str) -> float:
    ask(base, POLITE)  # warm: the model is loaded
    return min(e - s for s, e in (ask(base, POLITE) for _ in range(3)))


async def waiting_clients(nats_url: str, model: str, until: Callable[[], bool]) -> dict[str, int]:
    """The most requests per client the gateway's activity reports showed waiting for
    `model`, read until `until()` (at most 60 s)."""
    most: dict[str, int] = {}
    bus = await connect(nats_url, "test")
    try:
        deadline = time.monotonic() + 60
        while not until() and time.monotonic() < deadline:
            reports = await kv_snapshot(bus, bus.activity, proto.ActivityReport)
            for q in (r.queues[model] for r in reports.values() if model in r.queues):
                for who, n in q.clients.items():
                    most[who] = max(most.get(who, 0), n)
            await asyncio.sleep(0.2)
    finally:
        await bus.close()
    return most


def test_a_flooding_key_delays_another_by_about_one_request_not_by_its_flood(
    stack: Stack, nats_url: str
):
    t_one = service_time(stack.base)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        flood = [pool.submit(ask, stack.base, FLOOD) for _ in range(20)]
        time.sleep(t_one)  # the flood is queued: about one of its requests has run
        polite = pool.submit(ask, stack.base, POLITE)
        seen = asyncio.run(waiting_clients(nats_url, "tiny", lambda: all(f.done() for f in flood)))
        start, end = polite.result()
        flood_end = max(f.result()[1] for f in flood)
    # the flood waited at the gateway, counted by key name (not inside llama-server, unseen)
    assert seen.get("flood", 0) >= 5 and set(seen) <= {"flood", "polite"}, seen
    took = end - start
    behind = sum(1 for f in flood if f.result()[1] > end)
    # FIFO would serve it after every flood request queued before it (about 19 service
    # times); fair queuing right after the one running: its own time and about one more.
    assert behind >= 10, (behind, took, t_one)
    assert took < 4 * t_one + 2, (took, t_one)
    assert flood_end > end


async def test_a_queued_stream_hears_its_place_go_down(stack: Stack):
    t_one = service_time(stack.base)
    flood = {"Authorization": f"Bearer {FLOOD}"}
    n = max(5, min(30, math.ceil(5 / t_one)))  # about 5 s of queue ahead of it
    async with httpx.AsyncClient(timeout=180) as c:
        ahead = [
            asyncio.create_task(c.post(f"{stack.base}/v1/completions", json=BODY, headers=flood))
            for _ in range(n)
        ]
        await asyncio.sleep(0.5)  # they are queued first

        async def stream(path: str, body: dict) -> list[str]:
            lines = []
            async with c.stream("POST", f"{stack.base}{path}", json=body, headers=flood) as r:
                assert r.status_code == 200  # the head goes out at once: it waits
                async for line in r.aiter_lines():
                    lines.append(line)
            return lines

        # ...and one the instance will refuse (content of the wrong type): once the head is
        # sent, the instance's error comes as an event
        wrong = {"model": "tiny", "messages": [{"role": "user", "content": 5}], "stream": True}
        lines, refused = await asyncio.gather(
            stream("/v1/completions", {**BODY, "stream": True, "max_tokens": 8}),
            stream("/v1/chat/completions", wrong),
        )
        assert [a.status_code for a in await asyncio.gather(*ahead)] == [200] * n
    assert any(line.startswith(": waiting for tiny: position") for line in refused), refused
    assert any('"invalid_request_error"' in line for line in refused if line.startswith("data:"))
    text = "\n".join(lines)
    places = [int(p) for p in re.findall(r": waiting for tiny: position (\d+) of \d+", text)]
    assert places and places[0] >= 3, text[:2000]  # behind most of its own key's requests
    assert places == sorted(places, reverse=True) and len(set(places)) >= 3, places
    # one slot, and one more (not streamed) request sent on to wait in it: the overlap
    assert re.search(r"waiting for a free slot \([12] running on 1\)", text), text[:2000]
    assert "data: [DONE]" in text
