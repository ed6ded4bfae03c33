"""The one way a service process starts: parse args, load config, connect, run until a signal.

Every service module has `async def run(ctx: ServiceContext) -> None` that returns once
`ctx.stop` is set, and a `__main__.py` that calls `main("name", run)`.

SIGHUP re-reads the config file (`ServiceContext.reload`). A config that does not load is
refused, naming the key, and the running one stays. Otherwise the sections that can change
live (LIVE_SECTIONS) are swapped into `ctx.cfg` in place, so every holder of that object
sees them at once, and the service's `on_reload` hooks rebuild what they derived from it.
The other sections (NATS, cluster, agent; the gateway's listen address) keep their running
values until the service restarts, and the reload says which of them changed.
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

import msgspec

import proto
from lls import auth
from lls.bus import Bus, connect
from lls.config import Config, ConfigError, load

log = logging.getLogger(__name__)

# Swapped in on a reload; every other section needs a restart.
LIVE_SECTIONS = ("models", "idle_timeout", "gateway", "placer", "downloader")
# Read once at start even though their section reloads.
RESTART_KEYS = ("gateway.host", "gateway.port", "gateway.ui_url", "gateway.request_timeout")

# Called after a reload with the config before it and the running one (already updated).
ReloadHook = Callable[[Config, Config], Awaitable[None] | None]


@dataclass
class ServiceContext:
    name: str
    cfg: Config
    bus: Bus
    host_id: str  # this machine's host id (agent and downloader use it)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    port: int | None = None  # for services that listen (gateway, ui)
    config_path: str | None = None  # re-read on SIGHUP; None: nothing to reload from
    on_reload: list[ReloadHook] = field(default_factory=list)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def reload(self) -> bool:
        """Re-read the config file and follow it; False when it was refused."""
        if self.config_path is None:
            return False
        async with self._reloading:  # two quick SIGHUPs: one after the other
            try:
                new = await asyncio.to_thread(load, self.config_path)
            except ConfigError as e:
                log.error("config reload refused, the running config stays: %s", e)
                await self._emit(
                    proto.ConfigRefused(service=self.name, host=self.host_id, reason=str(e))
                )
                return False
            old = msgspec.structs.replace(self.cfg)  # a shallow copy: the sections before
            restart = apply_live(self.cfg, new)
            added, removed, changed = model_changes(old, self.cfg)
            for hook in self.on_reload:
                try:
                    result = hook(old, self.cfg)
                    if result is not None:
                        await result
                except Exception:  # one hook's bug must not leave the others unapplied
                    log.exception("reload hook %r failed", hook)
            log.info(
                "config reloaded from %s: models added %s, removed %s, changed %s",
                self.config_path,
                added or "none",
                removed or "none",
                changed or "none",
            )
            if restart:
                log.warning("changed, but only used after a restart: %s", ", ".join(restart))
            await self._emit(
                proto.ConfigReloaded(
                    service=self.name,
                    host=self.host_id,
                    added=added,
                    removed=removed,
                    changed=changed,
                    restart_needed=restart,
                )
            )
            return True

    async def _emit(self, event: proto.Event) -> None:
        try:
            await self.bus.emit(event)
        except Exception as e:  # noqa: BLE001 - the log line above is the record that counts
            log.warning("cannot emit %s: %s", type(event).__name__, e)


def apply_live(cfg: Config, new: Config) -> list[str]:
    """Swap `new`'s live sections into `cfg` in place; the keys that changed but take effect
    only at the next start."""
    restart = [
        f.name
        for f in msgspec.structs.fields(Config)
        if f.name not in LIVE_SECTIONS and getattr(cfg, f.name) != getattr(new, f.name)
    ]
    restart += [
        k
        for k in RESTART_KEYS
        if getattr(cfg.gateway, k.split(".")[1]) != getattr(new.gateway, k.split(".")[1])
    ]
    for name in LIVE_SECTIONS:
        setattr(cfg, name, getattr(new, name))
    return restart


def model_changes(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """Models added, removed, and changed in any key."""
    added = sorted(set(new.models) - set(old.models))
    removed = sorted(set(old.models) - set(new.models))
    changed = sorted(m for m in set(old.models) & set(new.models) if old.models[m] != new.models[m])
    return added, removed, changed


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
    # Until the loop's handler is in place a SIGHUP (`lls reload`) must not end the process;
    # the config it would re-read is the one just loaded anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
        bus = await connect(
            url,
            name,
            creds=creds,
            tls=cfg.nats.tls,
            limits=cfg.nats.limits,
            replicas=cfg.nats.replicas,
        )
    bus.start_probe()  # so a frozen bus is noticed, and watches are set up again after it
    ctx = ServiceContext(
        name=name,
        cfg=cfg,
        bus=bus,
        host_id=args.host_id or cfg.host_id(),
        port=args.port,
        config_path=args.config,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ctx.stop.set)
    reloads: set[asyncio.Task[bool]] = set()  # held, so a running reload is not collected

    def on_hup() -> None:
        task = asyncio.create_task(ctx.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    log.info("%s started (host %s, nats %s)", name, ctx.host_id, url)
    try:
        await run(ctx)
    finally:
        await bus.close()
        log.info("%s stopped", name)
