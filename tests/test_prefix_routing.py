"""Prefix routing on the real stack (NATS, placer, agent, two llama-server replicas, gateway):
requests that share a prompt's start meet on one replica while load is low, as llama-server's
own counters show; different starts spread over both; a burst of one start spills past the
load bound to the other replica."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

import proto
from lls import instance_key
from lls.bus import Bus, kv_snapshot
from stack import Stack

ONE_EACH = [{"name": "sim", "memory_mib": 2000}, {"name": "sim", "memory_mib": 2000}]
PREFIX_CHARS = 128  # keys cover the system prompts below (each is longer) and nothing else
WORDS = "the a hello world is and of to model river lamp bakery".split()
COUNTERS = re.compile(r"^llamacpp:(prompt_tokens_total|tokens_predicted_total) (\S+)$", re.M)


def system_prompt(i: int) -> str:
    words = " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(60))
    return f"You are assistant number {i}. {words}"


def chat(i: int, question: str, max_tokens: int = 4) -> dict:
    return {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": system_prompt(i)},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


class Replicas:
    """The model's READY instances and their own llama-server counters (with their keys)."""

    def __init__(self, recs: list[proto.InstanceRecord], keys: dict[str, str]):
        self.recs = sorted(recs, key=lambda r: r.instance_id)
        self.auth = {iid: {"Authorization": f"Bearer {key}"} for iid, key in keys.items()}

    @classmethod
    async def of(cls, bus: Bus, recs: list[proto.InstanceRecord]) -> Replicas:
        """With the keys the placer issued (read as the operator: hosts cannot)."""
        keys = {}
        for r in recs:
            placed = await instance_key.read(bus, r.host or "", r.instance_id)
            assert placed is not None, f"no key issued for {r.instance_id}"
            keys[r.instance_id] = placed.key
        return cls(recs, keys)

    async def counters(self, c: httpx.AsyncClient) -> dict[str, dict[str, float]]:
        out = {}
        for r in self.recs:
            resp = await c.get(f"{r.endpoint}/metrics", headers=self.auth[r.instance_id])
            resp.raise_for_status()
            out[r.instance_id] = {k: float(v) for k, v in COUNTERS.findall(resp.text)}
        return out

    async def served_by(self, c: httpx.AsyncClient, send) -> tuple[str, float]:  # noqa: ANN001
        """Send one request alone; (the instance that evaluated its prompt, tokens it did)."""
        before = await self.counters(c)
        await send()
        after = await self.counters(c)
        moved = {
            iid: after[iid]["prompt_tokens_total"] - before[iid]["prompt_tokens_total"]
            for iid in after
        }
        busy = [iid for iid, n in moved.items() if n > 0]
        assert len(busy) == 1, moved
        return busy[0], moved[busy[0]]


@pytest.fixture
async def two_replicas(tmp_path, nats_url, llama_server_bin, tiny_gguf, bus):
    models = {
        "tiny": {
            "url": f"file://{tiny_gguf(51)}",
            "memory_mib": 1200,
            "ctx_size": 4096,
            "args": ["-t", "1", "-np", "2"],
            "replicas": {"min": 2, "max": 2},
        }
    }
    s = Stack(
        tmp_path,
        nats_url,
        models,
        agent__gpus=ONE_EACH,
        placer={"failure_backoff": 10},
        gateway__routing="prefix",
        gateway__prefix_chars=PREFIX_CHARS,
        gateway__prefix_load_factor=1.25,
    )
    s.start()
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            r = await c.post(f"{s.base}/v1/chat/completions", json=chat(0, "wake up"))
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 90  # replicas.min starts the second one
            ready: list[proto.InstanceRecord] = []
            while time.monotonic() < deadline:
                recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
                ready = [
                    r
                    for r in recs.values()
                    if r.model == "tiny" and r.state == proto.InstanceState.READY
                ]
                if len(ready) == 2:
                    break
                await asyncio.sleep(0.25)
            assert len(ready) == 2, f"replicas.min 2 gave {len(ready)} ready:\n{s.logs()[-3000:]}"
            await asyncio.sleep(1.0)  # the gateway's view follows the bucket (a watch)
        yield s, await Replicas.of(bus, ready)
    finally:
        s.stop()


async def test_prefix_affinity_spread_and_spill(two_replicas):
    s, replicas = two_replicas
    async with httpx.AsyncClient(timeout=120) as c:

        async def openai(i: int, q: str) -> None:
            r = await c.post(f"{s.base}/v1/chat/completions", json=chat(i, q))
            assert r.status_code == 200, r.text

        async def ollama(i: int, q: str) -> None:
            body = chat(i, q)
            body = {
                "model": "tiny",
                "messages": body["messages"],
                "stream": False,
                "options": {"num_predict": 4},
            }
            r = await c.post(f"{s.base}/api/chat", json=body)
            assert r.status_code == 200, r.text

        # 1. One system prompt, many questions, one at a time, OpenAI and Ollama routes: every
        # request meets the same replica, which evaluates the shared prompt only once.
        where: list[str] = []
        evaluated: list[float] = []
        for n in range(8):
            send = openai if n % 2 == 0 else ollama
            iid, tokens = await replicas.served_by(c, lambda n=n, send=send: send(1, f"q{n}?"))
            where.append(iid)
            evaluated.append(tokens)
        assert len(set(where)) == 1, where
        home = where[0]
        full = evaluated[0]
        assert full > 150  # the system prompt's tokens, evaluated once ...
        assert max(evaluated[1:]) < full / 3, evaluated  # ... and reused from the slot after

        # ... and raw completions sharing a prompt's start (Ollama's raw generate lands here).
        story = system_prompt(40)
        where = []
        for n in range(4):
            body = {"model": "tiny", "prompt": f"{story} part {n}", "max_tokens": 4}
            if n % 2:
                body = {
                    "model": "tiny",
                    "prompt": body["prompt"],
                    "raw": True,
                    "stream": False,
                    "options": {"num_predict": 4},
                }
                url = f"{s.base}/api/generate"
            else:
                url = f"{s.base}/v1/completions"

            async def complete(url=url, body=body) -> None:  # noqa: ANN001
                r = await c.post(url, json=body)
                assert r.status_code == 200, r.text

            iid, _ = await replicas.served_by(c, complete)
            where.append(iid)
        assert len(set(where)) == 1, where

        # 2. Different system prompts spread over both replicas, each one keeping its own.
        owner: dict[int, str] = {}
        for i in range(2, 18):
            owner[i], _ = await replicas.served_by(c, lambda i=i: openai(i, "first"))
        assert set(owner.values()) == {r.instance_id for r in replicas.recs}, owner
        for i in range(2, 8):
            again, _ = await replicas.served_by(c, lambda i=i: openai(i, "second"))
            assert again == owner[i], (i, again, owner[i])

        # 3. Two at once (within the home's 2 slots and the bound, ceil(1.25 x 2 / 2) = 2):
        # both stay home.
        before = await replicas.counters(c)
        pair = await asyncio.gather(
            *(
                c.post(f"{s.base}/v1/chat/completions", json=chat(1, f"pair {n}", 200))
                for n in range(2)
            )
        )
        assert [r.status_code for r in pair] == [200, 200]
        after = await replicas.counters(c)
        home_tokens = after[home]["tokens_predicted_total"] - before[home]["tokens_predicted_total"]
        assert home_tokens == 400, (after, before)

        # 4. A burst of the first prompt, more than the home replica's slots: the home takes
        # it up to the bound (1.25 x the average, at most its 2 slots; the gateway admits 4 at
        # a time, the model's slots), the rest spill over to the other replica.
        before = await replicas.counters(c)
        burst = 12
        tokens = 400  # long enough that the whole burst is in flight together
        replies = await asyncio.gather(
            *(
                c.post(f"{s.base}/v1/chat/completions", json=chat(1, f"burst {n}", tokens))
                for n in range(burst)
            )
        )
        assert [r.status_code for r in replies] == [200] * burst
        after = await replicas.counters(c)
        served = {
            iid: round(
                (after[iid]["tokens_predicted_total"] - before[iid]["tokens_predicted_total"])
                / tokens
            )
            for iid in after
        }
        other = next(iid for iid in served if iid != home)
        assert sum(served.values()) == burst, served
        assert served[other] >= 2, served  # spilled past the bound
        assert served[home] >= 2, served  # while the home kept its share
