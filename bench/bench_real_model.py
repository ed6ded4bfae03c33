"""The real demo model on this machine: Gemma 3 270M Q4_K_M (config.yaml's `gemma3`, launched
as configured there) on the CPU, through the whole stack (NATS, placer, agent with the process
runtime, llama-server, gateway). Each figure against its goal; every ratio is against a
baseline measured in the same run.

  1. cold start to first token: a request for a stopped model until its first streamed token
     (the file already in the host's store), and the very first (copied into the store too)
  2. tokens/s generated, straight to the instance's llama-server vs through the gateway, at 1
     and 8 clients (each streams `--max-tokens` with ignore_eos)      goal: gateway >= 0.95 x
     direct at 8 clients
  3. warm swap: the next turn of a ~2,000-token conversation after its model was stopped and
     loaded again, TTFT with the slot restored vs a conversation never saved (full prefill);
     also asked of the stopped model (start included)                 goal: warm <= 1/3 cold
  4. prefix routing vs round robin: two replicas (simulated GPUs), eight ~500-token system
     prompts, short questions in one seeded order: prompt tokens llama-server evaluated
  5. the CPU memory estimate (what the placer reserved) vs the process's peak RSS after a long
     prompt and a chat in every slot                    goal: within [real, real + 10%]

A benchmark that prints figures, not a test; ~10 minutes on 2 cores.

    .venv/bin/python bench/bench_real_model.py [--rounds 3] [--max-tokens 64]
        [--requests 40] [--clients 4] [--slots N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]

from bench_prefix import PREFIX_CHARS, Result, key, one, pct, prompt_tokens, ready_replicas  # noqa: E402

import proto  # noqa: E402
from conftest import NatsServer  # noqa: E402
from lls import instance_key, real_model  # noqa: E402
from lls.bus import Bus, connect, kv_snapshot  # noqa: E402
from services.gateway import affinity  # noqa: E402
from stack import Stack, llama_server_pids  # noqa: E402

MODEL = "gemma3"
WAIT_S = 300.0
WORDS = (
    "the river lamp bakery garden stone north window music paper green quiet city morning "
    "letter bridge silver winter story friend market harbour candle forest"
).split()
ONE_EACH = [{"name": "sim", "memory_mib": 2000}, {"name": "sim", "memory_mib": 2000}]


def configured(path: Path, **extra: object) -> dict:
    entry = yaml.safe_load((ROOT / "config.yaml").read_text())["models"][MODEL]
    return {**entry, "url": f"file://{path}", **extra}


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def instances(bus: Bus, state: proto.InstanceState) -> list[proto.InstanceRecord]:
    recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
    return [r for r in recs.values() if r.model == MODEL and r.state is state]


async def until(what: str, check) -> None:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stop(bus: Bus) -> None:
    await bus.emit(proto.StopRequested(model=MODEL, requested_by="bench"))
    live = proto.LIVE_STATES | {proto.InstanceState.STOPPING}

    async def none_live() -> bool:
        recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
        return not [r for r in recs.values() if r.model == MODEL and r.state in live]

    await until("the stop", none_live)


async def loaded(bus: Bus) -> proto.InstanceRecord:
    """`lls load`: the model's READY instance (a saved slot is restored before READY)."""
    await bus.emit(proto.Demand(model=MODEL, gateway_id="bench"))

    async def ready() -> bool:
        return bool(await instances(bus, proto.InstanceState.READY))

    await until("the model", ready)
    return (await instances(bus, proto.InstanceState.READY))[0]


async def stream(
    c: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None
) -> tuple[float, int, dict]:
    """A streamed completion: (seconds to the first token, tokens generated, timings)."""
    t0 = time.perf_counter()
    ttft, tokens, timings = None, 0, {}
    async with c.stream("POST", url, json={**body, "stream": True}, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                tokens += 1  # llama-server streams one chunk per token
                if ttft is None:
                    ttft = time.perf_counter() - t0
            timings = chunk.get("timings") or timings
    if ttft is None:
        raise RuntimeError("no token streamed")
    return ttft, int(timings.get("predicted_n", tokens)), timings


def completion(prompt: str, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


async def throughput(
    c: httpx.AsyncClient, url: str, clients: int, max_tokens: int, headers: dict | None
) -> float:
    """Generated tokens per second, `clients` streams at once (each its own short prompt)."""
    t0 = time.perf_counter()
    counts = await asyncio.gather(
        *(
            stream(
                c,
                url,
                completion(f"Story {n}: {text(12, n)}", max_tokens) | {"ignore_eos": True},
                headers,
            )
            for n in range(clients)
        )
    )
    return sum(n for _, n, _ in counts) / (time.perf_counter() - t0)


def folder(base: Path, name: str) -> Path:
    (base / name).mkdir(parents=True, exist_ok=True)
    return base / name


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    if not found:
        raise RuntimeError(f"no VmHWM for {pid}")
    return int(found.group(1)) / 1024


# ---------------------------------------------------------------- one instance: 1, 2, 3, 5


async def single(tmp: Path, nats: NatsServer, gguf: Path, args: argparse.Namespace) -> dict:
    s = Stack(tmp, nats.url, {MODEL: configured(gguf)})
    s.patch_config(gateway={"cold_start_timeout": WAIT_S})
    s.start()
    bus = await connect(nats.url, "bench")
    out: dict = {}
    gw = f"{s.base}/v1/completions"
    try:
        async with httpx.AsyncClient(timeout=WAIT_S, limits=httpx.Limits(max_connections=64)) as c:
            # 1. cold starts
            out["first_ttft"], _, _ = await stream(c, gw, completion("Hello", 4))
            cold = []
            for _ in range(args.rounds):
                await stop(bus)
                ttft, _, _ = await stream(c, gw, completion("Hello", 4))
                cold.append(ttft)
            out["cold_ttft"] = med(cold)

            # 2. tokens/s, direct vs gateway
            rec = (await instances(bus, proto.InstanceState.READY))[0]
            placed = await instance_key.read(bus, rec.host or "", rec.instance_id)
            assert placed is not None, f"no key issued for {rec.instance_id}"
            auth = {"Authorization": f"Bearer {placed.key}"}
            direct = f"{rec.endpoint}/v1/completions"
            await throughput(c, direct, 1, 8, auth)  # warm up both paths
            await throughput(c, gw, 1, 8, None)
            for clients in (1, 8):
                d, g = [], []
                for _ in range(args.rounds):  # interleaved: drift on a shared machine hits both
                    d.append(await throughput(c, direct, clients, args.max_tokens, auth))
                    g.append(await throughput(c, gw, clients, args.max_tokens, None))
                out[f"tps_direct_{clients}"], out[f"tps_gateway_{clients}"] = med(d), med(g)

            # 3. warm swap vs cold on a long conversation
            ready_warm: list[float] = []
            ready_cold: list[float] = []
            stopped_warm: list[float] = []
            stopped_cold: list[float] = []
            sizes: list[float] = []
            restored: list[float] = []
            for i in range(args.rounds):
                saved, fresh = text(args.words, 10 + i), text(args.words, 100 + i)
                _, _, t = await stream(c, gw, completion(saved, 4))
                sizes.append(t.get("prompt_n", 0))
                await stop(bus)  # its slot is saved
                await loaded(bus)  # ... and restored while it starts
                ttft, _, t = await stream(c, gw, completion(saved + " and then?", 4))
                ready_warm.append(ttft)
                restored.append(t.get("prompt_n", -1))
                ttft, _, _ = await stream(c, gw, completion(fresh + " and then?", 4))
                ready_cold.append(ttft)  # never saved: the whole prefill
                # asked of the stopped model: start, restore or prefill, first token
                saved2, fresh2 = text(args.words, 200 + i), text(args.words, 300 + i)
                await stream(c, gw, completion(saved2, 4))
                await stop(bus)
                ttft, _, _ = await stream(c, gw, completion(saved2 + " and then?", 4))
                stopped_warm.append(ttft)
                await stop(bus)
                ttft, _, _ = await stream(c, gw, completion(fresh2 + " and then?", 4))
                stopped_cold.append(ttft)
            out |= {
                "conv_tokens": med(sizes),
                "warm_prompt_n": med(restored),
                "warm_ttft": med(ready_warm),
                "cold_conv_ttft": med(ready_cold),
                "warm_stopped_ttft": med(stopped_warm),
                "cold_stopped_ttft": med(stopped_cold),
            }

            # 5. memory: a fresh instance, a long prompt, then a chat in every slot
            await stop(bus)
            rec = await loaded(bus)
            await stream(c, gw, completion(text(1400, 7), 4))
            chats: list[list[dict]] = [[] for _ in range(4)]
            for turn in range(3):
                for k, chat in enumerate(chats):
                    chat.append({"role": "user", "content": text(60, 1000 * k + turn)})
                    body = {"model": MODEL, "messages": chat, "max_tokens": 8}
                    r = await c.post(f"{s.base}/v1/chat/completions", json=body)
                    r.raise_for_status()
                    answer = r.json()["choices"][0]["message"]["content"]
                    chat.append({"role": "assistant", "content": answer})
            [pid] = llama_server_pids(str(tmp))
            out["rss_mib"], out["estimate_mib"] = peak_rss_mib(pid), rec.memory_mib
    finally:
        await bus.close()
        s.stop()
    return out


# ---------------------------------------------------------------- two replicas: 4


async def routed(
    tmp: Path, nats: NatsServer, gguf: Path, routing: str, args: argparse.Namespace
) -> Result:
    model = configured(gguf, memory_mib=1200, replicas={"min": 2, "max": 2})
    if args.slots:  # else llama-server's own default (4), as config.yaml runs it
        model["args"] = [*model["args"], "-np", str(args.slots)]
    models = {MODEL: model}
    s = Stack(
        tmp,
        nats.url,
        models,
        agent__gpus=ONE_EACH,
        gateway__routing=routing,
        gateway__prefix_chars=PREFIX_CHARS,  # within each system prompt
    )
    s.patch_config(gateway={"cold_start_timeout": WAIT_S})
    s.start()
    prompts = [f"Assistant {i}. Remember: {text(400, 50 + i)}" for i in range(8)]
    rng = random.Random(1)
    todo = [(rng.randrange(8), f"question {rng.randrange(10**6)}?") for _ in range(args.requests)]
    todo.reverse()
    try:
        async with httpx.AsyncClient(timeout=WAIT_S) as c:
            wake = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
            (await c.post(f"{s.base}/v1/completions", json=wake)).raise_for_status()
            recs = await ready_replicas(nats.url, WAIT_S)
            await asyncio.sleep(1.0)  # the gateway's view follows the bucket
            before = await prompt_tokens(c, nats.url, recs)
            res = Result()
            ring = affinity.Ring(r.instance_id for r in recs)  # the gateway's own functions
            homes = collections.Counter(next(iter(ring.walk(key(p)))) for p in prompts)
            res.homes = sorted((homes.get(r.instance_id, 0) for r in recs), reverse=True)

            async def client() -> None:
                while todo:
                    i, question = todo.pop()
                    body = {
                        "model": MODEL,
                        "messages": [
                            {"role": "system", "content": prompts[i]},
                            {"role": "user", "content": question},
                        ],
                        "max_tokens": 4,
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


# ---------------------------------------------------------------- report


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    load1 = os.getloadavg()[0]
    return f"{cpu}, {os.cpu_count()} cores, load average {load1:.1f} at the start"


def report(one_: dict, prefix: Result, rr: Result) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    gw8 = one_["tps_gateway_8"] / one_["tps_direct_8"]
    gw1 = one_["tps_gateway_1"] / one_["tps_direct_1"]
    warm = one_["warm_ttft"] / one_["cold_conv_ttft"]
    est, rss = one_["estimate_mib"], one_["rss_mib"]
    rows = [
        ("cold start to first token (file in the store)", f"{one_['cold_ttft']:.2f} s", "", ""),
        ("first start to first token (file copied in)", f"{one_['first_ttft']:.2f} s", "", ""),
        (
            "tokens/s, 1 client: gateway / direct",
            f"{one_['tps_gateway_1']:.1f} / {one_['tps_direct_1']:.1f}",
            f"{gw1:.2f}",
            "",
        ),
        (
            "tokens/s, 8 clients: gateway / direct",
            f"{one_['tps_gateway_8']:.1f} / {one_['tps_direct_8']:.1f}",
            f"{gw8:.2f}",
            f">= 0.95: {verdict(gw8 >= 0.95)}",
        ),
        (
            f"warm swap TTFT, {one_['conv_tokens']:.0f}-token conversation: restored / cold",
            f"{one_['warm_ttft']:.2f} / {one_['cold_conv_ttft']:.2f} s",
            f"{warm:.2f}",
            f"<= 0.33: {verdict(warm <= 1 / 3)}",
        ),
        (
            "  the same asked of the stopped model (start included)",
            f"{one_['warm_stopped_ttft']:.2f} / {one_['cold_stopped_ttft']:.2f} s",
            f"{one_['warm_stopped_ttft'] / one_['cold_stopped_ttft']:.2f}",
            "",
        ),
        (
            "  prompt tokens evaluated after the restore",
            f"{one_['warm_prompt_n']:.0f} of {one_['conv_tokens']:.0f}",
            "",
            "",
        ),
        (
            f"prefix routing vs round robin: prompt tokens evaluated ({len(prefix.ttft)} chats)",
            f"{prefix.evaluated} / {rr.evaluated}",
            f"{prefix.evaluated / rr.evaluated:.2f}" if rr.evaluated else "n/a",
            "",
        ),
        (
            "  TTFT p50, prefix / round robin",
            f"{pct(prefix.ttft, 0.5):.0f} / {pct(rr.ttft, 0.5):.0f} ms",
            "",
            "",
        ),
        (
            "CPU memory estimate / peak RSS",
            f"{est} / {rss:.0f} MiB",
            f"{est / rss:.2f}",
            f"in [1.00, 1.10]: {verdict(rss <= est <= 1.1 * rss)}",
        ),
    ]
    print(f"\nGemma 3 270M Q4_K_M on {machine()}")
    print("| figure | value | ratio | goal |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    failed = prefix.failed + rr.failed
    if failed:
        print(f"failed requests: prefix {prefix.why_failed}, round robin {rr.why_failed}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="medians over this many")
    ap.add_argument("--max-tokens", type=int, default=64, help="per stream in the tokens/s runs")
    ap.add_argument("--words", type=int, default=2000, help="~2,000 tokens of conversation")
    ap.add_argument("--requests", type=int, default=40, help="chats per routing mode")
    ap.add_argument("--clients", type=int, default=4, help="at once, in the routing runs")
    ap.add_argument("--slots", type=int, default=0, help="-np of each replica (0: default)")
    ap.add_argument("--keep", default="", help="keep logs under this folder")
    args = ap.parse_args()
    gguf = real_model.ensure()
    print(f"starting: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        base = Path(args.keep) if args.keep else Path(d)
        base.mkdir(parents=True, exist_ok=True)
        nats = NatsServer(base / "nats")
        nats.start()
        try:
            one_ = await single(folder(base, "single"), nats, gguf, args)
            print(f"  single instance: {one_}", flush=True)
            res = {}
            for routing in ("prefix", "round_robin"):
                res[routing] = await routed(folder(base, routing), nats, gguf, routing, args)
                r = res[routing]
                split = "/".join(f"{v:.0f}" for v in sorted(r.per_replica.values()))
                print(
                    f"  {routing}: evaluated {r.evaluated} of {r.prompt_total} prompt tokens"
                    f" ({split} per replica; system prompts per home {r.homes})",
                    flush=True,
                )
        finally:
            nats.stop()
    report(one_, res["prefix"], res["round_robin"])


if __name__ == "__main__":
    asyncio.run(main())
