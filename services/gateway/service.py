"""Gateway service: the router's watch tasks plus uvicorn serving the FastAPI app."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from lls.bus import new_id
from lls.service import ServiceContext

from .app import create_app, fast_path
from .router import Router

log = logging.getLogger(__name__)


async def run(ctx: ServiceContext) -> None:
    router = Router(ctx.bus, ctx.cfg, gateway_id=f"gw-{ctx.host_id}-{new_id()[:6]}")
    app = create_app(ctx.cfg, router)
    port = ctx.port or ctx.cfg.gateway.port
    server = uvicorn.Server(
        uvicorn.Config(
            fast_path(app),
            host=ctx.cfg.gateway.host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
            lifespan="on",
            http="auto",  # httptools when installed
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    watch = asyncio.create_task(router.run(ctx.stop))
    serve = asyncio.create_task(server.serve())
    log.info("gateway listening on http://%s:%d", ctx.cfg.gateway.host, port)
    stop = asyncio.create_task(ctx.stop.wait())
    done, _ = await asyncio.wait({serve, stop}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    ctx.stop.set()
    await asyncio.gather(serve, watch, return_exceptions=True)
    stop.cancel()
    if serve in done and serve.exception():
        raise serve.exception()  # type: ignore[misc]
