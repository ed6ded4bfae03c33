"""The gateway's whole client-facing surface on a real stack: the official Ollama client,
admission control under overload, API keys, metrics, the dashboard through the gateway,
client disconnects, and a fuzz pass that must find no 500 and no hang."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time

import httpx
import ollama
import pytest

import proto
from lls.bus import connect, kv_snapshot
from stack import Stack

KEY = "test-key-123456"
ADMIN = "admin-key-123456"


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {
        "tiny": {
            "url": f"file://{tiny_gguf(4)}",
            "ctx_size": 1024,
            "aliases": ["tiny:latest"],
            # --context-shift lets one request run as long as a test needs; two slots, so
            # that max_in_flight 2 is the running limit (it is min(max_in_flight, slots))
            "args": ["--context-shift", "-np", "2"],
        },
        "emb": {"url": f"file://{tiny_gguf(5)}", "ctx_size": 512, "embeddings": True},
        "scoped": {"url": f"file://{tiny_gguf(4)}", "ctx_size": 512},
    }
    gateway = {
        "max_in_flight": 2,
        "max_queue": 2,
        "queue_timeout": 20,
        "api_keys": [
            {"key": KEY, "models": ["tiny", "emb"]},
            {"key": ADMIN, "admin": True},
        ],
    }
    s = Stack(tmp_path, nats_url, models)
    s.patch_config(gateway=gateway)
    s.start()
    yield s
    s.stop()


# A random tiny model sampled at random may pick EOS at once; with a fixed seed the answers
# (and so the token counts checked below) are the same on every run.
SEEDED = {"seed": 11}


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_official_ollama_client_works_unchanged(stack):
    c = ollama.Client(host=stack.base, headers=auth())
    names = {m.model for m in c.list().models}
    assert {"tiny", "emb"} <= names

    r = c.chat(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        options=SEEDED | {"num_predict": 5},
    )
    assert r.done and r.eval_count == 5 and r.message.role == "assistant"

    parts = list(
        c.chat(
            model="tiny:latest",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            options=SEEDED | {"num_predict": 8},
        )
    )
    assert parts[-1].done and len([p for p in parts if p.message.content]) >= 2

    g = c.generate(model="tiny", prompt="the model", options=SEEDED | {"num_predict": 4})
    assert g.done and g.eval_count == 4
    streamed = list(
        c.generate(model="tiny", prompt="a", stream=True, options=SEEDED | {"num_predict": 4})
    )
    assert streamed[-1].done

    long = "hello world " * 400  # far past the 512-token batch: truncated, not a 500
    e = c.embed(model="emb", input=["hello", long])
    assert len(e.embeddings) == 2 and len(e.embeddings[1]) == 64
    e = c.embed(model="emb", input=["hello", "world"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 64
    assert len(c.embeddings(model="emb", prompt="hello").embedding) == 64

    assert any(m.model == "tiny" for m in c.ps().models)
    shown = c.show("tiny")  # facts from the GGUF header of the file the host holds
    assert shown.modelfile.startswith("FROM ") and shown.details.family == "llama"
    assert shown.details.parameter_size == "117K" and shown.details.quantization_level == "F32"
    assert shown.modelinfo["llama.block_count"] == 2


def test_overload_gets_fast_429s_while_admitted_requests_complete(stack):
    # Warm the model first so the timing below is about admission, not a cold start.
    httpx.post(
        f"{stack.base}/v1/completions",
        headers=auth(),
        json={"model": "tiny", "prompt": "a", "max_tokens": 1},
        timeout=60,
    )

    def ask(_: int) -> tuple[int, float, str | None]:
        t0 = time.monotonic()
        r = httpx.post(
            f"{stack.base}/v1/completions",
            headers=auth(),
            json={"model": "tiny", "prompt": "a", "max_tokens": 400, "ignore_eos": True},
            timeout=60,
        )
        return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, range(12)))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 12, results
    assert len(ok) >= 4  # 2 running + 2 queued are always admitted
    assert refused, "12 concurrent requests against 2 slots + 2 queue places must see 429s"
    assert all(r[2] is not None and int(r[2]) >= 1 for r in refused)
    assert max(r[1] for r in refused) < 2.0, "a refusal is quick, not after a wait"


def test_api_keys_scope_models_and_admin_endpoints(stack):
    # four tokens every time: an answer of one token reports no speed
    body = {"model": "tiny", "prompt": "a", "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(f"{stack.base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(
        f"{stack.base}/v1/completions", json=body, headers={"x-api-key": KEY}, timeout=60
    )
    assert r.status_code == 200
    streamed = {**body, "stream": True}
    r = httpx.post(f"{stack.base}/v1/completions", json=streamed, headers=auth(), timeout=60)
    assert r.status_code == 200 and "[DONE]" in r.text
    r = httpx.post(
        f"{stack.base}/v1/completions", json={**body, "model": "scoped"}, headers=auth(), timeout=60
    )
    assert r.status_code == 403
    assert httpx.get(f"{stack.base}/health").status_code == 200
    assert httpx.get(f"{stack.base}/metrics", headers=auth()).status_code == 403
    assert httpx.get(f"{stack.base}/dashboard").status_code == 401

    # Ollama's routes are counted like the others (one way to observe a request)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "options": SEEDED}
    for stream in (False, True):
        r = httpx.post(
            f"{stack.base}/api/chat", json={**chat, "stream": stream}, headers=auth(), timeout=60
        )
        assert r.status_code == 200, r.text

    m = httpx.get(f"{stack.base}/metrics", headers=auth(ADMIN))
    assert m.status_code == 200
    assert 'lls_requests_total{model="tiny",route="/v1/completions",status="200"}' in m.text
    assert 'lls_requests_total{model="tiny",route="/api/chat",status="200"} 2.0' in m.text
    assert 'lls_time_to_first_token_seconds_count{model="tiny",route="/api/chat"} 1.0' in m.text
    assert 'lls_request_seconds_count{model="tiny",route="/api/chat"} 2.0' in m.text
    assert "lls_cold_start_seconds_count" in m.text
    # 2 whole, 2 streamed: one OpenAI, one Ollama (every route observes the speed)
    assert 'lls_tokens_per_second_count{model="tiny"} 4.0' in m.text
    assert 'lls_admission_limit{model="tiny"} 2.0' in m.text  # two slots, one instance

    page = httpx.get(f"{stack.base}/dashboard", headers=auth(ADMIN))
    assert page.status_code == 200 and "<html" in page.text.lower()
    state = httpx.get(f"{stack.base}/dashboard/state", headers=auth(ADMIN)).json()
    assert isinstance(state, dict)
    # The live event stream passes through the gateway as it is produced, not buffered.
    with httpx.stream(
        "GET", f"{stack.base}/dashboard/events", headers=auth(ADMIN), timeout=10
    ) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        assert next(events.iter_text()).strip()


def test_client_disconnect_releases_its_slot(stack):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    httpx.post(
        f"{stack.base}/v1/completions",
        headers=auth(),
        json={"model": "tiny", "prompt": "a", "max_tokens": 1},
        timeout=60,
    )
    for _ in range(4):  # more walk-aways than slots: a leak would block the request below
        with httpx.stream(
            "POST", f"{stack.base}/v1/completions", json=body, headers=auth(), timeout=60
        ) as r:
            next(r.iter_raw())
    time.sleep(0.5)
    r = httpx.post(
        f"{stack.base}/v1/completions",
        headers=auth(),
        json={"model": "tiny", "prompt": "a", "max_tokens": 1},
        timeout=10,
    )
    assert r.status_code == 200


async def _activity(url: str) -> list[proto.ActivityReport]:
    bus = await connect(url, "test")
    try:
        return list((await kv_snapshot(bus, bus.activity, proto.ActivityReport)).values())
    finally:
        await bus.close()


def test_client_that_gives_up_on_a_long_answer_releases_its_slot_and_the_work(stack, nats_url):
    warm = {"model": "tiny", "prompt": "a", "max_tokens": 1}
    assert httpx.post(f"{stack.base}/v1/completions", headers=auth(), json=warm, timeout=60)
    endless = {"model": "tiny", "prompt": "a", "max_tokens": 10**6, "ignore_eos": True}

    def give_up(_: int) -> str:
        try:
            r = httpx.post(
                f"{stack.base}/v1/completions", headers=auth(), json=endless, timeout=1.0
            )
        except httpx.TimeoutException:
            return "gave up"
        return f"answered {r.status_code}: {r.text[:200]}"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 2 slots + 2 queue places
        assert list(pool.map(give_up, range(4))) == ["gave up"] * 4
    # Endless answers would hold both gateway slots and llama-server's two for good: this
    # request is answered only if the walk-aways released them and stopped the generation.
    # (30 s: on a loaded 2-core machine llama-server may take a while to see the walk-aways)
    r = httpx.post(f"{stack.base}/v1/completions", headers=auth(), json=warm, timeout=30)
    assert r.status_code == 200, r.text
    # nothing stays counted in flight on the instance (a leak would keep it "busy" for good:
    # never idle, never drained); the gateway reports every second
    busy: dict[str, int] = {}
    for _ in range(30):
        reports = asyncio.run(_activity(nats_url))
        busy = {i: a.in_flight for r in reports for i, a in r.instances.items() if a.in_flight}
        if not busy:
            break
        time.sleep(0.2)
    assert busy == {}


def test_fuzzed_requests_get_4xx_never_500_or_hang(stack):
    rnd = random.Random(7)
    paths = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/show",
        "/v1/rerank",
    ]
    bodies = [
        b"",
        b"null",
        b"[]",
        b"{",
        b'{"model": 1}',
        b'{"model": null}',
        b'{"model": "nope"}',
        b'{"model": ["tiny"]}',
        b'{"model": "tiny", "messages": 5}',
        b"\xff\xfe",
        b'{"model": "emb", "input": 5}',
        b'{"model": "tiny", "options": 3}',
        b'{"model": "tiny", "prompt": {}}',
        b'{"model": "' + b"x" * 5000 + b'"}',
    ]
    bodies += [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 200))) for _ in range(10)]
    with httpx.Client(base_url=stack.base, headers=auth(), timeout=15) as c:
        for path in paths:
            for body in bodies:
                r = c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code < 500, (path, body[:40], r.status_code, r.text[:200])
                if path.startswith("/v1") and r.status_code >= 400:
                    assert set(r.json()["error"]) >= {"message", "type", "code"}
                if path.startswith("/api/") and r.status_code >= 400:  # Ollama's own form
                    assert isinstance(r.json()["error"], str) and r.json()["error"]
        huge = c.post("/v1/chat/completions", content=b"{" + b" " * (33 << 20) + b"}")
        assert huge.status_code == 413
