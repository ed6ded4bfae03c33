"""gateway.workers: several gateway processes serve one port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import proto
from lls.bus import kv_snapshot
from stack import Stack


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    s = Stack(tmp_path, nats_url, {"tiny": {"url": f"file://{tiny_gguf(3)}", "ctx_size": 512}})
    s.patch_config(gateway={"workers": 2})
    s.start()
    yield s
    s.stop()


async def test_two_workers_share_the_port_and_both_serve(stack: Stack, bus):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for _ in range(40):  # a new connection each: the kernel spreads them over the workers
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{stack.base}/v1/completions", json=body)
        assert r.status_code == 200, r.text
    served: dict[str, int] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        reports = await kv_snapshot(bus, bus.activity, proto.ActivityReport)
        served = {
            rep.gateway_id: rep.serving["tiny"].requests
            for rep in reports.values()
            if "tiny" in rep.serving
        }
        if len(served) == 2 and sum(served.values()) == 40:
            break
        await asyncio.sleep(0.5)
    assert len(served) == 2 and sum(served.values()) == 40, served
    assert min(served.values()) >= 5, served  # both took a share, not one all of it
