"""The HTTP surface: OpenAI and Ollama APIs, /health, /metrics, and /dashboard (proxied).

OpenAI bodies are forwarded as the bytes the client sent; only `model` and `stream` are
decoded, with a msgspec struct that skips every other field. Bodies are re-encoded only when
the model has an alias or default parameters to apply, or an untrusted caller set
llama-server's slot fields (SLOT_FIELDS, dropped).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any
from urllib.parse import urlencode

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import proto
from lls.config import ApiKey, Config, GatewayConfig, store_filename_of
from services.ui.secret import SECRET_HEADER, ui_secret

from . import http, ollama, pull
from .admission import BY_ADDRESS, stage_of
from .edge import BrowserChecks, decode_body, open_gateway_warning
from .errors import ApiError, error_response, style_of
from .lifecycle import Calls, unless, until_disconnected, upstream_error
from .metrics import Metrics
from .observe import Observer
from .proxy import UPSTREAM_HEADERS, Passthrough, Upstream, forward_headers
from .router import Router
from .stall import StallWatch
from .template import template_in_use
from .usage import KeyLimits, KeyWindow, Usage

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
# Proxied by model: the body's `model` picks the instance, the rest passes through as sent.
# llama-server serves them all natively (OpenAI, Anthropic's messages, rerank, infill).
OPENAI_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/responses/input_tokens",
    "/v1/messages",  # Anthropic; its errors in Anthropic's shape (errors.style_of)
    "/v1/messages/count_tokens",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/reranking",
    "/infill",
]


# llama-server request fields that pick a slot and its prompt cache: with them a caller can
# aim at the slot another tenant's prompt is cached in and read from `timings.cache_n`
# whether a guess of that prompt is cached. Only trusted callers' reach it.
SLOT_FIELDS = ("id_slot", "cache_prompt")


class _Head(msgspec.Struct):
    """The only fields the gateway reads from an OpenAI request body; the rest passes through.
    SLOT_FIELDS are only noticed (kept raw, in the same pass): no extra decoding without them."""

    model: str
    stream: bool = False
    id_slot: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    cache_prompt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET

    def sets_slots(self) -> bool:
        return self.id_slot is not msgspec.UNSET or self.cache_prompt is not msgspec.UNSET


_HEAD = msgspec.json.Decoder(_Head)


def parse_head(body: bytes) -> _Head:
    return decode_body(_HEAD, body)


def on_dashboard(path: str) -> bool:
    """The browser's pages: the only routes that take a key from the URL or a cookie (a
    browser opening a link cannot send a header)."""
    return path == "/dashboard" or path.startswith("/dashboard/")


def presented_key(request: Request) -> str:
    """The key a client sent: Bearer or x-api-key; on /dashboard paths also `?key=` or the
    dashboard's cookie. A key in the URL of any other route is refused: URLs end up in
    proxy logs and browser history."""
    headers = request.headers
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    given = given or headers.get("x-api-key", "")
    query = request.scope.get("query_string")
    if on_dashboard(request.scope["path"]):
        if not given and (query or "cookie" in headers):
            given = request.query_params.get("key", "") or request.cookies.get("lls_key", "")
    elif query and "key" in request.query_params:
        raise ApiError(
            401,
            "API keys are not taken from the URL here (URLs end up in logs and browser "
            "history): send `Authorization: Bearer KEY` or `x-api-key: KEY`; only /dashboard "
            "takes ?key=",
            "key_in_url",
        )
    return given


def client(request: Request, key: ApiKey | None) -> str:
    """Who a request is from, for fair queuing: its API key's name, else its address."""
    if key is not None:
        return key.name
    return request.client.host if request.client else ""


def shown(key: ApiKey | None) -> str:
    """What the activity report calls a request's client: its key's name; addresses stay
    here (they are summed under BY_ADDRESS)."""
    return key.name if key is not None else BY_ADDRESS


def authenticate(cfg: Config, request: Request) -> ApiKey | None:
    """The caller's API key, from headers only (before any body is read); None when the
    gateway is open. A missing, unknown or malformed key (non-ASCII, say) is a 401."""
    keys = cfg.gateway.api_keys
    if not keys:
        return None
    given = presented_key(request).encode("utf-8", "replace")
    found = None
    for k in keys:  # compare against every key: the time taken does not tell which matched
        if hmac.compare_digest(k.key.encode(), given) and given:
            found = k
    if found is None:
        raise ApiError(401, "missing or invalid API key (Bearer or x-api-key)", "invalid_api_key")
    return found


def trusted(key: ApiKey | None) -> bool:
    """Whether a caller's SLOT_FIELDS reach llama-server: a trusted key's, and anyone's on an
    open gateway (no keys: no tenants to keep apart, and it warns when open to the network)."""
    return key is None or key.trusted


def may_use(key: ApiKey | None, model: str) -> bool:
    return key is None or not key.models or model in key.models


def check_key(cfg: Config, request: Request, model: str | None, admin: bool = False) -> None:
    """API keys (Bearer or x-api-key), optionally scoped to models; none configured = open."""
    key = authenticate(cfg, request)
    if key is None:
        return
    if admin and not key.admin:
        raise ApiError(403, "this API key may not use admin endpoints", "forbidden")
    if model is not None and not may_use(key, model):
        raise ApiError(403, f"this API key may not use model {model!r}", "model_forbidden")


# Headers the dashboard needs from the browser; the client's key and cookies stay here.
UI_HEADERS = ("accept", "content-type", "last-event-id", "cache-control", "if-none-match")


def create_app(cfg: Config, router: Router) -> FastAPI:
    app = FastAPI(title="llama-scheduler gateway", docs_url=None, redoc_url=None)
    metrics = Metrics()
    upstream = Upstream(cfg, router, metrics)

    router.on_change = metrics.observe_instance
    router.on_reindex = upstream.ready_changed  # a new ready instance takes waiters at once
    app.state.stall = StallWatch(router, upstream.gates, metrics)  # run by the service
    usage = Usage(cfg.gateway.api_keys, metrics)  # per-key limits and token counts
    calls = Calls(usage, upstream, router, Observer(metrics, router.stats))  # every request's
    ui_url = cfg.gateway.ui_url.rstrip("/")
    bound = cfg.gateway.host  # gateway.host is read once: a reload changes it only at restart
    app.state.browser = BrowserChecks.of(cfg.gateway, bound)  # applied in fast_path

    def warn_if_open(g: GatewayConfig) -> None:
        """Loudly, in the log and (on the bus) in `lls ps`, while anyone may use the gateway."""
        lines = open_gateway_warning(g, bound)
        for line in lines:
            log.warning("%s", line)
        router.warnings = [" ".join(lines)] if lines else []

    warn_if_open(cfg.gateway)

    def reload(_old: Config, new: Config) -> None:
        """A reloaded config (lls.service): models, aliases, defaults and keys are read from
        `cfg` per request already; the limits derived from it are set again, keeping what
        runs (admission slots, each key's window of requests)."""
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
        warn_if_open(g)

    app.state.reload = reload
    ui_clients: list[http.Client] = []  # made on first use, inside the running loop
    app.state.upstream = upstream
    app.state.metrics = metrics

    # Every error in the route's own style: Ollama's on /api/..., Anthropic's on
    # /v1/messages..., OpenAI's everywhere else.
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

    def resolve(name: str, key: ApiKey | None, path: str) -> str:
        """The configured model a name stands for, if this key may use it. A scoped key gets
        the same 403 for a model outside its scope and for one that does not exist."""
        model = cfg.resolve_model(name)
        if key is not None and key.models and model not in key.models:
            raise ApiError(403, f"this API key may not use model {name!r}", "model_forbidden")
        if model is None:
            raise ApiError(
                404,
                f"model {name!r} does not exist; GET /v1/models lists the models served here",
                "model_not_found",
            )
        if "embed" in path and not cfg.models[model].embeddings:
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

    def rewrite(body: bytes, model: str, drop_slots: bool = False) -> bytes:
        """Apply the canonical model name, drop an untrusted caller's SLOT_FIELDS, and apply
        per-model defaults (the operator's may set them); only when needed."""
        defaults = cfg.models[model].defaults
        try:
            data = msgspec.json.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_request")
        data["model"] = model
        if drop_slots:
            for field in SLOT_FIELDS:
                data.pop(field, None)
        for k, v in defaults.items():
            data.setdefault(k, v)
        return msgspec.json.encode(data)

    # ------------------------------------------------------------------ OpenAI API

    @app.get("/health")
    async def health() -> Response:
        down = router.bus_down_reason(grace_s=0)
        ok = down is None and router.bus.nc.is_connected
        body: dict[str, object] = {"status": "ok" if ok else "degraded", "nats": ok}
        if not ok:
            body["bus"] = down or "the message bus (NATS) is unreachable; reconnecting"
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        key = authenticate(cfg, request)
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "llama-scheduler",
                "state": router.state_of(name),
                "aliases": cfg.models[name].aliases,
                # what the Anthropic client's models.list() reads; OpenAI's ignore them
                "type": "model",
                "display_name": name,
                "created_at": "1970-01-01T00:00:00Z",
            }
            for name in cfg.models
            if may_use(key, name)
        ]
        page = {"has_more": False, "first_id": data[0]["id"] if data else None}
        page["last_id"] = data[-1]["id"] if data else None
        return JSONResponse({"object": "list", "data": data, **page})

    def upstream_subset(request: Request) -> dict[str, str]:
        """The client's headers an instance needs (proxy.upstream_headers adds its key)."""
        return {k: v for k, v in request.headers.items() if k in UPSTREAM_HEADERS}

    async def forward(request: Request) -> Response:
        started = time.monotonic()
        route = request.scope["path"]
        key = authenticate(cfg, request)  # from the headers: no body is read for a bad key
        body = await read_body(request)
        head = parse_head(body)
        model = resolve(head.model, key, route)
        drop_slots = head.sets_slots() and not trusted(key)
        if head.model != model or cfg.models[model].defaults or drop_slots:
            body = rewrite(body, model, drop_slots)
        headers = upstream_subset(request)
        who = client(request, key)
        call = calls.call(request.receive, model, route, key, who, shown(key), started)
        call.admit()  # 429 past the key's limits
        gate = upstream.gate(model)
        if head.stream and (router.pick(model) is None or gate.would_queue(overlap=False)):
            return call.waiting(route, body, headers, waiting_comment)
        resp = await call.open(route, body, headers, overlap=not head.stream)
        if head.stream and resp.status_code == 200:
            return call.relay(resp.aiter_raw(), forward_headers(resp.headers), None, call.chunk)
        # A whole answer: llama-server sends it at the end anyway, so take it in and pass
        # it on in one piece (fewer socket writes than re-chunking it).
        data = await call.read()  # an error answer is raised as ours
        return Response(data, resp.status_code, headers=forward_headers(resp.headers))

    def waiting_comment(model: str, ticket: int) -> bytes:
        gate = upstream.gate(model)
        gated = gate.order()
        place, total = router.position(model, ticket, gated)
        where = f"position {place} of {total}" if place else "sending"
        stage = stage_of(
            ticket in gated,
            bool(router.ready.get(model)),
            gate.in_flight,
            gate.slots,
            router.describe(model),
        )
        return f": waiting for {model}: {where}; {stage}\n\n".encode()

    for path in OPENAI_ROUTES:  # also routed here, so 405s and the like read the same
        app.add_api_route(path, forward, methods=["POST"], include_in_schema=False)
    app.state.forward = forward

    # ------------------------------------------------------------------ Ollama API

    async def ollama_call(
        request: Request, kind: type, path: str, make_body, reply, stream_generate: bool | None
    ) -> Response:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        route = request.scope["path"]
        key = authenticate(cfg, request)
        req = ollama.parse_body(await read_body(request), kind)
        model = resolve(req.model, key, route)
        keep_alive = ollama.keep_alive_seconds(getattr(req, "keep_alive", None))
        out = make_body(req, model)
        if isinstance(out, tuple):
            path, out = out
        for k, v in cfg.models[model].defaults.items():
            out.setdefault(k, v)
        body = msgspec.json.encode(out)
        streamed = stream_generate is not None and bool(out.get("stream"))
        who = client(request, key)
        call = calls.call(request.receive, model, route, key, who, shown(key), started)
        call.admit()  # 429 past the key's limits
        # Opened before the answer's head, streamed or not: an error the instance gives
        # (images for a model without vision, say) is then a 4xx, not a 200 stream.
        resp = await call.open(
            path,
            body,
            {"content-type": "application/json"},
            keep_alive=keep_alive,
            overlap=not streamed,
        )
        if streamed and resp.status_code == 200:
            lines = ollama.sse_to_ndjson(
                call.lines(resp.aiter_lines()), model, started, bool(stream_generate)
            )
            return call.relay(lines, media_type="application/x-ndjson")
        data = await call.read()  # an error answer is raised as ours
        if resp.status_code != 200:  # a 2xx or 3xx llama-server does not send: not an answer
            raise upstream_error(model, resp.status_code, data)
        try:
            answer = msgspec.json.decode(data)
        except msgspec.DecodeError:
            raise upstream_error(model, 502, data) from None
        return JSONResponse(reply(model, answer, started))

    @app.post("/api/chat")
    async def api_chat(request: Request) -> Response:
        return await ollama_call(
            request,
            ollama.ChatRequest,
            "/v1/chat/completions",
            ollama.chat_request,
            ollama.chat_response,
            False,
        )

    @app.post("/api/generate")
    async def api_generate(request: Request) -> Response:
        def reply(model: str, data: dict[str, Any], started: float) -> dict[str, Any]:
            return ollama.as_generate(ollama.chat_response(model, data, started))

        return await ollama_call(
            request, ollama.GenerateRequest, "", ollama.generate_request, reply, True
        )

    def embed_route(legacy: bool):  # type: ignore[no-untyped-def]
        """/api/embed (`input`, `embeddings`) and the older /api/embeddings (`prompt`)."""

        async def handler(request: Request) -> Response:
            return await ollama_call(
                request,
                ollama.EmbedRequest,
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
        key = authenticate(cfg, request)
        names = [n for n in cfg.models if may_use(key, n)]
        return JSONResponse({"models": [ollama.model_entry(n, 0) for n in names]})

    @app.get("/api/ps")
    async def api_ps(request: Request) -> Response:
        key = authenticate(cfg, request)
        running = []
        for name in cfg.models:
            if not may_use(key, name):
                continue
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
        key = authenticate(cfg, request)
        req = ollama.parse_body(await read_body(request), ollama.ShowRequest)
        model = resolve(req.model or req.name, key, request.url.path)
        m = cfg.models[model]
        admin = key is None or key.admin  # where it comes from and how it runs: admins only
        summary, size = await router.header_of(model)
        details = ollama.model_entry(model, size or 0)["details"]
        model_info: dict[str, object] = {}
        if summary is not None:  # known once a host holds the file or its header was read
            facts, model_info = ollama.model_facts(summary)
            details.update(facts)
        return JSONResponse(
            {
                "modelfile": f"FROM {m.url}" if admin else f"FROM {model}",
                "parameters": " ".join(m.args) if admin else "",
                "template": await template_in_use(model, m, upstream),
                "details": details,
                "model_info": {**model_info, "llama_scheduler.ctx_size": m.ctx_size},
                "capabilities": ["embedding"] if m.embeddings else ["completion"],
            }
        )

    def bus_up() -> None:
        if (down := router.bus_down_reason()) is not None:
            raise ApiError(503, down, "bus_unavailable", 5)

    @app.post("/api/pull")
    async def api_pull(request: Request) -> Response:
        """Download a configured model where it would run, as a cold start would (the placer
        picks the host; see pull.py), with Ollama's progress lines."""
        key = authenticate(cfg, request)
        req = ollama.parse_body(await read_body(request), ollama.PullRequest)
        model = resolve(req.model or req.name, key, request.url.path)
        bus_up()
        m = cfg.models[model]
        filename = store_filename_of(model, m)

        def size_on(host: str) -> int | None:
            files = router.hosts[host].files if host in router.hosts else []
            return next((f.size for f in files if f.filename == filename), None)

        job = pull.Pull(
            router.bus, router.gateway_id, model, ollama.pull_digest(filename, m.sha256), size_on
        )
        total_s = cfg.downloader.timeout + 60  # the downloader's own deadline, then its word
        gone = asyncio.ensure_future(until_disconnected(request.receive))
        try:
            await unless(gone, job.begin(), lambda _: job.follow.close())
            if not req.stream:
                return JSONResponse(await unless(gone, job.result(total_s)))
        finally:
            gone.cancel()
        return pull.PullStream(job, total_s)

    @app.delete("/api/delete")
    async def api_delete(request: Request) -> Response:
        """Remove a model's file from every host's store; refused while the model runs.
        Destructive for everyone using the model: an admin key's when keys are configured."""
        key = authenticate(cfg, request)
        if key is not None and not key.admin:
            raise ApiError(403, "deleting a model needs an admin API key", "forbidden")
        req = ollama.parse_body(await read_body(request), ollama.DeleteRequest)
        model = resolve(req.model or req.name, key, request.url.path)
        bus_up()
        await pull.delete(router.bus, router.gateway_id, model)
        return JSONResponse({"status": "success"})

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
            metrics.admission_limit.labels(model).set(gate.limit)
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
        query = ""  # the UI gets the query without the key (nothing downstream sees a key)
        if request.url.query:
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "key"]
            query = f"?{urlencode(params)}" if params else ""
        headers = {h: v for h in UI_HEADERS if (v := request.headers.get(h)) is not None}
        headers[SECRET_HEADER] = ui_secret()  # the UI answers nobody else
        try:
            resp = await ui_clients[0].send(
                request.method,
                f"{ui_url}/dashboard{rest}{query}",
                await read_body(request),
                headers,
            )
        except http.TransportError as e:
            raise ApiError(502, f"dashboard service unreachable: {e!r}", "ui_unavailable") from None
        if resp.status_code >= 400:  # its errors read like ours
            data = await resp.aread()
            await resp.aclose()
            raise upstream_error("the dashboard", resp.status_code, data)
        out = Passthrough(resp)
        if cfg.gateway.api_keys and request.query_params.get("key"):
            # The browser keeps the key for the page's own calls, and sends it to /dashboard
            # paths only (API routes take no cookie).
            out.set_cookie(
                "lls_key",
                request.query_params["key"],
                path="/dashboard",
                httponly=True,
                samesite="strict",
            )
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
    Every request first passes the browser checks (edge.BrowserChecks: Host and Origin).
    """
    forward = app.state.forward
    paths = frozenset(OPENAI_ROUTES)

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
