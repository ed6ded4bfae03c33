"""One request lifecycle (services/gateway/lifecycle.py) for every route family: each
request counts once in the metrics, with its route and its outcome, and whatever ends it
(its end, a refusal, the client walking away mid-stream or while it waits) gives its slot
back. On the real stack (tiny model, real llama-server), plus the client-gone watch's
cancel semantics and the count-once rule with plain values."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import generate_latest

import proto
from lls.bus import connect, kv_snapshot
from lls.config import ApiKey
from services.gateway.errors import ApiError
from services.gateway.lifecycle import Call, Calls
from services.gateway.metrics import Metrics
from services.gateway.observe import Observer
from services.gateway.stats import ServingStats
from services.gateway.usage import Usage
from stack import Stack

DEADLINE_S = 30.0  # generous: a 2-core machine shared with other tests


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {
        # ignore_eos: a random tiny model may pick EOS at once; --context-shift lets an
        # endless answer run as long as a test needs
        "tiny": {
            "url": f"file://{tiny_gguf(4)}",
            "ctx_size": 1024,
            "args": ["--context-shift", "-np", "2"],
            "defaults": {"ignore_eos": True},
        },
        "cold": {"url": f"file://{tiny_gguf(6)}", "ctx_size": 512},
        "emb": {"url": f"file://{tiny_gguf(5)}", "ctx_size": 512, "embeddings": True},
    }
    s = Stack(tmp_path, nats_url, models)
    s.start()
    yield s
    s.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a /metrics page; 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def counted(text: str, model: str, route: str) -> dict[str, float]:
    """lls_requests_total of one model and route, by status."""
    pattern = re.compile(
        rf'^lls_requests_total{{model="{model}",route="{re.escape(route)}",'
        rf'status="(\d+)"}} (\S+)$',
        re.M,
    )
    return {status: float(n) for status, n in pattern.findall(text)}


def scrape(stack: Stack) -> str:
    r = httpx.get(f"{stack.base}/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


async def _activity(url: str) -> list[proto.ActivityReport]:
    bus = await connect(url, "test")
    try:
        return list((await kv_snapshot(bus, bus.activity, proto.ActivityReport)).values())
    finally:
        await bus.close()


def eventually(check: Callable[[], object], what: str, deadline_s: float = DEADLINE_S) -> object:
    """`check()`'s first truthy result within the deadline; fails saying `what` otherwise."""
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {deadline_s} s (last: {last!r})")


def post(stack: Stack, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    r = httpx.post(f"{stack.base}{path}", json=body, timeout=timeout)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:300]}"
    return r


def test_every_route_family_counts_each_request_once_with_its_route_and_status(stack, nats_url):
    short = {"model": "tiny", "prompt": "a", "max_tokens": 4}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ollama_chat = {**chat, "options": {"num_predict": 4}}
    ollama_gen = {"model": "tiny", "prompt": "hi", "options": {"num_predict": 4}}
    post(stack, "/v1/completions", short)  # warms the model up (a cold whole answer)
    post(stack, "/v1/completions", short)
    post(stack, "/v1/chat/completions", {**chat, "stream": True})
    post(stack, "/v1/chat/completions", {**chat, "stream": True})
    # a stream to a model with no instance: its head at once, SSE comments while it starts
    # (if that takes over 0.1 s), then its events
    cold = post(stack, "/v1/chat/completions", {**chat, "model": "cold", "stream": True})
    assert "[DONE]" in cold.text
    post(stack, "/api/chat", {**ollama_chat, "stream": False})
    post(stack, "/api/chat", {**ollama_chat, "stream": True})
    post(stack, "/api/generate", {**ollama_gen, "stream": False})
    post(stack, "/api/generate", {**ollama_gen, "stream": True})
    post(stack, "/v1/embeddings", {"model": "emb", "input": "hello"})
    post(stack, "/api/embed", {"model": "emb", "input": ["hello", "world"]})
    post(stack, "/api/embeddings", {"model": "emb", "prompt": "hello"})
    # an answer the instance refuses counts with the status the client gets
    wrong = {**chat, "messages": [{"role": "user", "content": 5}]}
    r = httpx.post(f"{stack.base}/v1/chat/completions", json=wrong, timeout=30)
    assert r.status_code == 400, r.text
    # a body that names no valid model is refused before there is a request to count
    r = httpx.post(f"{stack.base}/api/embed", json={"model": "emb", "input": 5}, timeout=30)
    assert r.status_code == 400

    text = scrape(stack)
    expected: dict[tuple[str, str], int | dict[str, int]] = {
        ("tiny", "/v1/completions"): 2,
        ("tiny", "/v1/chat/completions"): {"200": 2, "400": 1},
        ("cold", "/v1/chat/completions"): 1,
        ("tiny", "/api/chat"): 2,
        ("tiny", "/api/generate"): 2,
        ("emb", "/v1/embeddings"): 1,
        ("emb", "/api/embed"): 1,
        ("emb", "/api/embeddings"): 1,
    }
    streamed = {
        ("tiny", "/v1/chat/completions"): 2,
        ("cold", "/v1/chat/completions"): 1,
        ("tiny", "/api/chat"): 1,
        ("tiny", "/api/generate"): 1,
    }
    for (model, route), n in expected.items():
        by_status = n if isinstance(n, dict) else {"200": n}
        assert counted(text, model, route) == by_status, (model, route)
        seconds = metric(text, "lls_request_seconds_count", model=model, route=route)
        assert seconds == sum(by_status.values()), (model, route)
        first = metric(text, "lls_time_to_first_token_seconds_count", model=model, route=route)
        assert first == streamed.get((model, route), 0), (model, route)
    # every generated answer reports its speed, streamed or not, OpenAI or Ollama
    assert metric(text, "lls_tokens_per_second_count", model="tiny") == 8
    assert metric(text, "lls_in_flight", model="tiny") == 0

    # The dashboard's counts (the activity report) agree: each request once.
    def serving() -> dict[str, int] | None:
        reports = asyncio.run(_activity(nats_url))
        got = {m: s.requests for r in reports for m, s in r.serving.items()}
        want = {"tiny": 9, "cold": 1, "emb": 3}
        return got if got == want else None

    eventually(serving, "the activity report's request counts")


def test_a_client_that_leaves_at_any_point_releases_its_slot_and_counts_as_499(stack, nats_url):
    endless = {"model": "tiny", "prompt": "a", "max_tokens": 10**6}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    post(stack, "/v1/completions", {**endless, "max_tokens": 1})  # warm

    def first_chunk_then_leave(path: str, body: dict) -> None:
        with httpx.stream("POST", f"{stack.base}{path}", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # the answer has begun; then the client goes

    # Both slots taken by endless streams: a third stream waits in the queue (its head and
    # SSE comments at once), and its client leaves while it waits.
    stream = {**endless, "stream": True}
    with (
        httpx.stream("POST", f"{stack.base}/v1/completions", json=stream, timeout=60) as a,
        httpx.stream("POST", f"{stack.base}/v1/completions", json=stream, timeout=60) as b,
    ):
        # (the iterators are kept: one dropped closes its response, and the client leaves)
        held = [a.iter_raw(), b.iter_raw()]
        assert all(next(chunks).startswith(b"data: ") for chunks in held)
        first_chunk_then_leave_waiting = {**chat, "stream": True, "max_tokens": 4}
        with httpx.stream(
            "POST",
            f"{stack.base}/v1/chat/completions",
            json=first_chunk_then_leave_waiting,
            timeout=60,
        ) as waiting:
            assert waiting.status_code == 200
            assert next(waiting.iter_raw()).startswith(b": waiting for tiny: position 1 of 1")
    # ...and the two endless streams' clients left mid-stream. So do two Ollama streams':
    for _ in range(2):
        first_chunk_then_leave(
            "/api/chat", {**chat, "stream": True, "options": {"num_predict": 10**6}}
        )

    # a whole answer the client stops waiting for, OpenAI's and Ollama's
    def give_up(path: str) -> str:
        body = {**chat, "max_tokens": 10**6}
        if path == "/api/generate":
            body = {"model": "tiny", "prompt": "hi", "stream": False}
            body["options"] = {"num_predict": 10**6}
        try:
            httpx.post(f"{stack.base}{path}", json=body, timeout=1)
        except httpx.TimeoutException:
            return "gave up"
        return "answered"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = ["/v1/chat/completions", "/v1/chat/completions", "/api/generate"]
        assert list(pool.map(give_up, paths)) == ["gave up"] * 3

    # The slots are free (the gateway's and the instance's): these are answered at once.
    short = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda _: post(stack, "/v1/completions", short, 30), range(2))
        assert [r.status_code for r in done] == [200, 200]

    def settled() -> str | None:
        text = scrape(stack)
        quiet = metric(text, "lls_in_flight", model="tiny") == 0
        return text if quiet and metric(text, "lls_queue_depth", model="tiny") == 0 else None

    text = str(eventually(settled, "no request in flight or queued"))
    assert counted(text, "tiny", "/v1/completions") == {"200": 3, "499": 2}
    assert counted(text, "tiny", "/api/chat") == {"499": 2}
    assert counted(text, "tiny", "/v1/chat/completions") == {"499": 3}
    assert counted(text, "tiny", "/api/generate") == {"499": 1}
    for route, n in (("/v1/completions", 5), ("/api/chat", 2), ("/v1/chat/completions", 3)):
        assert metric(text, "lls_request_seconds_count", model="tiny", route=route) == n

    # nothing stays counted in flight on any instance (the router's count, as reported)
    def idle() -> bool:
        reports = asyncio.run(_activity(nats_url))
        busy = {i: a.in_flight for r in reports for i, a in r.instances.items() if a.in_flight}
        return not busy

    eventually(idle, "every instance's in-flight count back to 0")


# ---------------------------------------------------------------- the client-gone watch


class _Receive:
    """An ASGI receive whose client leaves when `leave` is set."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()

    async def __call__(self) -> dict[str, str]:
        await self.leave.wait()
        return {"type": "http.disconnect"}


def _call(receive: _Receive) -> Call:
    return Call(None, receive, "m", "/r", None, "", "", time.monotonic())  # type: ignore[arg-type]


async def test_a_client_leaving_turns_the_wait_into_a_499_and_unwinds_the_work() -> None:
    receive = _Receive()
    call = _call(receive)
    unwound = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(3600)
        finally:
            unwound.set()
        return "never"

    call._arm()
    asyncio.get_running_loop().call_later(0.1, receive.leave.set)
    with pytest.raises(ApiError) as e:
        async with asyncio.timeout(10):
            await call._guarded(work())
    assert e.value.status == 499
    assert unwound.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancel it used is taken back
    call._disarm()
    await asyncio.sleep(0.01)  # still alive: no stray cancel lands later


async def test_a_cancel_from_elsewhere_stays_a_cancel_and_a_quick_answer_needs_no_watch() -> None:
    receive = _Receive()
    call = _call(receive)

    async def quick() -> str:
        return "answer"

    call._arm()
    assert await call._guarded(quick()) == "answer"
    call._disarm()
    assert call._watcher is None  # answered before the watch began: no task was made

    async def waits() -> None:
        call._arm()
        await call._guarded(asyncio.sleep(3600))

    task = asyncio.ensure_future(waits())
    await asyncio.sleep(0.2)  # the watch is on by now
    assert call._watcher is not None
    task.cancel()  # the gateway stopping, say: not the client leaving
    with pytest.raises(asyncio.CancelledError):
        await task
    call._disarm()


# ---------------------------------------------------------------- counted once, in any case


class _Upstream:
    """Upstream.open's contract: (response, release) or an ApiError."""

    def __init__(self, error: ApiError | None) -> None:
        self.error = error
        self.released = 0

    async def open(self, *_args: object) -> tuple[object, Callable[[], None]]:
        if self.error is not None:
            raise self.error

        class Reply:
            status_code = 200

            async def aclose(self) -> None:
                pass

        def release() -> None:
            self.released += 1

        return Reply(), release


async def test_refused_failed_and_answered_calls_count_once_and_give_their_slot_back() -> None:
    key = ApiKey(key="sk-test-value-123", name="solo", max_concurrent=1)
    metrics = Metrics()
    usage = Usage([key], metrics)
    ok, failing = _Upstream(None), _Upstream(ApiError(503, "no instance", "unavailable"))
    stats = ServingStats()

    def call(upstream: _Upstream) -> Call:
        calls = Calls(usage, upstream, None, Observer(metrics, stats))  # type: ignore[arg-type]
        return calls.call(_Receive(), "m", "/r", key, "solo", "solo", time.monotonic())

    answered = call(ok)
    answered.admit()
    with pytest.raises(ApiError) as refused:  # the key's one slot is taken
        call(ok).admit()
    assert refused.value.status == 429
    await answered.open("/r", b"{}", {})
    answered.finish()
    answered.finish()  # a second end (a bug elsewhere) changes nothing
    assert ok.released == 1

    failed = call(failing)
    with pytest.raises(ApiError):
        await failed.open("/r", b"{}", {})
    failed.finish(200)  # already finished, with its 503
    assert usage.windows["solo"].running == 0

    text = generate_latest(metrics.registry).decode()
    assert counted(text, "m", "/r") == {"200": 1, "429": 1, "503": 1}
    assert metric(text, "lls_request_seconds_count", model="m", route="/r") == 3
    assert stats.report()["m"].requests == 3 and stats.report()["m"].errors == 2
