"""Fair queues on the real stack: one API key flooding a model cannot make another wait
behind its whole flood (services/gateway/admission.py)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from stack import Stack

FLOOD = "flood-key-123456"
POLITE = "polite-key-123456"


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {"tiny": {"url": f"file://{tiny_gguf(4)}", "ctx_size": 1024}}
    gateway = {
        "max_in_flight": 1,  # one at a time, so the order of service is the order of grants
        "max_queue": 64,
        "api_keys": [{"key": FLOOD, "name": "flood"}, {"key": POLITE, "name": "polite"}],
    }
    s = Stack(tmp_path, nats_url, models)
    s.patch_config(gateway=gateway)
    s.start()
    yield s
    s.stop()


def ask(base: str, key: str) -> tuple[float, float]:
    body = {"model": "tiny", "prompt": "a", "max_tokens": 600, "ignore_eos": True, "seed": 1}
    t0 = time.monotonic()
    r = httpx.post(
        f"{base}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return t0, time.monotonic()


def test_a_flooding_key_delays_another_by_about_one_request_not_by_its_flood(stack: Stack):
    ask(stack.base, POLITE)  # warm: the model is loaded
    t_one = min(e - s for s, e in (ask(stack.base, POLITE) for _ in range(3)))
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        flood = [pool.submit(ask, stack.base, FLOOD) for _ in range(20)]
        time.sleep(t_one)  # the flood is queued: about one of its requests has run
        start, end = pool.submit(ask, stack.base, POLITE).result()
        flood_end = max(f.result()[1] for f in flood)
    waited = end - start
    behind = sum(1 for f in flood if f.result()[1] > end)
    # FIFO would serve it after every flood request queued before it; fair queuing right
    # after the one running (and at most one more that got its grant in the same instant).
    assert behind >= 10, (behind, waited, t_one)
    assert flood_end > end
