"""The one way a service process starts: parse args, load config, connect, run until a signal.

Every service module has `async def run(ctx: ServiceContext) -> None` that returns once
`ctx.stop` is set, and a `__main__.py` that calls `main("name", run)`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from lls import auth
from lls.bus import Bus, connect
from lls.config import Config, ConfigError, load

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    name: str
    cfg: Config
    bus: Bus
    host_id: str  # this machine's host id (agent and downloader use it)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    port: int | None = None  # for services that listen (gateway, ui)


def parse_args(name: str, argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m services.{name}")
    ap.add_argument("--config", default="config.yaml", help="YAML config file")
    ap.add_argument("--nats", default="", help="NATS URL (default: nats.url from the config)")
    ap.add_argument(
        "--nats-creds",
        default="",
        help="identity file (default: $LLS_NATS_CREDS, else nats.credentials_dir/<identity>.json)",
    )
    ap.add_argument("--host-id", default="", help="host id (default: agent.host_id or hostname)")
    ap.add_argument("--port", type=int, default=None, help="listen port (gateway, ui)")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {name:<10} %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "docker", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(
    name: str, run: Callable[[ServiceContext], Awaitable[None]], argv: list[str] | None = None
) -> None:
    args = parse_args(name, argv)
    setup_logging(args.log_level, name)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    url = args.nats or cfg.nats.url
    if url == "embedded":
        print("error: --nats URL is required when nats.url is 'embedded'", file=sys.stderr)
        raise SystemExit(2)
    host_id = args.host_id or cfg.host_id()
    try:
        creds = auth.resolve(cfg, auth.service_user(name, host_id), args.nats_creds)
    except auth.AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        asyncio.run(_serve(name, run, cfg, url, creds, args))
    except KeyboardInterrupt:
        pass


async def _serve(
    name: str,
    run: Callable[[ServiceContext], Awaitable[None]],
    cfg: Config,
    url: str,
    creds: Path,
    args: argparse.Namespace,
) -> None:
    async with asyncio.timeout(35):
        bus = await connect(url, name, creds=creds, tls=cfg.nats.tls, limits=cfg.nats.limits)
    bus.start_probe()  # so a frozen bus is noticed, and watches are set up again after it
    ctx = ServiceContext(
        name=name, cfg=cfg, bus=bus, host_id=args.host_id or cfg.host_id(), port=args.port
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ctx.stop.set)
    log.info("%s started (host %s, nats %s)", name, ctx.host_id, url)
    try:
        await run(ctx)
    finally:
        await bus.close()
        log.info("%s stopped", name)
