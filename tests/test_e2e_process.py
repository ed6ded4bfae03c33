"""End to end on real parts, process runtime: OpenAI SDK -> gateway -> NATS -> placer ->
downloader -> agent -> llama-server and back."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from openai import OpenAI

from stack import Stack, llama_server_pids


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 4096)
    tiny = f"file://{tiny_gguf(1)}"
    models = {
        # a random tiny model may sample EOS at once: the token counts below need every token
        "tiny": {"url": tiny, "ctx_size": 1024, "defaults": {"ignore_eos": True}},
        "tiny-embed": {"url": f"file://{tiny_gguf(2)}", "ctx_size": 512, "embeddings": True},
        "broken": {"url": f"file://{corrupt}"},
        "badsum": {"url": tiny, "sha256": "0" * 64},
    }
    s = Stack(tmp_path, nats_url, models)
    s.start()
    yield s
    s.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running after stop"


def client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_sdk_chat_completions_streaming_and_embeddings(stack):
    c = client(stack)
    assert {m.id for m in c.models.list().data} == {"tiny", "tiny-embed", "broken", "badsum"}

    r = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage is not None and r.usage.completion_tokens == 8

    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=16,
            stream=True,
            temperature=0,  # greedy: a random tiny model sampled at random may emit no text
        )
    )
    deltas = [
        ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content
    ]
    assert len(deltas) >= 2, "a stream arrives token by token, not as one buffered piece"

    comp = c.completions.create(model="tiny", prompt="the model is", max_tokens=5)
    assert comp.usage is not None and comp.usage.completion_tokens == 5

    emb = c.embeddings.create(model="tiny-embed", input=["hello world", "a"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64

    listed = {m.id: m.model_extra.get("state") for m in c.models.list().data}
    assert listed["tiny"] == "ready" and listed["tiny-embed"] == "ready"


def test_concurrent_cold_requests_start_one_instance(stack, tmp_path):
    def ask(_: int) -> int:
        r = httpx.post(
            f"{stack.base}/v1/completions",
            json={"model": "tiny", "prompt": "a", "max_tokens": 2},
            timeout=60,
        )
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(ask, range(16)))
    assert codes == [200] * 16
    pids = [p for p in llama_server_pids(str(tmp_path))]
    assert len(pids) == 1, f"one cold start for 16 concurrent requests, got {len(pids)} servers"


def test_bad_requests_get_openai_style_4xx(stack):
    r = httpx.post(f"{stack.base}/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "nope" in r.json()["error"]["message"]

    r = httpx.post(
        f"{stack.base}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

    r = httpx.post(f"{stack.base}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]

    r = httpx.post(f"{stack.base}/v1/chat/completions", json={"model": 5})
    assert r.status_code == 400


def test_model_that_cannot_start_gets_503_with_reason_and_no_tight_retry(stack):
    t0 = time.monotonic()
    r = httpx.post(
        f"{stack.base}/v1/completions", json={"model": "broken", "prompt": "a"}, timeout=60
    )
    assert r.status_code == 503
    err = r.json()["error"]
    assert "broken" in err["message"] and "failed" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert time.monotonic() - t0 < 30

    # Asked again at once: refused fast from the recorded failure, not a new start attempt.
    t1 = time.monotonic()
    r2 = httpx.post(
        f"{stack.base}/v1/completions", json={"model": "broken", "prompt": "a"}, timeout=60
    )
    assert r2.status_code == 503 and time.monotonic() - t1 < 3


def test_checksum_mismatch_is_reported_and_never_served(stack, tmp_path):
    r = httpx.post(
        f"{stack.base}/v1/completions", json={"model": "badsum", "prompt": "a"}, timeout=60
    )
    assert r.status_code == 503
    assert "sha256" in r.json()["error"]["message"].lower()
    assert not list((tmp_path / "store").glob("badsum*.gguf"))


def test_whole_system_keeps_working_after_a_nats_restart(stack, nats_server):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    assert httpx.post(f"{stack.base}/v1/completions", json=body, timeout=60).status_code == 200
    nats_server.stop()
    time.sleep(1.0)
    nats_server.start()  # same port and store: streams, buckets and consumers survive
    # Warm: served from the gateway's view, no bus needed.
    assert httpx.post(f"{stack.base}/v1/completions", json=body, timeout=60).status_code == 200
    # Cold: demand, placement, download and start all cross the restarted bus.
    emb = {"model": "tiny-embed", "input": "hello"}
    r = httpx.post(f"{stack.base}/v1/embeddings", json=emb, timeout=60)
    assert r.status_code == 200, r.text
    # The dashboard followed too: it shows the new instance and the events after the restart.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = httpx.get(f"{stack.base}/dashboard/state", timeout=5).json()
        models = {i["model"] for i in state["instances"].values() if i["state"] == "ready"}
        seen = [e for e in state["events"] if e.get("model") == "tiny-embed"]
        if "tiny-embed" in models and any(e.get("state") == "ready" for e in seen):
            break
        time.sleep(0.2)
    assert "tiny-embed" in models, state["instances"]
    assert any(e.get("state") == "ready" for e in seen), seen
