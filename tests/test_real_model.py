"""The real-model tier: Gemma 3 270M (config.yaml's `gemma3`, lls/real_model.py) served by the
whole stack (NATS, placer, agent with the process runtime, llama-server on the CPU, gateway).

Kept short for 2 cores (~50 tokens/s generated, ~190 of prompt): few tokens per answer.
Selected with `-m real_model`; `make test` and CI run it, and under LLS_REQUIRE_REAL=1 a
missing model package fails (conftest.require), never skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
import yaml
from test_memory import GEMMA3_270M
from test_prefix_routing import ONE_EACH, Replicas

import proto
from conftest import ROOT, require
from lls import real_model
from lls.bus import Bus, kv_snapshot
from lls.gguf_header import read_summary
from services.placer.memory import estimate_mib
from stack import Stack, llama_server_pids

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(420)]

MODEL = "gemma3"
WAIT_S = 180  # two shared cores: a long prefill alone takes ~10 s
# What a Gemma turn looks like (llama-server's built-in `gemma` template), and what a model
# prompted in another format tends to echo back.
GEMMA_TURN = "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"
LEFTOVERS = re.compile(r"<\|im_(start|end)|<start_of_turn>|<end_of_turn>")
WORDS = (
    "the river lamp bakery garden stone north window music paper green quiet city morning "
    "letter bridge silver winter story friend market harbour candle forest"
).split()


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    require("the real demo model", real_model.available(), real_model.INSTALL_HINT)
    return real_model.ensure()


def served_as_configured(path: Path, **extra: object) -> dict:
    """config.yaml's gemma3 entry (template, context, flags: what `make run` serves), its
    file at `path`."""
    entry = yaml.safe_load((ROOT / "config.yaml").read_text())["models"][MODEL]
    return {**entry, "url": f"file://{path}", **extra}


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def ready(bus: Bus, model: str, count: int = 1) -> list[proto.InstanceRecord]:
    """The model's READY instances once there are `count`, within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
        got = [
            r for r in recs.values() if r.model == model and r.state is proto.InstanceState.READY
        ]
        if len(got) >= count or time.monotonic() > deadline:
            assert len(got) >= count, f"{len(got)} of {count} instances of {model} ready"
            return sorted(got, key=lambda r: r.instance_id)
        await asyncio.sleep(0.2)


async def stopped(bus: Bus, model: str) -> None:
    """`lls stop MODEL`, then wait until none of its instances is live."""
    await bus.emit(proto.StopRequested(model=model, requested_by="test"))
    live = proto.LIVE_STATES | {proto.InstanceState.STOPPING}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        recs = [
            r
            for r in (await kv_snapshot(bus, bus.instances, proto.InstanceRecord)).values()
            if r.model == model
        ]
        if any(r.state in proto.END_STATES for r in recs) and not any(
            r.state in live for r in recs
        ):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{model} did not stop within {WAIT_S} s")


async def streamed_ttft(c: httpx.AsyncClient, base: str, prompt: str) -> tuple[float, dict]:
    """A streamed completion: (seconds to its first token, llama-server's timings)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    t0 = time.monotonic()
    ttft, timings = None, {}
    async with c.stream("POST", f"{base}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.monotonic() - t0
            timings = chunk.get("timings") or timings
    assert ttft is not None and "prompt_n" in timings, timings
    return ttft, timings


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert found, status
    return int(found.group(1)) / 1024


def says_words(answer: str) -> None:
    assert re.search(r"[A-Za-z]{2,}", answer), repr(answer)
    assert not LEFTOVERS.search(answer), repr(answer)


# ---------------------------------------------------------------- the file


def test_the_model_is_assembled_once_and_rewritten_when_damaged(tmp_path, real_gguf):
    cache = tmp_path / "cache"
    path = real_model.ensure(cache)
    assert path == real_model.cached_path(cache) and real_model.sha256_of(path) == real_model.SHA256
    first = path.stat().st_ino
    assert real_model.ensure(cache).stat().st_ino == first  # valid: reused, not rewritten
    with path.open("r+b") as f:  # one flipped byte deep in the weights
        f.seek(real_model.SIZE // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not real_model.is_valid(path)
    again = real_model.ensure(cache)
    assert again.stat().st_ino != first and real_model.is_valid(again)
    assert [p.name for p in path.parent.iterdir()] == [real_model.FILENAME]  # no parts left
    assert all(p.exists() for p in real_model.licence_files())


def test_the_memory_tests_pin_is_the_real_header(real_gguf):
    assert read_summary(real_gguf) == GEMMA3_270M


# ---------------------------------------------------------------- clients and the template


@pytest.fixture
async def gemma(tmp_path, nats_url, llama_server_bin, real_gguf, bus):
    s = Stack(tmp_path, nats_url, {MODEL: served_as_configured(real_gguf)})
    s.patch_config(gateway={"cold_start_timeout": WAIT_S})
    s.start()
    yield s
    s.stop()


async def test_openai_anthropic_and_ollama_clients_chat_in_gemmas_own_format(gemma, bus):
    question = "Why is the sky blue?"
    messages: list = [{"role": "user", "content": question}]  # the clients take plain dicts
    oa = openai.AsyncOpenAI(base_url=f"{gemma.base}/v1", api_key="unused", timeout=WAIT_S)
    r = await oa.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
    )
    says_words(r.choices[0].message.content or "")

    # What llama-server made of the messages: the Gemma turn, and that many tokens were sent.
    [rec] = await ready(bus, MODEL)
    [key] = (await Replicas.of(bus, [rec])).auth.values()
    async with httpx.AsyncClient(timeout=30, headers=key) as c:
        applied = await c.post(f"{rec.endpoint}/apply-template", json={"messages": messages})
        assert applied.json()["prompt"] == GEMMA_TURN.format(q=question)
        tokens = await c.post(
            f"{rec.endpoint}/tokenize",
            json={"content": applied.json()["prompt"], "add_special": True},
        )
    n_prompt = len(tokens.json()["tokens"])
    assert r.usage is not None and r.usage.prompt_tokens == n_prompt

    an = anthropic.AsyncAnthropic(base_url=gemma.base, api_key="unused", timeout=WAIT_S)
    m = await an.messages.create(
        model=MODEL, max_tokens=8, messages=messages, extra_body={"temperature": 0}
    )
    says_words("".join(b.text for b in m.content if b.type == "text"))
    # Anthropic counts a cached prefix apart: the same prompt, part of it reused
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == n_prompt

    ol = ollama.AsyncClient(host=gemma.base, timeout=WAIT_S)
    o = await ol.chat(model=MODEL, messages=messages, options={"num_predict": 8, "temperature": 0})
    says_words(o.message.content or "")
    # streamed too: the pieces join to words, with no template tokens among them
    pieces = [
        p.choices[0].delta.content or ""
        async for p in await oa.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        if p.choices
    ]
    says_words("".join(pieces))


# ---------------------------------------------------------------- swaps


async def test_a_swap_storm_between_two_real_models_serves_every_request(
    tmp_path, nats_url, llama_server_bin, real_gguf
):
    # Room for one on the simulated GPU: each wave makes the two take turns.
    models = {
        name: served_as_configured(real_gguf, memory_mib=1200, aliases=[])
        for name in ("gemma-a", "gemma-b")
    }
    s = Stack(
        tmp_path,
        nats_url,
        models,
        agent__gpus=[{"name": "sim", "memory_mib": 2000}],
        placer={"failure_backoff": 10, "min_turn": 1, "drain_timeout": 60},
    )
    s.patch_config(gateway={"cold_start_timeout": WAIT_S})
    s.start()

    async def ask(c: httpx.AsyncClient, model: str, n: int) -> tuple[int, str]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "max_tokens": 6,
            "temperature": 0,  # a base model: sampled answers are sometimes digits
        }
        r = await c.post(f"{s.base}/v1/chat/completions", json=body)
        return r.status_code, r.json()["choices"][0]["message"][
            "content"
        ] if r.is_success else r.text

    try:
        async with httpx.AsyncClient(timeout=WAIT_S) as c:
            answers = []
            for wave in range(2):
                answers += await asyncio.gather(
                    *(ask(c, ("gemma-a", "gemma-b")[n % 2], wave * 10 + n) for n in range(6))
                )
    finally:
        s.stop()
    assert [code for code, _ in answers] == [200] * 12, answers
    for _, answer in answers:
        says_words(answer)
    assert s.logs().count(": ready") >= 3, s.logs()[-3000:]  # a, b, then a swap back


async def test_a_warm_swap_answers_a_long_conversation_in_a_third_of_the_cold_time(
    gemma, bus, tmp_path
):
    conversation = text(1100, seed=3)  # ~1,400 tokens
    async with httpx.AsyncClient(timeout=WAIT_S) as c:
        await streamed_ttft(c, gemma.base, "Hello")  # the model is up: TTFT is prefill only
        cold_ttft, cold = await streamed_ttft(c, gemma.base, conversation)
        await stopped(bus, MODEL)  # its slot is saved
        await bus.emit(proto.Demand(model=MODEL, gateway_id="test"))  # `lls load`: restored
        await ready(bus, MODEL)
        warm_ttft, warm = await streamed_ttft(c, gemma.base, conversation + " and the end.")
    assert cold["prompt_n"] > 1000, cold  # the whole conversation was evaluated ...
    assert warm["prompt_n"] < 50, warm  # ... and after the swap only what is new
    assert warm_ttft <= cold_ttft / 3, (warm_ttft, cold_ttft)


# ---------------------------------------------------------------- prefix routing


async def test_prefix_routing_evaluates_each_long_system_prompt_once(
    tmp_path, nats_url, llama_server_bin, real_gguf, bus
):
    models = {
        MODEL: served_as_configured(real_gguf, memory_mib=1200, replicas={"min": 2, "max": 2})
    }
    s = Stack(
        tmp_path,
        nats_url,
        models,
        agent__gpus=ONE_EACH,
        gateway__routing="prefix",
        gateway__prefix_chars=256,  # within the system prompts (~1,200 characters each)
    )
    s.patch_config(gateway={"cold_start_timeout": WAIT_S})
    s.start()
    try:
        async with httpx.AsyncClient(timeout=WAIT_S) as c:
            wake = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
            assert (await c.post(f"{s.base}/v1/completions", json=wake)).status_code == 200
            replicas = await Replicas.of(bus, await ready(bus, MODEL, 2))
            await asyncio.sleep(1.0)  # the gateway's view follows the bucket (a watch)
            sent = evaluated = 0
            for i in range(4):
                system = f"You are assistant {i}. Remember: {text(200, seed=10 + i)}"
                homes, costs = set(), []
                for q in range(3):
                    body = {
                        "model": MODEL,
                        "messages": [
                            {"role": "system", "content": system},
                            {"role": "user", "content": f"Question {q}?"},
                        ],
                        "max_tokens": 2,
                    }
                    usage: dict = {}

                    async def send(body=body, usage=usage) -> None:  # noqa: ANN001
                        r = await c.post(f"{s.base}/v1/chat/completions", json=body)
                        assert r.status_code == 200, r.text
                        usage.update(r.json()["usage"])

                    home, tokens = await replicas.served_by(c, send)
                    homes.add(home)
                    costs.append(tokens)
                    sent += usage["prompt_tokens"]
                    evaluated += tokens
                assert len(homes) == 1, homes  # one home per system prompt
                assert costs[0] > 200 and max(costs[1:]) < costs[0] / 3, costs
    finally:
        s.stop()
    assert evaluated <= 0.5 * sent, (evaluated, sent)


# ---------------------------------------------------------------- memory


async def test_the_cpu_memory_estimate_covers_the_real_rss_within_10_percent(
    gemma, bus, tmp_path, real_gguf
):
    # The load that makes the process largest: a long prompt, then a chat in every slot.
    async with httpx.AsyncClient(timeout=WAIT_S) as c:
        await streamed_ttft(c, gemma.base, text(1400, seed=5))
        chats = [[] for _ in range(4)]
        for turn in range(3):
            for k, chat in enumerate(chats):
                chat.append({"role": "user", "content": text(60, seed=100 * k + turn)})
                body = {"model": MODEL, "messages": chat, "max_tokens": 8}
                r = await c.post(f"{gemma.base}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                chat.append(
                    {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}
                )
    [rec] = await ready(bus, MODEL)
    [pid] = llama_server_pids(str(tmp_path))
    peak_mib = peak_rss_mib(pid)

    ctx = served_as_configured(real_gguf)["ctx_size"]
    summary = read_summary(real_gguf)
    expected = estimate_mib(summary, real_gguf.stat().st_size, ctx, n_gpu_layers=0).total_mib
    assert rec.gpus == [] and rec.memory_mib == expected  # the placer reserved the CPU figure
    assert peak_mib <= rec.memory_mib <= 1.10 * peak_mib, (rec.memory_mib, peak_mib)
