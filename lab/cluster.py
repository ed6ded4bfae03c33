"""Several real network hosts on this machine, started by hand (`make cluster`).

    python -m lab.cluster [--config config.yaml] [--hosts 3]   # = make cluster

starts a HostLab (lab/hosts.py) of three hosts with the config's models, forwards
http://127.0.0.1:5000 to a gateway, prints where everything is, and on Ctrl-C removes all
it created. Needs root (`ip netns`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import msgspec

from lab.hosts import GATEWAY_PORT, NATS_NODES, HostLab
from lab.network import LabError


async def forward(
    listen: tuple[str, int], targets: list[tuple[str, int]], stop: asyncio.Event
) -> None:
    """Accept on `listen` and pipe each connection to the first target that answers (the
    gateways inside the namespaces are unreachable on 127.0.0.1 otherwise)."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def on_client(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        for host, port in targets:
            try:
                async with asyncio.timeout(2):
                    ur, uw = await asyncio.open_connection(host, port)
                break
            except (OSError, TimeoutError):
                continue
        else:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    server = await asyncio.start_server(on_client, *listen)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    from lls.config import ConfigError, load

    ap = argparse.ArgumentParser(prog="python -m lab.cluster", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config.yaml", help="its models are served")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--port", type=int, default=GATEWAY_PORT, help="forwarded to a gateway")
    ap.add_argument("--gpu-mib", type=int, default=8192, help="each host's simulated GPU")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    # Ctrl-C unwinds even where SIGINT came ignored (started in the background by a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # load() resolved relative file:// URLs against the config's folder
    models = msgspec.to_builtins(cfg.models)
    lab = HostLab(
        models,
        args.hosts,
        config={"placer": {"host_lost_after": 10}, "idle_timeout": cfg.idle_timeout},
        gpus=[{"name": "sim", "memory_mib": args.gpu_mib}],
        ui=True,
    )
    try:
        with lab:
            print(f"hosts (network namespaces on bridge {lab.lab.bridge}, {lab.bridge_addr}/24):")  # type: ignore[union-attr]
            for h in lab.hosts:
                print(f"  {h.name}  {h.addr:<15} ns {h.ns:<14} {', '.join(lab._services_of(h.name))}"
                      + ("  + NATS node" if h in lab.hosts[:NATS_NODES] else ""))  # fmt: skip
            print(f"NATS cluster:  {lab.nats_url}")
            print(f"operator creds: {lab.cli_creds}")
            for host in lab.coordinators:
                print(f"gateway on {host}: {lab.gateway_url(host)}/v1")
            print(f"gateway here:  http://127.0.0.1:{args.port}/v1  (dashboard: /dashboard)")
            print(f"models:        {', '.join(models) or '(none configured)'}")
            print(f"logs:          {lab.dir / 'logs'}")
            print("Ctrl-C stops everything and removes what it created", flush=True)
            targets = [(lab.host(h).addr, GATEWAY_PORT) for h in lab.coordinators]
            stop = asyncio.Event()
            try:
                asyncio.run(forward(("127.0.0.1", args.port), targets, stop))
            except KeyboardInterrupt:
                pass
    except KeyboardInterrupt:
        pass
    except LabError as e:
        raise SystemExit(f"error: {e}") from None
    print("stopped; namespaces, bridge, processes and files removed")


if __name__ == "__main__":
    main(sys.argv[1:])
