"""Prefix-aware routing vs round robin among two replicas of one model (issue 11, benchmark 2).

Two replicas (replicas.min = max = 2), eight distinct ~1,000-token system prompts, 400
streamed chat requests in one seeded random order with short user turns and short answers.
For each routing mode, on a fresh stack: the prompt tokens llama-server actually evaluated
(`timings.prompt_n` of each answer, checked against the instances' own /metrics) and TTFT
p50 / p90 at the client, side by side with the ratio. Run twice: with llama-server's default
host-RAM prompt cache (`--cache-ram`, 8 GiB, which restores a prefix a slot has lost within
one process and so narrows the gap) and with `--cache-ram 0` (only the slots' own KV caches:
the condition the issue's goal assumes).

    .venv/bin/python bench/bench_prefix.py [--requests 400] [--clients 8] [--slots 8]
        [--seed 1] [--cache default,off] [--load-factor 1.25] [--keep DIR]

What decides the gap: llama-server caches a prompt per slot and does not share a prefix
between slots. A request whose prefix sits in a busy slot (another request of the same prefix
runs there) takes another slot and overwrites what that one held. Prefix routing gathers each
prefix's requests on one replica, so under high concurrency it also gathers those collisions;
it wins most where each replica's slots can hold its share of the prefixes but not all of them
and same-prefix requests rarely overlap (e.g. `--clients 2 --slots 4`). The bounded load sends
requests past ceil(1.25 x average) to the other replica, where they miss; and 8 keys hashed
onto 2 replicas split unevenly about half the time (5/3 or worse: printed as "system prompts
per home replica").

gateway.prefix_chars is 256 here: the tiny test model's byte-level vocabulary makes 1,000
tokens about 800 characters, and the key must cover the shared system prompt, not the user
turn after it (with real vocabularies 1,000 tokens are ~4,000 characters, past the default
2,048).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]

import proto  # noqa: E402
from conftest import NatsServer  # noqa: E402
from lls import instance_key  # noqa: E402
from lls.bus import connect, kv_snapshot  # noqa: E402
from make_tiny_gguf import write  # noqa: E402
from services.gateway import affinity  # noqa: E402
from stack import Stack  # noqa: E402

N_PROMPTS = 8
PROMPT_WORDS = 145  # about 1,000 tokens with the tiny model's vocabulary
MAX_TOKENS = 8
# Slots per replica. A slot's KV cache is what a request reuses, and a request of a prefix
# whose slot is busy takes (and overwrites) another: with as many slots as requests in flight
# per replica, hits are rare in both modes. 8 slots for ~4 requests in flight per replica.
SLOTS = 8
PREFIX_CHARS = 256
ONE_EACH = [{"name": "sim", "memory_mib": 2000}, {"name": "sim", "memory_mib": 2000}]
WORDS = "the a hello world is and of to model river lamp bakery garden stone".split()
PROMPT_TOKENS = re.compile(r"^llamacpp:prompt_tokens_total (\S+)$", re.M)


def system_prompts(seed: int) -> list[str]:
    out = []
    for i in range(N_PROMPTS):
        rng = random.Random(seed * 1000 + i)
        words = " ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS))
        out.append(f"Assistant {i} of the benchmark. Follow these notes: {words}")
    return out


def key(prompt: str) -> str | None:
    body = {"messages": [{"role": "system", "content": prompt}, {"role": "user", "content": "?"}]}
    return affinity.prefix_key(json.dumps(body).encode(), "/v1/chat/completions", PREFIX_CHARS)


def schedule(n: int, seed: int) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    return [(rng.randrange(N_PROMPTS), f"question {rng.randrange(10**6)}?") for _ in range(n)]


@dataclass
class Result:
    evaluated: int = 0  # prompt tokens evaluated, from the answers' timings.prompt_n
    prompt_total: int = 0  # prompt tokens sent, from usage.prompt_tokens
    metrics_evaluated: float = 0.0  # the same from the instances' /metrics
    ttft: list[float] = field(default_factory=list)
    failed: int = 0
    why_failed: collections.Counter[str] = field(default_factory=collections.Counter)
    wall: float = 0.0
    per_replica: dict[str, float] = field(default_factory=dict)
    homes: list[int] = field(default_factory=list)  # the prompts' home replicas, as counts


async def one(c: httpx.AsyncClient, base: str, body: dict, res: Result) -> None:
    t0 = time.monotonic()
    first = None
    last: dict = {}
    async with c.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            res.failed += 1
            res.why_failed[f"status {r.status_code}: {r.text[:120]}"] += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            # llama-server sends the role chunk with the first token, after the prefill (a
            # token's text may be empty: a byte of an unfinished UTF-8 character)
            if first is None and chunk.get("choices"):
                first = time.monotonic() - t0
            if "timings" in chunk or "usage" in chunk:
                last.update(chunk)
    if first is None or "timings" not in last:
        res.failed += 1
        res.why_failed["no token" if first is None else "no timings"] += 1
        return
    res.ttft.append(first)
    res.evaluated += int(last["timings"]["prompt_n"])
    res.prompt_total += int((last.get("usage") or {}).get("prompt_tokens", 0))


async def ready_replicas(nats_url: str, timeout: float = 120) -> list[proto.InstanceRecord]:
    bus = await connect(nats_url, "bench")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
            ready = [r for r in recs.values() if r.state == proto.InstanceState.READY]
            if len(ready) == 2:
                return ready
            await asyncio.sleep(0.25)
        raise RuntimeError("two replicas did not become ready")
    finally:
        await bus.close()


async def prompt_tokens(c: httpx.AsyncClient, nats_url: str, recs: list[proto.InstanceRecord]):  # noqa: ANN201
    bus = await connect(nats_url, "bench")  # the operator's identity may read instance keys
    try:
        keys = {
            r.instance_id: await instance_key.read(bus, r.host or "", r.instance_id) for r in recs
        }
    finally:
        await bus.close()
    out = {}
    for r in recs:
        key = keys[r.instance_id].key  # type: ignore[union-attr]
        resp = await c.get(f"{r.endpoint}/metrics", headers={"Authorization": f"Bearer {key}"})
        out[r.instance_id] = float(PROMPT_TOKENS.search(resp.text).group(1))  # type: ignore[union-attr]
    return out


async def run(
    tmp: Path, gguf: Path, routing: str, cache_ram: bool, args: argparse.Namespace
) -> Result:
    nats = NatsServer(tmp / "nats")
    nats.start()
    extra = [] if cache_ram else ["--cache-ram", "0"]
    models = {
        "tiny": {
            "url": f"file://{gguf}",
            "memory_mib": 1200,
            "ctx_size": args.slots * 1152,  # a system prompt and its turn fit each slot
            "args": ["-t", "1", "-np", str(args.slots), *extra],
            "replicas": {"min": 2, "max": 2},
        }
    }
    s = Stack(
        tmp,
        nats.url,
        models,
        agent__gpus=ONE_EACH,
        gateway__routing=routing,
        gateway__prefix_chars=PREFIX_CHARS,
        gateway__cold_start_timeout=120,
        **(
            {"gateway__prefix_load_factor": args.load_factor}
            if args.load_factor is not None
            else {}
        ),
    )
    s.start()
    prompts = system_prompts(args.seed)
    try:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            wake = {"model": "tiny", "prompt": "hi", "max_tokens": 1}  # no system prompt cached
            r = await c.post(f"{s.base}/v1/completions", json=wake)
            r.raise_for_status()
            recs = await ready_replicas(nats.url)
            await asyncio.sleep(1.0)  # the gateway's view follows the bucket
            before = await prompt_tokens(c, nats.url, recs)
            res = Result()
            # Where the gateway's ring puts each system prompt (the same pure functions): with
            # 8 keys on 2 replicas the split is binomial, and an uneven one costs hits.
            ring = affinity.Ring(r.instance_id for r in recs)
            homes = collections.Counter(next(iter(ring.walk(key(p)))) for p in prompts)
            res.homes = sorted((homes.get(r.instance_id, 0) for r in recs), reverse=True)
            todo = list(schedule(args.requests, args.seed))
            todo.reverse()

            async def client() -> None:
                while todo:
                    i, question = todo.pop()
                    body = {
                        "model": "tiny",
                        "messages": [
                            {"role": "system", "content": prompts[i]},
                            {"role": "user", "content": question},
                        ],
                        "max_tokens": MAX_TOKENS,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    await one(c, s.base, body, res)

            t0 = time.monotonic()
            await asyncio.gather(*(client() for _ in range(args.clients)))
            res.wall = time.monotonic() - t0
            after = await prompt_tokens(c, nats.url, recs)
            res.per_replica = {iid: after[iid] - before[iid] for iid in after}
            res.metrics_evaluated = sum(res.per_replica.values())
            return res
    finally:
        s.stop()
        nats.stop()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1000 if xs else float("nan")


def report(cache: str, results: dict[str, Result]) -> None:
    p, rr = results["prefix"], results["round_robin"]
    print(f"\n--cache-ram {cache}: {len(p.ttft) + p.failed} requests per mode")
    print(f"  {'':34} {'prefix':>12} {'round_robin':>12} {'ratio':>8}")

    def line(name: str, a: float, b: float, fmt: str = "{:12.0f}") -> None:
        ratio = a / b if b else float("nan")
        print(f"  {name:34} {fmt.format(a)} {fmt.format(b)} {ratio:8.3f}")

    line("prompt tokens sent", p.prompt_total, rr.prompt_total)
    line("prompt tokens evaluated (timings)", p.evaluated, rr.evaluated)
    line("prompt tokens evaluated (/metrics)", p.metrics_evaluated, rr.metrics_evaluated)
    line("TTFT p50 (ms)", pct(p.ttft, 0.5), pct(rr.ttft, 0.5), "{:12.1f}")
    line("TTFT p90 (ms)", pct(p.ttft, 0.9), pct(rr.ttft, 0.9), "{:12.1f}")
    line("mean TTFT (ms)", statistics.fmean(p.ttft) * 1000, statistics.fmean(rr.ttft) * 1000)
    line("wall (s)", p.wall, rr.wall, "{:12.1f}")
    print(f"  failed: prefix {p.failed}, round_robin {rr.failed}")
    for name, r in results.items():
        for why, n in r.why_failed.items():
            print(f"    {name}: {n} x {why}")
    split = lambda r: "/".join(f"{v:.0f}" for v in sorted(r.per_replica.values()))  # noqa: E731
    print(f"  evaluated per replica: prefix {split(p)}, round_robin {split(rr)}")
    print(f"  system prompts per home replica (prefix run): {'/'.join(map(str, p.homes))}")
    fewer = 1 - p.evaluated / rr.evaluated if rr.evaluated else float("nan")
    print(f"  => prefix routing evaluated {fewer:.1%} fewer prompt tokens than round robin")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--slots", type=int, default=SLOTS, help="-np of each replica")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default="default,off", help="default,off: --cache-ram settings")
    ap.add_argument("--keep", default="", help="keep logs under this folder")
    ap.add_argument(
        "--load-factor", type=float, default=None, help="gateway.prefix_load_factor (1.25)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(args.keep) if args.keep else Path(d)
        base.mkdir(parents=True, exist_ok=True)
        gguf = base / "tiny.gguf"
        write(gguf, 77)
        print(
            f"{args.requests} streamed chats over {N_PROMPTS} system prompts, "
            f"{args.clients} clients, 2 replicas x {args.slots} slots, max_tokens {MAX_TOKENS}, "
            f"prefix_load_factor {args.load_factor or 1.25}"
        )
        for cache in args.cache.split(","):
            results = {}
            for routing in ("prefix", "round_robin"):
                tmp = base / f"{cache}-{routing}"
                tmp.mkdir(parents=True, exist_ok=True)
                results[routing] = await run(tmp, gguf, routing, cache == "default", args)
                r = results[routing]
                print(
                    f"  [{cache} {routing}] evaluated {r.evaluated} of {r.prompt_total} "
                    f"prompt tokens, TTFT p50 {pct(r.ttft, 0.5):.1f} ms",
                    flush=True,
                )
            report("8192 (default)" if cache == "default" else "0", results)


if __name__ == "__main__":
    asyncio.run(main())
