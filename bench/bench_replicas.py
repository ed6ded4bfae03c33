"""Replicas that follow load: one model saturated by 32 concurrent clients, throughput with
`replicas.max: 2` vs `max: 1`, with the defaults a user gets, repeated (issues 11 and 18).

Each setting gets a fresh stack (NATS, placer, agent, gateway) with two simulated GPUs, room
for one instance on each, and the model as a user configures it: no `args` (llama-server's
own slots), `ctx_size` 512, `replicas: {min: 1, max: N, target_wait: 0.2}`. 32 clients each
loop completions of 64 tokens (`ignore_eos`). After `--warmup` seconds (long enough for a
replica to be added and ready) the requests that complete in the next `--seconds` are
counted: requests/s, generated tokens/s and p99 latency. `--runs` pairs alternate max 1 and
max 2, so both see the machine alike. Goals (issue 18): requests/s with two copies at least
1.7x one copy; no max-2 run with p99 above 2x the one-copy p99.

    .venv/bin/python bench/bench_replicas.py [--clients 32] [--max-tokens 64] [--slots 0]
        [--runs 3] [--warmup 20] [--seconds 30] [--keep DIR]

An instance on a simulated GPU computes on the CPU with `-t cores-1` (services/agent/
runtime.py `cpu_threads`): on a 2-core host each of two copies gets one thread, so the second
copy can only use the core the first leaves; the scheduler's own processes share them too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]

import proto  # noqa: E402
from conftest import NatsServer  # noqa: E402
from lls.bus import connect, kv_snapshot  # noqa: E402
from make_tiny_gguf import write  # noqa: E402
from services.agent.runtime import cpu_threads  # noqa: E402
from stack import Stack, llama_server_pids  # noqa: E402

MODEL = "tiny"


@dataclass
class Run:
    max_replicas: int
    done: list[tuple[float, float, int]] = field(default_factory=list)  # (end, latency, tokens)
    failed: dict[str, int] = field(default_factory=dict)
    ready_at: list[float] = field(default_factory=list)  # seconds after start, per instance
    window: tuple[float, float] = (0.0, 0.0)
    most_live: int = 0
    server_cores: float = 0.0  # CPU the llama-servers used in the window, in cores
    busy_cores: float = 0.0  # CPU the whole machine used in the window, in cores

    def in_window(self) -> list[tuple[float, float, int]]:
        lo, hi = self.window
        return [d for d in self.done if lo <= d[0] < hi]

    def rps(self) -> float:
        return len(self.in_window()) / (self.window[1] - self.window[0])

    def tps(self) -> float:
        return sum(t for _, _, t in self.in_window()) / (self.window[1] - self.window[0])


async def client(
    c: aiohttp.ClientSession, base: str, body: dict, t0: float, until: float, run: Run
) -> None:
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            async with c.post(f"{base}/v1/completions", json=body) as r:
                data = await r.json(content_type=None)
                if r.status != 200:
                    run.failed[str(r.status)] = run.failed.get(str(r.status), 0) + 1
                    await asyncio.sleep(0.5)
                    continue
        except (aiohttp.ClientError, TimeoutError) as e:
            run.failed[type(e).__name__] = run.failed.get(type(e).__name__, 0) + 1
            await asyncio.sleep(0.5)
            continue
        end = time.monotonic()
        tokens = int(data.get("usage", {}).get("completion_tokens", 0))
        run.done.append((end - t0, end - start, tokens))


async def watch(nats_url: str, t0: float, until: float, run: Run) -> None:
    """When each instance became ready, and the most live at once (from KV instances)."""
    bus = await connect(nats_url, "bench")
    seen: set[str] = set()
    try:
        while time.monotonic() < until:
            recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
            live = [r for r in recs.values() if r.state in proto.LIVE_STATES]
            run.most_live = max(run.most_live, len(live))
            for r in live:
                if r.state == proto.InstanceState.READY and r.instance_id not in seen:
                    seen.add(r.instance_id)
                    run.ready_at.append(time.monotonic() - t0)
            await asyncio.sleep(0.25)
    finally:
        await bus.close()


def server_cpu_s(marker: str) -> float:
    """CPU seconds (user + system) the llama-servers started under `marker` have used."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in llama_server_pids(marker):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not iowait)."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in cpu]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


async def cpu_in_window(marker: str, t0: float, run: Run) -> None:
    await asyncio.sleep(max(0.0, t0 + run.window[0] - time.monotonic()))
    s0, b0 = server_cpu_s(marker), machine_busy_s()
    await asyncio.sleep(max(0.0, t0 + run.window[1] - time.monotonic()))
    span = run.window[1] - run.window[0]
    run.server_cores = (server_cpu_s(marker) - s0) / span
    run.busy_cores = (machine_busy_s() - b0) / span


async def one_setting(tmp: Path, gguf: Path, max_replicas: int, args: argparse.Namespace) -> Run:
    nats = NatsServer(tmp / "nats")
    nats.start()
    model_args = ["-np", str(args.slots)] if args.slots else []
    if args.threads:
        model_args += ["-t", str(args.threads)]
    models = {
        MODEL: {
            "url": f"file://{gguf}",
            "memory_mib": 1200,
            "ctx_size": 512,
            "args": model_args,
            "replicas": {"min": 1, "max": max_replicas, "target_wait": 0.2, "idle_after": 60},
        }
    }
    stack = Stack(
        tmp,
        nats.url,
        models,
        gateway__cold_start_timeout=60,
        agent__gpus=[{"name": "sim", "memory_mib": 2000}] * 2,  # room for one on each
    )
    stack.start()
    run = Run(max_replicas)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": args.max_tokens, "ignore_eos": True}
    try:
        t0 = time.monotonic()
        until = t0 + args.warmup + args.seconds
        run.window = (args.warmup, args.warmup + args.seconds)
        timeout = aiohttp.ClientTimeout(total=120)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as c:
            await asyncio.gather(
                watch(nats.url, t0, until, run),
                cpu_in_window(str(tmp), t0, run),
                *(client(c, stack.base, body, t0, until, run) for _ in range(args.clients)),
            )
        return run
    finally:
        stack.stop()
        nats.stop()


def p99(run: Run) -> float:
    lat = sorted(lat for _, lat, _ in run.in_window())
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")


def row(run: Run) -> str:
    lat = sorted(lat for _, lat, _ in run.in_window())
    p50 = statistics.median(lat) if lat else float("nan")
    ready = ", ".join(f"{t:.1f} s" for t in run.ready_at) or "-"
    failed = ",".join(f"{k}x{v}" for k, v in sorted(run.failed.items())) or "none"
    return (
        f"  max {run.max_replicas}: {run.rps():6.2f} req/s  {run.tps():8.1f} tok/s  "
        f"p50 {p50:5.2f} s  p99 {p99(run):5.2f} s  served {len(run.in_window())} in window  "
        f"instances ready at [{ready}]  most live {run.most_live}  failed {failed}\n"
        f"         CPU in the window: llama-server {run.server_cores:.2f} cores "
        f"({run.tps() / max(run.server_cores, 1e-9):.0f} tok/s per core), whole machine "
        f"{run.busy_cores:.2f} of {os.cpu_count()} cores busy"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=0, help="-np of each instance (0: its own)")
    ap.add_argument("--threads", type=int, default=0, help="-t per instance (0: the agent's)")
    ap.add_argument("--runs", type=int, default=3, help="pairs of max 1 / max 2 runs")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--keep", default="", help="keep logs and files under this folder")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or cpu_threads(cores)
    print(
        f"replicas: {args.clients} clients, completions of {args.max_tokens} tokens "
        f"(ignore_eos), -np {args.slots or 'llama-server default'}, {cores} cores, "
        f"-t {threads} per instance; counted from {args.warmup:g} s for {args.seconds:g} s; "
        f"{args.runs} pairs",
        flush=True,
    )
    ones: list[Run] = []
    twos: list[Run] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(args.keep) if args.keep else Path(d)
        (root / "models").mkdir(parents=True, exist_ok=True)
        gguf = root / "models" / "tiny.gguf"
        write(gguf, 7)
        for i in range(args.runs):
            for m, into in ((1, ones), (2, twos)):
                tmp = root / f"run{i}-max{m}"
                tmp.mkdir(parents=True, exist_ok=True)
                run = await one_setting(tmp, gguf, m, args)
                into.append(run)
                print(row(run), flush=True)
    rps1 = statistics.median(r.rps() for r in ones)
    rps2 = statistics.median(r.rps() for r in twos)
    p99_1 = statistics.median(p99(r) for r in ones)
    worst2 = max(p99(r) for r in twos)
    ratio = rps2 / rps1
    print(
        f"  medians: max 1 {rps1:.1f} req/s (p99 {p99_1:.2f} s), max 2 {rps2:.1f} req/s; "
        f"ratio {ratio:.2f}x (goal >= 1.7x: {'met' if ratio >= 1.7 else 'MISSED'}); "
        f"worst max-2 p99 {worst2:.2f} s vs 2 x one-copy p99 {2 * p99_1:.2f} s "
        f"({'met' if worst2 <= 2 * p99_1 else 'MISSED'})",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
