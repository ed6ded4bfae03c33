"""The HTTP surface: OpenAI and Ollama APIs, /health, /metrics, and /dashboard (proxied).

OpenAI bodies are forwarded as the bytes the client sent; only `model` and `stream` are
decoded, with a msgspec struct that skips every other field. Bodies are re-encoded only when
the model has an alias or default parameters to apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

import proto
from lls.config import Config

from . import http, ollama
from .errors import ApiError, error_response
from .metrics import TPS_KEY, Metrics, predicted_per_second
from .proxy import Passthrough, Upstream, forward_headers
from .router import Router

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY_BYTES = 32 << 20
KEEPALIVE_S = 5.0  # SSE comment interval while a streaming request waits for a cold model
OPENAI_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"]


class _Head(msgspec.Struct):
    """The only fields the gateway reads from an OpenAI request body; the rest passes through."""

    model: str
    stream: bool = False


def parse_head(body: bytes) -> _Head:
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
    try:
        return msgspec.json.decode(body, type=_Head)
    except msgspec.ValidationError as e:
        msg = str(e)
        if "missing required field" in msg:
            raise ApiError(400, "missing required field `model`", "missing_model") from None
        raise ApiError(400, f"invalid request body: {msg}", "invalid_request") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None


async def until_disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless(gone: asyncio.Future[None], work: Awaitable[T]) -> T:
    """`work`'s result, unless the client goes first: then `work` is cancelled (releasing
    what it held) and ClientGone is raised."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ApiError(499, "client closed the request", "client_closed")


def check_key(cfg: Config, request: Request, model: str | None, admin: bool = False) -> None:
    """API keys (Bearer or x-api-key), optionally scoped to models; none configured = open."""
    keys = cfg.gateway.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    given = given or request.headers.get("x-api-key", "")
    given = given or request.query_params.get("key", "") or request.cookies.get("lls_key", "")
    key = next((k for k in keys if hmac.compare_digest(k.key, given)), None) if given else None
    if key is None:
        raise ApiError(401, "missing or invalid API key (Bearer or x-api-key)", "invalid_api_key")
    if admin and not key.admin:
        raise ApiError(403, "this API key may not use admin endpoints", "forbidden")
    if model is not None and key.models and model not in key.models:
        raise ApiError(403, f"this API key may not use model {model!r}", "model_forbidden")


def create_app(cfg: Config, router: Router) -> FastAPI:
    app = FastAPI(title="llama-scheduler gateway", docs_url=None, redoc_url=None)
    metrics = Metrics()
    upstream = Upstream(cfg, router, metrics)
    ui_url = cfg.gateway.ui_url.rstrip("/")
    ui_clients: list[http.Client] = []  # made on first use, inside the running loop
    app.state.upstream = upstream
    app.state.metrics = metrics

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

    def resolve(name: str, request: Request) -> str:
        model = cfg.resolve_model(name)
        if model is None:
            raise ApiError(
                404,
                f"model {name!r} does not exist; GET /v1/models lists the models served here",
                "model_not_found",
            )
        check_key(cfg, request, model)
        if "embed" in request.url.path and not cfg.models[model].embeddings:
            raise ApiError(
                400,
                f"model {model!r} does not serve embeddings (set models.{model}.embeddings: true)",
                "embeddings_not_enabled",
            )
        return model

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(
                    413, f"request body over {MAX_BODY_BYTES >> 20} MiB", "body_too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def rewrite(body: bytes, model: str) -> bytes:
        """Apply the canonical model name and per-model defaults (only when needed)."""
        defaults = cfg.models[model].defaults
        data = msgspec.json.decode(body)
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_request")
        data["model"] = model
        for k, v in defaults.items():
            data.setdefault(k, v)
        return msgspec.json.encode(data)

    # ------------------------------------------------------------------ OpenAI API

    @app.get("/health")
    async def health() -> Response:
        ok = router.bus.nc.is_connected
        body = {"status": "ok" if ok else "degraded", "nats": ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(cfg, request, None)
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "llama-scheduler",
                "state": router.state_of(name),
                "aliases": cfg.models[name].aliases,
            }
            for name in cfg.models
        ]
        return JSONResponse({"object": "list", "data": data})

    def observe_speed(model: str, data: bytes) -> None:
        if (tps := predicted_per_second(data)) is not None:
            metrics.tokens_per_second.labels(model).observe(tps)

    async def forward(request: Request) -> Response:
        started = time.monotonic()
        route = request.url.path
        body = await read_body(request)
        head = parse_head(body)
        model = resolve(head.model, request)
        if head.model != model or cfg.models[model].defaults:
            body = rewrite(body, model)
        headers = forward_headers(request.headers)
        if head.stream and router.pick(model) is None:
            return cold_stream(model, route, body, headers, started)
        # Watch for the client leaving: a non-streamed answer, or a wait for a cold model,
        # must not keep a slot (or the instance's work) for a client that is gone.
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            resp, release = await unless(gone, upstream.open(model, route, body, headers))

            def done() -> None:
                release()
                metrics.requests.labels(model, route, str(resp.status_code)).inc()
                metrics.latency.labels(model, route).observe(time.monotonic() - started)

            if head.stream and resp.status_code == 200:

                def first_chunk() -> None:
                    metrics.ttft.labels(model, route).observe(time.monotonic() - started)

                def chunk(data: bytes) -> None:
                    if TPS_KEY in data:  # the last chunk carries the timings
                        observe_speed(model, data)

                return Passthrough(resp, on_close=done, on_first=first_chunk, on_chunk=chunk)
            # A whole answer: llama-server sends it at the end anyway, so take it in and pass
            # it on in one piece (fewer socket writes than re-chunking it).
            try:
                data = await unless(gone, resp.aread())
            finally:
                await resp.aclose()  # unread (client gone): closing it stops the generation
                done()
            observe_speed(model, data)
        finally:
            gone.cancel()
        if resp.status_code == 501:  # a feature this model was not started with: client's call
            try:
                detail = msgspec.json.decode(data)["error"]["message"]
            except (msgspec.DecodeError, KeyError, TypeError):
                detail = "not supported"
            raise ApiError(
                400, f"model {model!r}: {detail} (see models.{model}.args)", "not_supported"
            )
        return Response(data, resp.status_code, headers=forward_headers(resp.headers))

    def cold_stream(
        model: str, route: str, body: bytes, headers: dict[str, str], started: float
    ) -> Response:
        """A streaming request for a cold model: answer the head now and send SSE comments
        while the model starts, so proxies in between do not time out."""

        async def events() -> AsyncIterator[bytes]:
            opening = asyncio.ensure_future(upstream.open(model, route, body, headers))
            try:
                while True:
                    done, _ = await asyncio.wait({opening}, timeout=KEEPALIVE_S)
                    if done:
                        break
                    yield b": waiting for the model to start\n\n"
                try:
                    resp, release = opening.result()
                except ApiError as e:
                    err = {
                        "error": {
                            "message": e.message,
                            "type": "service_unavailable",
                            "code": e.code,
                        }
                    }
                    yield b"data: " + msgspec.json.encode(err) + b"\n\n"
                    return
                try:
                    metrics.ttft.labels(model, route).observe(time.monotonic() - started)
                    async for chunk in resp.aiter_raw():
                        yield chunk
                finally:
                    await resp.aclose()
                    release()
                    metrics.requests.labels(model, route, str(resp.status_code)).inc()
            finally:
                if not opening.done():  # client gone while waiting: give up the wait
                    opening.cancel()
                    with contextlib.suppress(BaseException):
                        await opening

        return StreamingResponse(events(), media_type="text/event-stream")

    for path in OPENAI_ROUTES:  # also routed here, so 405s and the like read the same
        app.add_api_route(path, forward, methods=["POST"], include_in_schema=False)
    app.state.forward = forward

    # ------------------------------------------------------------------ Ollama API

    async def ollama_call(
        request: Request, path: str, make_body, reply, stream_generate: bool | None
    ) -> Response:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        req = ollama.parse_body(await read_body(request))
        model = resolve(req["model"], request)
        out = make_body(req, model)
        if isinstance(out, tuple):
            path, out = out
        for k, v in cfg.models[model].defaults.items():
            out.setdefault(k, v)
        body = msgspec.json.encode(out)
        headers = {"content-type": "application/json"}
        if stream_generate is not None and out.get("stream"):
            return StreamingResponse(
                ndjson(model, path, body, headers, started, stream_generate),
                media_type="application/x-ndjson",
            )
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            resp, release = await unless(gone, upstream.open(model, path, body, headers))
            try:
                data = await unless(gone, resp.aread())
            finally:
                await resp.aclose()
                release()
        finally:
            gone.cancel()
        if resp.status_code != 200:
            return Response(data, resp.status_code, media_type="application/json")
        observe_speed(model, data)
        return JSONResponse(reply(model, msgspec.json.decode(data), started))

    async def ndjson(
        model: str, path: str, body: bytes, headers: dict[str, str], started: float, generate: bool
    ) -> AsyncIterator[bytes]:
        try:
            resp, release = await upstream.open(model, path, body, headers)
        except ApiError as e:
            yield msgspec.json.encode({"error": e.message}) + b"\n"
            return
        try:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                yield msgspec.json.encode({"error": text}) + b"\n"
                return
            async for line in ollama.sse_to_ndjson(resp.aiter_lines(), model, started, generate):
                yield line
        finally:
            await resp.aclose()
            release()

    @app.post("/api/chat")
    async def api_chat(request: Request) -> Response:
        return await ollama_call(
            request, "/v1/chat/completions", ollama.chat_request, ollama.chat_response, False
        )

    @app.post("/api/generate")
    async def api_generate(request: Request) -> Response:
        def reply(model: str, data: dict[str, Any], started: float) -> dict[str, Any]:
            return ollama.as_generate(ollama.chat_response(model, data, started))

        return await ollama_call(request, "", ollama.generate_request, reply, True)

    def embed_route(legacy: bool):  # type: ignore[no-untyped-def]
        """/api/embed (`input`, `embeddings`) and the older /api/embeddings (`prompt`)."""

        async def handler(request: Request) -> Response:
            return await ollama_call(
                request,
                "/v1/embeddings",
                lambda req, m: ollama.embed_request(req, m, legacy=legacy),
                lambda m, d, _s: ollama.embed_response(m, d, legacy=legacy),
                None,
            )

        return handler

    app.add_api_route("/api/embed", embed_route(False), methods=["POST"])
    app.add_api_route("/api/embeddings", embed_route(True), methods=["POST"])

    @app.get("/api/tags")
    async def api_tags(request: Request) -> Response:
        check_key(cfg, request, None)
        return JSONResponse({"models": [ollama.model_entry(n, 0) for n in cfg.models]})

    @app.get("/api/ps")
    async def api_ps(request: Request) -> Response:
        check_key(cfg, request, None)
        running = []
        for name in cfg.models:
            for rec in router.ready.get(name, []):
                entry = ollama.model_entry(name, rec.memory_mib << 20)
                entry["size_vram"] = (rec.memory_mib << 20) if rec.gpus else 0
                idle = cfg.models[name].idle_timeout
                idle = cfg.idle_timeout if idle is None else idle
                used = router.last_used.get(rec.instance_id, rec.ready_at or rec.updated)
                expires = used + idle if idle else time.time() + 10 * 365 * 86400
                entry["expires_at"] = ollama.iso(expires)
                running.append(entry)
        return JSONResponse({"models": running})

    @app.post("/api/show")
    async def api_show(request: Request) -> Response:
        req = ollama.parse_body(await read_body(request))
        model = resolve(req["model"], request)
        m = cfg.models[model]
        summary, size = await router.header_of(model)
        details = ollama.model_entry(model, size or 0)["details"]
        model_info: dict[str, object] = {}
        if summary is not None:  # known once a host holds the file or its header was read
            facts, model_info = ollama.model_facts(summary)
            details.update(facts)
        return JSONResponse(
            {
                "modelfile": f"FROM {m.url}",
                "parameters": " ".join(m.args),
                "template": "",
                "details": details,
                "model_info": {**model_info, "llama_scheduler.ctx_size": m.ctx_size},
                "capabilities": ["embedding"] if m.embeddings else ["completion"],
            }
        )

    @app.get("/api/version")
    async def api_version() -> Response:
        return JSONResponse({"version": ollama.OLLAMA_VERSION})

    # ------------------------------------------------------------------ admin

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        check_key(cfg, request, None, admin=True)
        for model, gate in upstream.gates.items():
            metrics.queue_depth.labels(model).set(gate.queued)
            metrics.in_flight.labels(model).set(gate.in_flight)
        counts = {s.value: 0 for s in proto.InstanceState}
        for rec in router.instances.values():
            counts[rec.state.value] += 1
        for state, n in counts.items():
            metrics.instances.labels(state).set(n)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/dashboard{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def dashboard(request: Request, rest: str) -> Response:
        check_key(cfg, request, None, admin=True)
        if not ui_clients:
            ui_clients.append(http.Client(read_timeout=None, max_connections=256))
        query = f"?{request.url.query}" if request.url.query else ""
        try:
            resp = await ui_clients[0].send(
                request.method,
                f"{ui_url}/dashboard{rest}{query}",
                await request.body(),
                forward_headers(request.headers),
            )
        except http.TransportError as e:
            raise ApiError(502, f"dashboard service unreachable: {e!r}", "ui_unavailable") from None
        out = Passthrough(resp)
        if request.query_params.get("key"):  # the browser keeps the key for the page's own calls
            out.set_cookie("lls_key", request.query_params["key"], httponly=True, samesite="strict")
        return out

    @app.on_event("shutdown")
    async def _close() -> None:
        await upstream.aclose()
        for client in ui_clients:
            await client.aclose()

    return app


def fast_path(app: FastAPI) -> ASGIApp:
    """The OpenAI proxy routes straight to their handler; everything else through FastAPI.

    The proxy path is the one that must add next to nothing: skipping FastAPI's middleware
    stack, routing and dependency solving there measured ~25% of the gateway's CPU per request.
    """
    forward = app.state.forward
    paths = frozenset(OPENAI_ROUTES)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in paths:
            await app(scope, receive, send)
            return
        try:
            response = await forward(Request(scope, receive))
        except ApiError as e:
            response = e.response()
        except Exception:  # a bug: still an answer in the documented form
            log.exception("request to %s failed", scope["path"])
            response = error_response(500, "internal error in the gateway", "internal_error")
        await response(scope, receive, send)

    return asgi
