"""Gateway service: the router's watch tasks plus uvicorn serving the FastAPI app.

uvicorn runs with the edge's protocol (services.gateway.edge.GuardedHttp): request heads and
bodies have deadlines and the number of connections is bounded by the open-file limit, so
idle or slow clients cannot exhaust the gateway. A probe pings NATS every second, because a
frozen server looks connected to nats-py for minutes; cold requests are refused at once
while the bus is silent (warm ones need no bus and keep being served).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from lls.bus import new_id
from lls.service import ServiceContext

from .app import create_app, fast_path
from .edge import GuardedHttp, connection_budget, open_file_limit
from .router import Router

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 15.0  # an idle keep-alive connection is closed after this


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket that the other gateway workers bind too (SO_REUSEPORT): the kernel
    spreads new connections over them. Only with gateway.workers > 1, so a second `make run`
    by mistake still finds the port taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(False)
    return sock


async def run(ctx: ServiceContext) -> None:
    router = Router(ctx.bus, ctx.cfg, gateway_id=f"gw-{ctx.host_id}-{new_id()[:6]}")
    app = create_app(ctx.cfg, router)
    ctx.on_reload.append(app.state.reload)
    port = ctx.port or ctx.cfg.gateway.port
    GuardedHttp.max_connections = connection_budget(open_file_limit())
    server = uvicorn.Server(
        uvicorn.Config(
            fast_path(app),
            host=ctx.cfg.gateway.host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            lifespan="on",
            http=GuardedHttp,  # httptools, with deadlines and a connection budget
            backlog=4096,
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    sockets = [shared_socket(ctx.cfg.gateway.host, port)] if ctx.cfg.gateway.workers > 1 else None
    watch = asyncio.create_task(router.run(ctx.stop))
    stall = asyncio.create_task(app.state.stall.run(ctx.stop))
    serve = asyncio.create_task(server.serve(sockets=sockets))
    log.info(
        "gateway listening on http://%s:%d (at most %d connections)",
        ctx.cfg.gateway.host,
        port,
        GuardedHttp.max_connections,
    )
    stop = asyncio.create_task(ctx.stop.wait())
    done, _ = await asyncio.wait({serve, stop}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    ctx.stop.set()
    await asyncio.gather(serve, watch, stall, return_exceptions=True)
    stop.cancel()
    if serve in done and serve.exception():
        raise serve.exception()  # type: ignore[misc]
