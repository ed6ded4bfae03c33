"""The UI service: feeds the view from the bus and serves the dashboard until ctx.stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from urllib.parse import urlparse

import uvicorn

from lls.config import Config
from lls.service import ServiceContext
from lls.ui_secret import ENV, ui_secret
from services.ui.app import create_app, require_secret
from services.ui.feed import Feed
from services.ui.hub import Hub
from services.ui.view import View

log = logging.getLogger(__name__)

DEFAULT_PORT = 5001


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # signals belong to lls.service, which sets ctx.stop


def listen_port(ctx: ServiceContext) -> int:
    """--port, else the port the gateway proxies /dashboard to, else 5001."""
    if ctx.port is not None:
        return ctx.port
    return urlparse(ctx.cfg.gateway.ui_url).port or DEFAULT_PORT


def listen_host(ctx: ServiceContext) -> str:
    """The host of gateway.ui_url (loopback by default), never gateway.host: exposing the
    gateway must not expose the dashboard's data past the gateway's admin check."""
    return urlparse(ctx.cfg.gateway.ui_url).hostname or "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, which calls sys.exit() on a busy port."""
    family, kind, proto_, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto_)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"ui: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


async def run(ctx: ServiceContext) -> None:
    view = View(host_lost_after=ctx.cfg.placer.host_lost_after)
    view.set_models(ctx.cfg.models)
    hub = Hub()
    feed = Feed(ctx.bus, view, hub)
    host, port = listen_host(ctx), listen_port(ctx)
    if not is_loopback(host) and not os.environ.get(ENV):
        log.warning(
            "ui: listening on %s; set %s to the same value for the gateway and the UI, "
            "or the gateway cannot reach the dashboard from another host",
            host,
            ENV,
        )
    sock = bind(host, port)

    def follow_config(_old: Config, new: Config) -> None:  # models reload live
        view.set_models(new.models)
        hub.resync()

    ctx.on_reload.append(follow_config)
    server = _Server(
        uvicorn.Config(
            require_secret(create_app(view, hub, ctx.bus), ui_secret()),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=3,
        )
    )
    try:
        await feed.start()
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        log.info("ui: dashboard at http://%s:%d/dashboard", host, port)
        stopping = asyncio.create_task(ctx.stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        hub.close()  # end the SSE streams so shutdown does not wait for browsers
        server.should_exit = True
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    finally:
        await feed.stop()
        sock.close()
