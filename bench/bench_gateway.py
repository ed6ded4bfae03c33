"""Gateway overhead against the same llama-server instance, straight vs through the gateway.

Prints, from one run: requests/s at 16 concurrent non-streaming clients (ratio goal >= 0.95,
zero errors) for 4-token and 128-token answers, the gateway process's CPU time per request
during the 4-token load (from /proc; goal <= 150 us), added p50 latency at one client (goal
<= 1 ms), requests/s at one client (goal >= 0.9 of direct), and added time to the first
streamed chunk. The model is configured as a user would: llama-server's own slot count. A benchmark that prints figures, not a
test. On a 2-core machine the tiny model answers 4 tokens in well under a millisecond, so
llama-server and the load generator already fill both cores and the gateway's own CPU shows
as lost throughput; with longer answers (and real models) the model's time dominates.

    .venv/bin/python bench/bench_gateway.py [--seconds 5] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]

import proto  # noqa: E402
from conftest import NatsServer  # noqa: E402
from lls.bus import connect, kv_snapshot  # noqa: E402
from lls.instance_key import read as read_key  # noqa: E402
from make_tiny_gguf import write  # noqa: E402
from stack import Stack  # noqa: E402

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 4}


HEADERS: dict[str, dict[str, str]] = {}  # base URL -> headers (the instance's API key)


def session(clients: int, fresh: bool = False, url: str = "") -> aiohttp.ClientSession:
    # aiohttp: a cheap client, so the load generator leaves the 2 cores to what we measure.
    # `fresh`: a new connection per request (llama-server closes streamed ones).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients, force_close=fresh),
        timeout=aiohttp.ClientTimeout(total=30),
        headers=HEADERS.get(url),
    )


async def load(url: str, clients: int, seconds: float, body: dict = BODY) -> tuple[float, int, int]:
    """(requests/s, ok, errors) from `clients` loops posting `body` for `seconds`."""
    ok = errors = 0
    async with session(clients, url=url) as c:
        deadline = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal ok, errors
            while time.monotonic() < deadline:
                try:
                    async with c.post(f"{url}/v1/completions", json=body) as r:
                        await r.read()
                        ok += r.status == 200
                        errors += r.status != 200
                except aiohttp.ClientError:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return (ok + errors) / (time.monotonic() - t0), ok, errors


def gateway_pid(root_pid: int) -> int:
    """The gateway service process under `python -m lls.run` (pid `root_pid`)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == root_pid and b"services.gateway" in cmd:
            return int(proc.name)
    raise RuntimeError("no gateway process found")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(url: str, n: int) -> float:
    async with session(1, url=url) as c:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            async with c.post(f"{url}/v1/completions", json=BODY) as r:
                await r.read()
                assert r.status == 200
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


async def ttft(url: str, n: int) -> float:
    body = {**BODY, "stream": True, "max_tokens": 16}
    async with session(1, fresh=True, url=url) as c:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            first = None
            async with c.post(f"{url}/v1/completions", json=body) as r:
                async for _ in r.content.iter_any():
                    first = first or time.perf_counter() - t0
            samples.append(first)
        return statistics.median(samples)


async def endpoint(nats_url: str) -> str:
    """The instance's URL; its API key (the placer issued it; the operator may read it) goes
    in HEADERS."""
    bus = await connect(nats_url, "bench")
    try:
        for rec in (await kv_snapshot(bus, bus.instances, proto.InstanceRecord)).values():
            placed = await read_key(bus, rec.host or "", rec.instance_id)
            if rec.state == proto.InstanceState.READY and rec.endpoint and placed is not None:
                HEADERS[rec.endpoint] = {"Authorization": f"Bearer {placed.key}"}
                return rec.endpoint
    finally:
        await bus.close()
    raise RuntimeError("no ready instance")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="llama-server -t (0 = the agent's default: one fewer than the cores when CPU-only)",
    )
    args = ap.parse_args()
    # the model as a user configures it: llama-server's own slots (4 by default)
    args.server_args = ["-t", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write(tmp / "tiny.gguf", 1)
        nats = NatsServer(tmp / "nats")
        nats.start()
        stack = Stack(
            tmp,
            nats.url,
            {
                "tiny": {
                    "url": f"file://{tmp}/tiny.gguf",
                    "ctx_size": 2048,
                    "args": args.server_args,
                }
            },
        )
        stack.start()
        try:
            httpx.post(f"{stack.base}/v1/completions", json=BODY, timeout=60).raise_for_status()
            direct = await endpoint(nats.url)
            gw = stack.base
            print(f"llama-server {direct}  gateway {gw}  ({args.clients} clients, {args.seconds}s)")
            await load(direct, 4, 1)  # warm both paths
            await load(gw, 4, 1)
            d_rps, d_ok, d_err = await load(direct, args.clients, args.seconds)
            gw_pid = gateway_pid(stack.proc.pid)
            cpu0 = cpu_seconds(gw_pid)
            g_rps, g_ok, g_err = await load(gw, args.clients, args.seconds)
            cpu = cpu_seconds(gw_pid) - cpu0
            print(
                f"   4 tokens direct {d_rps:8.1f} req/s ({d_err} errors)   "
                f"gateway {g_rps:8.1f} req/s ({g_err} errors)   ratio {g_rps / d_rps:.3f}"
            )
            print(
                f"gateway CPU {cpu * 1e6 / max(1, g_ok + g_err):8.0f} us per request "
                f"({cpu:.2f} s over {g_ok + g_err} requests, {args.clients} clients)"
            )
            long = {**BODY, "max_tokens": 128, "ignore_eos": True}
            d_rps, _, d_err = await load(direct, args.clients, args.seconds, long)
            g_rps, _, g_err = await load(gw, args.clients, args.seconds, long)
            print(
                f"  128 tokens direct {d_rps:8.1f} req/s ({d_err} errors)   "
                f"gateway {g_rps:8.1f} req/s ({g_err} errors)   ratio {g_rps / d_rps:.3f}"
            )
            d_p50, g_p50 = await latency(direct, 200), await latency(gw, 200)
            added = (g_p50 - d_p50) * 1e3
            print(
                f"p50 latency direct {d_p50 * 1e3:7.2f} ms   gateway {g_p50 * 1e3:7.2f} ms   "
                f"added {added:+.2f} ms (goal <= 1 ms: {'met' if added <= 1 else 'MISSED'})"
            )
            d_rps, _, d_err = await load(direct, 1, args.seconds)
            g_rps, _, g_err = await load(gw, 1, args.seconds)
            ratio = g_rps / d_rps
            print(
                f"   1 client direct {d_rps:8.1f} req/s ({d_err} errors)   "
                f"gateway {g_rps:8.1f} req/s ({g_err} errors)   ratio {ratio:.3f} "
                f"(goal >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'})"
            )
            d_t, g_t = await ttft(direct, 100), await ttft(gw, 100)
            print(
                f"first chunk direct {d_t * 1e3:7.2f} ms   gateway {g_t * 1e3:7.2f} ms   "
                f"added {(g_t - d_t) * 1e3:+.2f} ms"
            )
        finally:
            stack.stop()
            nats.stop()


if __name__ == "__main__":
    asyncio.run(main())
