"""Taking turns under contention: more models wanted than fit, ours vs llama-server's router,
with the defaults a user gets, repeated.

Both systems get the same request schedule against the same binary and GGUF files, with room
for 2 models at a time: ours with its default config (no `args`: llama-server's own slot
count, `ctx_size` 512, `memory_mib` 1200 per model on one simulated 3072 MiB GPU); the router
with `--models-max 2`, its own defaults and the same `-c 512` and thread count our agent
gives a llama-server on this host (services/agent/runtime.py `cpu_threads`), so the servers
compute alike and the schedulers differ. Every request is allowed 60 s. Each scenario runs
`--runs` times back to back on one running system per side (as a user's storms would come),
then prints every run and the distribution (min / median / max of wall and p99).

Scenarios (8 tokens per answer, `ignore_eos`):

  storm-4   200 concurrent chat requests, 50 for each of 4 models
  storm-8   200 concurrent chat requests over 8 models
  bursts-8  200 requests over 8 models arriving in random bursts over 30 s, 10% streamed

Goals (issue 18), printed against the figures of the same run: our worst wall no slower than
the router's median; our median wall and median p99 at most the router's; zero violations of
the stall invariant (services/gateway/stall.py: a request waiting while a ready instance of
its model has a free slot, for over 50 ms; read from the gateway's /metrics).

    .venv/bin/python bench/bench_swap.py [--scenarios storm-4,storm-8,bursts-8] [--runs 10]
        [--seed 1] [--only ours|router] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]

import proto  # noqa: E402
from conftest import NatsServer, cached_llama_server, free_port  # noqa: E402
from lab.observe import events_since, last_seq  # noqa: E402
from lls.bus import connect, kv_snapshot  # noqa: E402
from make_tiny_gguf import write  # noqa: E402
from services.agent.runtime import cpu_threads  # noqa: E402
from stack import Stack  # noqa: E402

DEADLINE_S = 60.0
MAX_TOKENS = 8
CTX = 512
MODEL_MIB = 1200
GPU_MIB = 3072  # room for two


@dataclass
class Request:
    at: float  # seconds after the start
    model: str
    stream: bool


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)  # status -> count
    timed_out: int = 0
    errors: int = 0
    wall: float = 0.0
    loads: int = 0
    stalls: float = 0.0  # stall-invariant violations (ours only)
    stall_s: float = 0.0

    @property
    def p99(self) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")


def schedule(name: str, rng: random.Random) -> tuple[int, list[Request]]:
    n_models = int(name.split("-")[1])
    models = [f"tiny-{i}" for i in range(n_models)]
    if name.startswith("storm"):
        return n_models, [Request(0.0, models[i % n_models], False) for i in range(200)]
    reqs = []
    bursts = sorted(rng.uniform(0, 30) for _ in range(12))
    for _ in range(200):
        at = rng.choice(bursts) + rng.uniform(0, 0.5)
        reqs.append(Request(at, rng.choice(models), rng.random() < 0.1))
    return n_models, sorted(reqs, key=lambda r: r.at)


async def one(c: aiohttp.ClientSession, base: str, req: Request, t0: float, res: Result) -> None:
    await asyncio.sleep(max(0.0, t0 + req.at - time.monotonic()))
    body = {
        "model": req.model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": req.stream,
    }
    start = time.monotonic()
    try:
        async with c.post(f"{base}/v1/chat/completions", json=body) as r:
            data = await r.read()
            ok = r.status == 200 and (not req.stream or b"[DONE]" in data)
            if ok:
                res.latencies.append(time.monotonic() - start)
            elif r.status == 200:
                res.errors += 1  # a stream that ended with an error event
            else:
                res.refused[r.status] = res.refused.get(r.status, 0) + 1
    except TimeoutError:
        res.timed_out += 1
    except aiohttp.ClientError:
        res.errors += 1


async def storm(base: str, reqs: list[Request]) -> Result:
    res = Result()
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as c:
        t0 = time.monotonic()
        await asyncio.gather(*(one(c, base, r, t0, res) for r in reqs))
        res.wall = time.monotonic() - t0
    return res


def row(name: str, res: Result) -> str:
    lat = sorted(res.latencies)
    p50 = statistics.median(lat) if lat else float("nan")
    refused = sum(res.refused.values())
    codes = ",".join(f"{k}x{v}" for k, v in sorted(res.refused.items())) or "-"
    stalls = f"  stalls {res.stalls:.0f} ({res.stall_s:.2f} s)" if name == "ours" else ""
    return (
        f"  {name:<6} served {len(lat):3d}  refused {refused:3d} ({codes:<7}) "
        f"timed out {res.timed_out:3d}  errors {res.errors:3d}  wall {res.wall:6.2f} s  "
        f"p50 {p50:5.2f} s  p99 {res.p99:5.2f} s  loads {res.loads:3d}{stalls}"
    )


def spread(values: list[float]) -> str:
    return f"{min(values):6.2f} / {statistics.median(values):6.2f} / {max(values):6.2f}"


STALL_RE = re.compile(r'^lls_stall_(violations|seconds)_total\{model="[^"]*"\} (\S+)$', re.M)


def stall_counts(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    n = s = 0.0
    for kind, value in STALL_RE.findall(text):
        if kind == "violations":
            n += float(value)
        else:
            s += float(value)
    return n, s


async def last_event(nats_url: str) -> int:
    bus = await connect(nats_url, "bench")
    try:
        return await last_seq(bus)
    finally:
        await bus.close()


async def ready_since(nats_url: str, seq: int) -> int:
    """Instances that became ready after event `seq` (model loads), from the event log: a
    model loaded twice in one storm counts twice."""
    bus = await connect(nats_url, "bench")
    try:
        return len(
            {
                e.instance_id
                for e in await events_since(bus, seq)
                if isinstance(e, proto.InstanceChanged) and e.state == proto.InstanceState.READY
            }
        )
    finally:
        await bus.close()


async def wait_for_host(nats_url: str, timeout: float = 30) -> None:
    bus = await connect(nats_url, "bench")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await kv_snapshot(bus, bus.hosts, proto.HostRecord):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("no agent heartbeat")
    finally:
        await bus.close()


async def run_ours(tmp: Path, files: list[Path], reqs: list[Request], runs: int) -> list[Result]:
    nats = NatsServer(tmp / "nats")
    nats.start()
    # The defaults a user gets: no args, so llama-server picks its slots; a small context.
    models = {
        f.stem: {"url": f"file://{f}", "memory_mib": MODEL_MIB, "ctx_size": CTX} for f in files
    }
    stack = Stack(
        tmp,
        nats.url,
        models,
        gateway__cold_start_timeout=DEADLINE_S,
        agent__gpus=[{"name": "sim", "memory_mib": GPU_MIB}],
    )
    stack.start()
    out = []
    try:
        await wait_for_host(nats.url)
        for _ in range(runs):
            before = stall_counts(stack.base)
            seq0 = await last_event(nats.url)
            res = await storm(stack.base, reqs)
            res.loads = await ready_since(nats.url, seq0)
            after = stall_counts(stack.base)
            res.stalls, res.stall_s = after[0] - before[0], after[1] - before[1]
            print(row("ours", res), flush=True)
            out.append(res)
        return out
    finally:
        stack.stop()
        nats.stop()


async def run_router(tmp: Path, files: list[Path], reqs: list[Request], runs: int) -> list[Result]:
    exe = cached_llama_server()
    assert exe is not None and exe.exists(), "build llama-server first (make llama-server)"
    port = free_port()
    log_path = tmp / "router.log"
    threads = str(cpu_threads(os.cpu_count() or 1))  # as our agent gives a CPU instance
    proc = subprocess.Popen(
        [str(exe), "--models-dir", str(files[0].parent), "--models-max", "2"]
        + ["--host", "127.0.0.1", "--port", str(port), "-c", str(CTX), "-t", threads],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    out = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for _ in range(runs):
            loads = log_path.read_text(errors="replace").count("spawning server")
            res = await storm(base, reqs)
            res.loads = log_path.read_text(errors="replace").count("spawning server") - loads
            print(row("router", res), flush=True)
            out.append(res)
        return out
    finally:
        proc.terminate()
        proc.wait(20)


def summary(ours: list[Result], router: list[Result]) -> None:
    if not ours or not router:
        return
    ow, rw = [r.wall for r in ours], [r.wall for r in router]
    op, rp = [r.p99 for r in ours], [r.p99 for r in router]
    print("  distribution over runs (min / median / max):")
    print(f"    wall  ours   {spread(ow)} s   router {spread(rw)} s")
    print(f"    p99   ours   {spread(op)} s   router {spread(rp)} s")
    served = sum(len(r.latencies) for r in ours), sum(len(r.latencies) for r in router)
    stalls = sum(r.stalls for r in ours)
    print(f"    served ours {served[0]}, router {served[1]}; stall violations ours {stalls:.0f}")
    checks = [
        ("our worst wall <= router's median wall", max(ow) <= statistics.median(rw)),
        ("our median wall <= router's median wall", statistics.median(ow) <= statistics.median(rw)),
        ("our median p99 <= router's median p99", statistics.median(op) <= statistics.median(rp)),
        ("zero stall violations", stalls == 0),
    ]
    for what, ok in checks:
        print(f"    {'met ' if ok else 'MISSED'}  {what}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", default="storm-4,storm-8,bursts-8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["ours", "router"], default=None)
    ap.add_argument("--keep", default="", help="keep logs and files under this folder")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; {args.runs} runs per scenario and side", flush=True)
    for name in args.scenarios.split(","):
        n_models, reqs = schedule(name, random.Random(args.seed))
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(args.keep) / name if args.keep else Path(d)
            (tmp / "models").mkdir(parents=True)
            files = [tmp / "models" / f"tiny-{i}.gguf" for i in range(n_models)]
            for i, f in enumerate(files):
                write(f, 100 + i)
            print(f"{name}: {len(reqs)} requests over {n_models} models, room for 2", flush=True)
            (tmp / "ours").mkdir()
            (tmp / "router").mkdir()
            ours = router = []
            if args.only != "router":
                ours = await run_ours(tmp / "ours", files, reqs, args.runs)
            if args.only != "ours":
                router = await run_router(tmp / "router", files, reqs, args.runs)
            summary(ours, router)


if __name__ == "__main__":
    asyncio.run(main())
