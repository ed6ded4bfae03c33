"""Taking turns under contention: more models wanted than fit, ours vs llama-server's router.

Both systems get the same request schedule against the same binary and GGUF files, with room
for 2 models at a time (ours: `memory_mib` 1200 each on one simulated 3072 MiB GPU; the
router: `--models-max 2`). Each request is allowed 60 s. Scenarios:

  storm-4   200 concurrent chat requests spread over 4 models
  storm-8   200 concurrent chat requests spread over 8 models
  bursts-8  200 requests over 8 models arriving in random bursts over 30 s, 10% streaming

Prints served / refused / timed out / wall / p50 / p99 / model loads for both; "swaps" are
loads beyond the first two. A benchmark that prints figures, not a test.

    .venv/bin/python bench/bench_swap.py [--scenarios storm-4,storm-8,bursts-8] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
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
from lls.bus import connect, kv_snapshot  # noqa: E402
from make_tiny_gguf import write  # noqa: E402
from stack import Stack  # noqa: E402

DEADLINE_S = 60.0
MAX_TOKENS = 16
THREADS = ["-t", "1", "-c", "4096", "-np", "4"]  # the same server settings on both sides


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
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    refused = sum(res.refused.values())
    codes = ",".join(f"{k}x{v}" for k, v in sorted(res.refused.items())) or "-"
    return (
        f"  {name:<8} served {len(lat):3d}  refused {refused:3d} ({codes:<9})  "
        f"timed out {res.timed_out:3d}  errors {res.errors:3d}  wall {res.wall:6.1f} s  "
        f"p50 {p50:5.2f} s  p99 {p99:5.2f} s  loads {res.loads:3d}  swaps {max(0, res.loads - 2):3d}"
    )


async def run_ours(tmp: Path, files: list[Path], reqs: list[Request]) -> Result:
    nats = NatsServer(tmp / "nats")
    nats.start()
    models = {
        f.stem: {
            "url": f"file://{f}",
            "memory_mib": 1200,
            "args": ["-t", "1", "-np", "4"],
            "ctx_size": 4096,
        }
        for f in files
    }
    stack = Stack(
        tmp,
        nats.url,
        models,
        gateway__cold_start_timeout=DEADLINE_S,
        agent__gpus=[{"name": "sim", "memory_mib": 3072}],
    )
    stack.start()
    try:
        await wait_for_host(nats.url)
        res = await storm(stack.base, reqs)
        bus = await connect(nats.url, "bench")
        try:
            recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
            res.loads = sum(1 for r in recs.values() if r.ready_at is not None)
        finally:
            await bus.close()
        return res
    finally:
        stack.stop()
        nats.stop()


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


async def run_router(tmp: Path, files: list[Path], reqs: list[Request]) -> Result:
    exe = cached_llama_server()
    assert exe is not None and exe.exists(), "build llama-server first (make llama-server)"
    port = free_port()
    log = (tmp / "router.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "--models-dir", str(files[0].parent), "--models-max", "2"]
        + ["--host", "127.0.0.1", "--port", str(port), *THREADS],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        res = await storm(base, reqs)
        res.loads = (tmp / "router.log").read_text(errors="replace").count("spawning server")
        return res
    finally:
        proc.terminate()
        proc.wait(20)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", default="storm-4,storm-8,bursts-8")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["ours", "router"], default=None)
    ap.add_argument("--keep", default="", help="keep logs and files under this folder")
    args = ap.parse_args()
    for name in args.scenarios.split(","):
        n_models, reqs = schedule(name, random.Random(args.seed))
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(args.keep) / name if args.keep else Path(d)
            (tmp / "models").mkdir(parents=True)
            files = [tmp / "models" / f"tiny-{i}.gguf" for i in range(n_models)]
            for i, f in enumerate(files):
                write(f, 100 + i)
            print(f"{name}: {len(reqs)} requests over {n_models} models, room for 2")
            (tmp / "ours").mkdir()
            (tmp / "router").mkdir()
            if args.only != "router":
                ours = await run_ours(tmp / "ours", files, reqs)
                print(row("ours", ours), flush=True)
            if args.only != "ours":
                router = await run_router(tmp / "router", files, reqs)
                print(row("router", router), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
