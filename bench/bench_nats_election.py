"""What a NATS stream leader's loss costs: how long the hosts bucket takes no writes after the
server leading it is killed (SIGKILL) or frozen (SIGSTOP, like a cut host: no reset), on a
three-server cluster of the project's own identities and R3 streams.

Every write a move off a lost host needs (its records, its key, the start command, the
lease) waits this long when the lost host's server led that stream: the floor under the
host-loss figure of bench_hosts.py (issue 21). A benchmark that prints figures, not a test.

    .venv/bin/python bench/bench_nats_election.py [--trials 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from test_nats_cluster import Node, start_three_nodes  # noqa: E402

import proto  # noqa: E402
from lls.bus import Bus, connect  # noqa: E402

BUCKET = f"KV_{proto.KV_HOSTS}"
SETTLE_S = 6.0  # after a server is back, before the next trial


async def open_bus(nodes: list[Node], creds: Path, within: float = 30) -> Bus:
    url = ",".join(f"nats://127.0.0.1:{n.port}" for n in nodes)
    deadline = time.monotonic() + within
    while True:
        try:
            return await connect(url, "bench", creds=creds, replicas=3, deadline_s=10)
        except Exception:  # noqa: BLE001 - the cluster elects its meta leader first
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def trial(nodes: list[Node], creds: Path, freeze: bool) -> tuple[str, float]:
    """Stop the bucket's leader; seconds until a write to the bucket lands again."""
    bus = await open_bus(nodes, creds)
    try:
        leader = (await bus.js.stream_info(BUCKET)).cluster.leader
    finally:
        await bus.close()
    victim = next(n for n in nodes if n.name == leader)
    bus = await open_bus([n for n in nodes if n is not victim], creds)
    try:
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGSTOP if freeze else signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            try:
                await bus.js.publish(f"$KV.{proto.KV_HOSTS}.probe", b"{}", timeout=0.5)
                break
            except Exception:  # noqa: BLE001 - no leader yet
                await asyncio.sleep(0.05)
        took = time.monotonic() - t0
    finally:
        await bus.close()
    if freeze:
        os.kill(victim.proc.pid, signal.SIGCONT)
    else:
        victim.start()
    await asyncio.sleep(SETTLE_S)
    return leader or "?", took


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        nodes, _url, folder = start_three_nodes(Path(d))
        try:
            for freeze in (False, True):
                how = "frozen (SIGSTOP)" if freeze else "killed (SIGKILL)"
                took = []
                for _ in range(args.trials):
                    leader, s = await trial(nodes, folder / "cli.json", freeze)
                    took.append(s)
                    print(f"  leader {leader} {how}: the bucket takes writes after {s:.2f} s")
                print(
                    f"{how}: min {min(took):.2f} / median {statistics.median(took):.2f} / "
                    f"max {max(took):.2f} s over {len(took)} trials"
                )
        finally:
            for n in nodes:
                n.kill()


if __name__ == "__main__":
    asyncio.run(main())
