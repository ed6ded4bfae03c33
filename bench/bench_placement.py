"""Placement decision latency on a big simulated cluster (prints figures; not a test).

    .venv/bin/python bench/bench_placement.py [--hosts 1000] [--gpus 8] [--models 200]

Scenarios: a cluster with room (the usual path), a full cluster where every decision has to
find idle instances to evict, and the idle reaper's scan over all instances.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proto.messages import (  # noqa: E402
    GpuInfo,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.placement import Need, NoFit, idle_to_stop, place  # noqa: E402

NOW = 1_000_000.0
GPU_SIZES_MIB = (24_576, 49_152, 81_920)


def cluster(
    rng: random.Random, n_hosts: int, n_gpus: int, n_models: int, fill: float, cap: int = 10**9
) -> tuple[list[HostRecord], list[InstanceRecord], dict[str, InstanceActivity], list[Need]]:
    """Hosts whose GPUs are about `fill` full of our instances, plus a little foreign usage."""
    needs = [
        Need(f"m{i}", rng.choice([2_000, 5_000, 9_000, 20_000, 45_000]), n_layers=32)
        for i in range(n_models)
    ]
    hosts, instances, activity = [], [], {}
    for h in range(n_hosts):
        hid = f"host{h:04d}"
        gpus = []
        for g in range(n_gpus):
            total = rng.choice(GPU_SIZES_MIB)
            used = rng.choice([0, 0, 300, 2_000])  # someone else's process
            smallest = min(n.memory_mib for n in needs)
            while used + smallest <= total * fill and len(instances) < cap:
                n = rng.choice(needs)
                if used + n.memory_mib > total * fill:
                    continue
                iid = f"{hid}-{g}-{len(instances)}"
                instances.append(
                    InstanceRecord(
                        instance_id=iid,
                        model=n.model,
                        state=InstanceState.READY,
                        created=0.0,
                        updated=0.0,
                        host=hid,
                        gpus=[g],
                        memory_mib=n.memory_mib,
                        ready_at=NOW - rng.uniform(0, 3600),
                    )
                )
                activity[iid] = InstanceActivity(
                    in_flight=rng.choice([0, 0, 0, 1, 3]), last_used=NOW - rng.uniform(0, 3600)
                )
                used += n.memory_mib
            gpus.append(GpuInfo(g, f"GPU-{h}-{g}", "sim", total, used))
        hosts.append(
            HostRecord(hid, NOW - rng.uniform(0, 3), 0.0, "docker", gpus, 64, 512_000, 400_000)
        )
    return hosts, instances, activity, needs


def measure(fn: Callable[[], object], n: int) -> tuple[list[float], list[object]]:
    times, results = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        results.append(fn())
        times.append((time.perf_counter() - t0) * 1000)
    return times, results


def report(label: str, times: list[float], extra: str = "") -> None:
    times = sorted(times)
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"{label:<34} n={len(times):<4} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms  {extra}")


def scenario(
    label: str,
    fill: float,
    rng: random.Random,
    args: argparse.Namespace,
    keep: frozenset[str],
    cap: int = 10**9,
) -> tuple[list[InstanceRecord], dict[str, InstanceActivity]]:
    t0 = time.perf_counter()
    hosts, instances, activity, needs = cluster(rng, args.hosts, args.gpus, args.models, fill, cap)
    built = time.perf_counter() - t0
    print(
        f"\n{label}: {len(hosts)} hosts x {args.gpus} GPUs, {len(instances)} instances,"
        f" {args.models} models (built in {built:.1f} s)"
    )
    host_ids = [h.host_id for h in hosts]

    def decide() -> object:
        n = rng.choice(needs)
        need = Need(
            n.model, n.memory_mib, n.n_layers, file_hosts=frozenset(rng.sample(host_ids, 3))
        )
        return place(hosts, instances, activity, need, now=NOW, keep_loaded=keep)

    times, results = measure(decide, args.decisions)
    nofit = sum(isinstance(r, NoFit) for r in results)
    evicting = sum(1 for r in results if not isinstance(r, NoFit) and r.evict)
    report("place()", times, f"(no fit {nofit}, with eviction {evicting})")
    return instances, activity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--decisions", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(7)
    keep = frozenset(f"m{i}" for i in range(0, args.models, 10))  # every 10th is keep_loaded
    scenario("two instances per model", 1.0, rng, args, keep, cap=2 * args.models)
    scenario("cluster with room (GPUs ~50% full)", 0.5, rng, args, keep)
    instances, activity = scenario("full cluster, every decision evicts", 1.0, rng, args, keep)
    times, results = measure(lambda: idle_to_stop(instances, activity, {}, 600.0, NOW), 20)
    report("idle_to_stop() over all instances", times, f"({len(results[0])} to stop)")


if __name__ == "__main__":
    main()
