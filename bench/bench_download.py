"""Download benchmark: parallel ranged vs single stream, and what a kill -9 costs on resume.

A local server throttles each connection (like a CDN's per-connection limit); the same file
is fetched with 1 and with N connections, then a download is killed with SIGKILL mid-file
and resumed. Prints figures; it is not a test.

    .venv/bin/python bench/bench_download.py [--mb 40] [--rate-mbps 2] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.downloader.devserver import Behaviour, FileServer  # noqa: E402
from services.downloader.fetch import Options, Progress, chunk_size, state_path  # noqa: E402
from services.downloader.sources import resolve  # noqa: E402
from services.downloader.store import Staging, obtain  # noqa: E402

MB = 1e6


async def download(url: str, store: Path, sha256: str, connections: int) -> float:
    t0 = time.monotonic()
    [src] = resolve(url, "m.gguf")
    await obtain(src, store, sha256, Options(connections=connections), Progress(), [], [])
    return time.monotonic() - t0


def child(url: str, store: str, connections: int) -> None:
    """The process that gets killed: a bare download into `store`."""
    asyncio.run(download(url, Path(store), "", connections))


async def killed_then_resumed(
    srv: FileServer, store: Path, sha256: str, size: int, connections: int
) -> tuple[float, int]:
    """Kill -9 a downloading process at about half, resume here; (fraction saved, re-fetched)."""
    part = Staging.of(store, "m.gguf").part
    sent0 = srv.stats.bytes_sent
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", srv.url("m.gguf"), str(store), str(connections)
    )
    saved = 0
    deadline = time.monotonic() + 30
    while saved < size // 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        try:
            saved = sum(json.loads(state_path(part).read_text())["done"])
        except (OSError, ValueError):
            pass
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await asyncio.sleep(0.3)  # the server's threads notice the dead sockets
    saved = sum(json.loads(state_path(part).read_text())["done"])
    await download(srv.url("m.gguf"), store, sha256, connections)
    assert hashlib.sha256((store / "m.gguf").read_bytes()).hexdigest() == sha256
    refetched = srv.stats.bytes_sent - sent0 - size - 2  # minus the two 1-byte probes
    return saved / size, refetched


async def main(args: argparse.Namespace) -> None:
    data = os.urandom(int(args.mb * MB))
    sha256 = hashlib.sha256(data).hexdigest()
    rate = args.rate_mbps * MB
    n = args.connections
    print(f"file {len(data) / MB:.1f} MB; server limit {args.rate_mbps:g} MB/s per connection")
    with (
        tempfile.TemporaryDirectory() as tmp,
        FileServer({"/m.gguf": data}, Behaviour(rate_bps=rate)) as srv,
    ):
        par = await download(srv.url("m.gguf"), Path(tmp, "par"), sha256, n)
        print(f"{n} connections : {par:6.2f} s  {len(data) / par / MB:6.2f} MB/s")
        one = await download(srv.url("m.gguf"), Path(tmp, "one"), sha256, 1)
        print(f"1 connection  : {one:6.2f} s  {len(data) / one / MB:6.2f} MB/s")
        print(f"speed-up      : {one / par:.1f}x with {n} connections (goal >= 4x)")
        frac, refetched = await killed_then_resumed(srv, Path(tmp, "res"), sha256, len(data), n)
        bound = n * chunk_size(len(data), n)
        print(
            f"kill -9 at {frac:.0%} saved, then resume: re-fetched {refetched / MB:.2f} MB "
            f"(bound: {n} chunks in flight = {bound / MB:.1f} MB)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        raise SystemExit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40)
    ap.add_argument("--rate-mbps", type=float, default=2)
    ap.add_argument("--connections", type=int, default=8)
    asyncio.run(main(ap.parse_args()))
