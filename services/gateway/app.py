"""The gateway's app: the objects every route shares, and the route families registered on
them. One request lifecycle (lifecycle.Calls) serves every proxied route; each family lives
in its own module:

    routes_openai   OpenAI's and Anthropic's routes, proxied by model (the hot path)
    routes_ollama   the Ollama API (/api/...)
    routes_admin    /health, /v1/models, /metrics, and /dashboard (proxied to the UI)

Who may call what is access.py's; what a client can do before a route sees its request
(browser checks, body bounds) is edge.py's. `fast_path` sends the OpenAI routes straight to
their handler, past FastAPI; every other route goes through FastAPI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lls.config import Config, GatewayConfig

from . import routes_admin, routes_ollama, routes_openai
from .edge import BrowserChecks, open_gateway_warning
from .errors import ApiError, error_response, style_of
from .lifecycle import Calls
from .metrics import Metrics
from .observe import Observer
from .proxy import Upstream
from .router import Router
from .stall import StallWatch
from .usage import KeyLimits, KeyWindow, Usage

log = logging.getLogger(__name__)


def create_app(cfg: Config, router: Router) -> FastAPI:
    """The gateway's app over `router`'s view: the shared objects, then the route families."""
    app = FastAPI(title="llama-scheduler gateway", docs_url=None, redoc_url=None)
    metrics = Metrics()
    upstream = Upstream(cfg, router, metrics)

    router.on_change = metrics.observe_instance
    router.on_reindex = upstream.ready_changed  # a new ready instance takes waiters at once
    app.state.stall = StallWatch(router, upstream.gates, metrics)  # run by the service
    usage = Usage(cfg.gateway.api_keys, metrics)  # per-key limits and token counts
    calls = Calls(usage, upstream, router, Observer(metrics, router.stats))  # every request's
    bound = cfg.gateway.host  # gateway.host is read once: a reload changes it only at restart
    app.state.browser = BrowserChecks.of(cfg.gateway, bound)  # applied in fast_path
    warn_if_open(router, cfg.gateway, bound)
    app.state.reload = reloader(app, router, upstream, usage, bound)
    app.state.upstream = upstream
    app.state.metrics = metrics
    add_error_handlers(app)

    routes_openai.register(app, cfg, router, upstream, calls)  # sets app.state.forward
    routes_ollama.register(app, cfg, router, upstream, calls)
    admin = routes_admin.register(app, cfg, router, upstream, metrics)

    @app.on_event("shutdown")
    async def _close() -> None:
        await upstream.aclose()
        await admin.aclose()

    return app


def warn_if_open(router: Router, g: GatewayConfig, bound: str) -> None:
    """Loudly, in the log and (on the bus) in `lls ps`, while anyone may use the gateway."""
    lines = open_gateway_warning(g, bound)
    for line in lines:
        log.warning("%s", line)
    router.warnings = [" ".join(lines)] if lines else []


def reloader(
    app: FastAPI, router: Router, upstream: Upstream, usage: Usage, bound: str
) -> Callable[[Config, Config], None]:
    """What a reloaded config (lls.service) changes here: `app.state.reload`."""

    def reload(_old: Config, new: Config) -> None:
        """Models, aliases, defaults and keys are read from `cfg` per request already; the
        limits derived from it are set again, keeping what runs (admission slots, each key's
        window of requests)."""
        g = new.gateway
        upstream.reload(new)
        router.reloaded()
        windows: dict[str, KeyWindow] = {}
        for k in g.api_keys:
            if (limits := KeyLimits.of(k)).any:
                windows[k.name] = usage.windows.get(k.name) or KeyWindow(limits)
                windows[k.name].limits = limits
        usage.windows = windows
        app.state.browser = BrowserChecks.of(g, bound)
        warn_if_open(router, g, bound)

    return reload


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the route's own style: Ollama's on /api/..., Anthropic's on
    /v1/messages..., OpenAI's everywhere else."""

    @app.exception_handler(ApiError)
    async def _api_error(req: Request, exc: ApiError) -> Response:
        return exc.response(style_of(req.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(req: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return error_response(exc.status_code, str(exc.detail), code, style=style_of(req.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(req: Request, exc: RequestValidationError) -> Response:
        return error_response(
            400, "invalid request", "invalid_request", style=style_of(req.url.path)
        )

    @app.exception_handler(Exception)
    async def _bug(req: Request, exc: Exception) -> Response:  # still an answer, in JSON
        log.error("request to %s failed", req.url.path, exc_info=exc)
        return error_response(
            500, "internal error in the gateway", "internal_error", style=style_of(req.url.path)
        )


def fast_path(app: FastAPI) -> ASGIApp:
    """The OpenAI proxy routes straight to their handler; everything else through FastAPI.

    The proxy path is the one that must add next to nothing: skipping FastAPI's middleware
    stack, routing and dependency solving there measured ~25% of the gateway's CPU per request.
    Every request first passes the browser checks (edge.BrowserChecks: Host and Origin).
    """
    forward = app.state.forward
    paths = frozenset(routes_openai.OPENAI_ROUTES)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = app.state.browser.refusal(scope["method"], scope["path"], scope["headers"])
            if refused is not None:
                await refused.response(style_of(scope["path"]))(scope, receive, send)
                return
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in paths:
            await guarded(app, scope, receive, send)
            return
        try:
            response = await forward(Request(scope, receive))
        except ApiError as e:
            response = e.response(style_of(scope["path"]))
        except Exception:  # a bug: still an answer in the documented form
            log.exception("request to %s failed", scope["path"])
            response = error_response(
                500,
                "internal error in the gateway",
                "internal_error",
                style=style_of(scope["path"]),
            )
        await response(scope, receive, send)

    return asgi


async def guarded(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """`app`, but an exception that escapes it before its answer started still gets a JSON
    error (uvicorn's own would be a plain-text 500)."""
    started = False

    async def watched_send(message: Message) -> None:
        nonlocal started
        started = True
        await send(message)

    try:
        await app(scope, receive, watched_send)
    except Exception:
        if started or scope["type"] != "http":
            raise
        log.exception("request to %s failed", scope.get("path"))
        await error_response(
            500, "internal error in the gateway", "internal_error", style=style_of(scope["path"])
        )(scope, receive, send)
