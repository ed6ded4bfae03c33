"""The HTTP surface: OpenAI API routes, /health, and /dashboard proxied to the UI service.

Bodies are forwarded as the bytes the client sent; only `model` (and `stream`) are decoded,
with a msgspec struct that skips every other field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from lls.config import Config

from .errors import ApiError, error_response
from .router import Router

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
OPENAI_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"]


class _Head(msgspec.Struct):
    """The only fields the gateway reads from a request body; the rest passes through."""

    model: str


def _forward_headers(headers: httpx.Headers | dict) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def parse_model(body: bytes) -> str:
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
    try:
        head = msgspec.json.decode(body, type=_Head)
    except msgspec.ValidationError as e:
        msg = str(e)
        if "missing required field" in msg:
            raise ApiError(400, "missing required field `model`", "missing_model") from None
        raise ApiError(400, f"invalid request body: {msg}", "invalid_request") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    return head.model


def create_app(cfg: Config, router: Router) -> FastAPI:
    app = FastAPI(title="llama-scheduler gateway", docs_url=None, redoc_url=None)
    timeout = httpx.Timeout(connect=5.0, read=cfg.gateway.request_timeout, write=30.0, pool=30.0)
    upstream = httpx.AsyncClient(
        timeout=timeout,
        limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256),
    )
    ui = httpx.AsyncClient(base_url=cfg.gateway.ui_url, timeout=httpx.Timeout(30.0, read=None))
    app.state.upstream = upstream

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> Response:
        return error_response(400, str(exc.errors()), "invalid_request")

    @app.get("/health")
    async def health() -> Response:
        ok = router.bus.nc.is_connected
        body = {"status": "ok" if ok else "degraded", "nats": ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "llama-scheduler",
                "state": router.state_of(name),
            }
            for name in cfg.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def forward(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", "body_too_large")
        model = parse_model(body)
        if model not in cfg.models:
            raise ApiError(
                404,
                f"model {model!r} does not exist; GET /v1/models lists the models served here",
                "model_not_found",
            )
        return await proxy_to_instance(request, model, body)

    async def proxy_to_instance(request: Request, model: str, body: bytes) -> Response:
        headers = _forward_headers(request.headers)
        for attempt in range(2):  # one retry when an endpoint refuses the connection
            rec = await router.acquire(model, cfg.gateway.cold_start_timeout)
            req = upstream.build_request(
                request.method, f"{rec.endpoint}{request.url.path}", content=body, headers=headers
            )
            router.begin(rec)
            try:
                resp = await upstream.send(req, stream=True)
            except httpx.ConnectError as e:
                router.end(rec)
                router.mark_bad(rec)
                if attempt == 0:
                    continue
                raise ApiError(
                    502, f"instance of {model} unreachable: {e}", "upstream_error", 2
                ) from None
            except (httpx.TimeoutException, httpx.TransportError) as e:
                router.end(rec)
                raise ApiError(
                    502, f"instance of {model} failed: {e!r}", "upstream_error", 2
                ) from None
            return Passthrough(resp, on_close=lambda rec=rec: router.end(rec))
        raise AssertionError("unreachable")

    for path in OPENAI_ROUTES:
        app.add_api_route(path, forward, methods=["POST"], include_in_schema=False)

    @app.api_route("/dashboard{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def dashboard(request: Request, rest: str) -> Response:
        url = httpx.URL(path=f"/dashboard{rest}", query=request.url.query.encode())
        req = ui.build_request(
            request.method,
            url,
            headers=_forward_headers(request.headers),
            content=await request.body(),
        )
        try:
            resp = await ui.send(req, stream=True)
        except httpx.TransportError as e:
            raise ApiError(502, f"dashboard service unreachable: {e!r}", "ui_unavailable") from None
        return Passthrough(resp)

    @app.on_event("shutdown")
    async def _close() -> None:
        await upstream.aclose()
        await ui.aclose()

    app.state.started = time.time()
    return app


class Passthrough(StreamingResponse):
    """An upstream response streamed to the client chunk by chunk as it arrives.

    Whatever ends it (done, client gone, error), the upstream response is closed, which
    cancels the generation upstream, and `on_close` releases what the request held.
    """

    def __init__(self, resp: httpx.Response, on_close: Callable[[], None] | None = None):
        super().__init__(
            resp.aiter_raw(), status_code=resp.status_code, headers=_forward_headers(resp.headers)
        )
        self._upstream = resp
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()
            if self._on_close is not None:
                self._on_close()
