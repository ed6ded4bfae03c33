"""Demand handled per second by a real placer through a real NATS server.

A cluster of simulated hosts (heartbeats written straight into the hosts bucket, every model
file already in every store) and one placer. We publish one demand per model, as gateways
do, and time until every model has an instance that was placed and sent its start command.
A benchmark that prints figures, not a test.

    .venv/bin/python bench/bench_placer_nats.py [--hosts 1000] [--gpus 8] [--models 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import proto  # noqa: E402
from conftest import NatsServer  # noqa: E402
from lls.bus import connect  # noqa: E402
from lls.config import parse, store_filename_of  # noqa: E402
from lls.service import ServiceContext  # noqa: E402
from services.placer.service import Placer  # noqa: E402


def host(i: int, gpus: int, files: list[proto.FileInfo]) -> proto.HostRecord:
    now = time.time()
    return proto.HostRecord(
        host_id=f"h{i:04d}",
        ts=now,
        started_at=now,
        runtime="process",
        gpus=[
            proto.GpuInfo(
                index=g,
                uuid=f"sim-{i}-{g}",
                name="sim-24g",
                memory_total_mib=24576,
                memory_used_mib=0,
                simulated=True,
            )
            for g in range(gpus)
        ],
        cpu_count=32,
        ram_total_mib=256 << 10,
        ram_free_mib=200 << 10,
        files=files,
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--models", type=int, default=200)
    args = ap.parse_args()
    models = {
        f"m{i:03d}": {"url": "file:///unused.gguf", "memory_mib": 2000 + 37 * i}
        for i in range(args.models)
    }
    cfg = parse({"models": models, "placer": {"host_lost_after": 600}})
    files = [
        proto.FileInfo(model=m, filename=store_filename_of(m, cfg.models[m]), size=1 << 30)
        for m in models
    ]
    with tempfile.TemporaryDirectory() as d:
        nats = NatsServer(Path(d) / "nats")
        nats.start()
        bus = await connect(nats.url, "bench")
        t0 = time.perf_counter()
        await asyncio.gather(
            *(bus.put(bus.hosts, f"h{i:04d}", host(i, args.gpus, files)) for i in range(args.hosts))
        )
        print(f"{args.hosts} hosts x {args.gpus} GPUs written in {time.perf_counter() - t0:.1f} s")

        ctx = ServiceContext(
            name="placer", cfg=cfg, bus=await connect(nats.url, "placer"), host_id="bench"
        )
        placer = Placer(ctx)
        task = asyncio.create_task(placer.run())
        while len(placer.watches.hosts) < args.hosts or not placer.lease.held:
            await asyncio.sleep(0.05)

        started: dict[str, float] = {}
        sent: dict[str, float] = {}

        async def on_start(msg) -> None:  # type: ignore[no-untyped-def]
            cmd = proto.decode(msg.data, proto.AgentCommand)
            started.setdefault(cmd.model, time.perf_counter())

        sub = await bus.nc.subscribe("lls.cmd.agent.>", cb=on_start)
        t0 = time.perf_counter()
        for m in models:
            sent[m] = time.perf_counter()
            await bus.emit(proto.Demand(model=m, gateway_id="bench"))
        while len(started) < len(models) and time.perf_counter() - t0 < 120:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        lat = sorted(started[m] - sent[m] for m in started)
        print(
            f"{len(started)}/{len(models)} demands placed and started in {elapsed:.2f} s: "
            f"{len(started) / elapsed:.0f} demands/s through NATS"
        )
        if lat:
            print(
                f"demand -> start command latency p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
                f"p99 {lat[int(len(lat) * 0.99) - 1] * 1e3:.0f} ms (includes queueing behind "
                f"the burst)"
            )
        await sub.unsubscribe()
        ctx.stop.set()
        await task
        await ctx.bus.close()
        await bus.close()
        nats.stop()


if __name__ == "__main__":
    asyncio.run(main())
