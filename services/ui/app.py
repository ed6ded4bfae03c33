"""The dashboard's HTTP app. Every route lives under /dashboard because the gateway proxies
that prefix here unchanged; the page uses URLs relative to itself.

Only the gateway is answered: every request must carry the shared secret (lls.ui_secret)
that the gateway adds after its admin check. Errors use the project's one form,
`{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

import proto
from lls.bus import Bus
from lls.ui_secret import SECRET_HEADER
from services.ui import older
from services.ui.hub import Hub
from services.ui.logs import NoAnswer, ask_log_tail, find_instance
from services.ui.view import View

PAGE = Path(__file__).with_name("static") / "dashboard.html"
KEEPALIVE_S = 15.0  # below common proxy idle timeouts (nginx: 60 s)
RETRY_MS = 2000  # how soon a browser reconnects after losing the stream


def sse(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def stream(view: View, hub: Hub) -> AsyncIterator[bytes]:
    client = hub.subscribe()  # here, not in the route: a stream never started never leaks one
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        while not client.closed:
            if client.resync:
                # Taken in one step with the snapshot: no await in between, so the deltas
                # queued from here on are exactly those after the snapshot.
                client.take()
                client.resync = False
                yield sse("snapshot", msgspec.json.encode(view.snapshot()))
                continue
            items = client.take()
            if items:
                yield b"".join(sse(kind, data) for kind, data in items)
            elif not await client.wait(KEEPALIVE_S):
                # A comment keeps proxies from closing the idle stream; the ping lets the
                # page notice a stream that went silent.
                now = msgspec.json.encode({"now": time.time()})
                yield b": keepalive\n" + sse("ping", now)
    finally:
        hub.unsubscribe(client)


def error(status: int, message: str, code: str) -> Response:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "code": code}}
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def require_secret(app: ASGIApp, secret: str) -> ASGIApp:
    """Refuse every request that does not carry the gateway's secret header."""
    want = secret.encode()
    header = SECRET_HEADER.encode()

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = next((v for k, v in scope["headers"] if k == header), b"")
            if not hmac.compare_digest(given, want):
                msg = "the dashboard is served through the gateway (/dashboard, admin key)"
                await error(401, msg, "ui_secret_required")(scope, receive, send)
                return
        await app(scope, receive, send)

    return asgi


def create_app(view: View, hub: Hub, bus: Bus | None = None) -> FastAPI:
    """`bus`: where instance log tails are asked for (none: that endpoint answers 503)."""
    app = FastAPI(title="llama.cpp scheduler dashboard", docs_url=None, redoc_url=None)
    page = PAGE.read_bytes()

    @app.exception_handler(HTTPException)
    async def _http_error(_req: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return error(exc.status_code, str(exc.detail), code)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("dashboard")

    @app.get("/dashboard", include_in_schema=False)
    @app.get("/dashboard/", include_in_schema=False)
    async def dashboard() -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/state")
    async def state() -> Response:
        return Response(msgspec.json.encode(view.snapshot()), media_type="application/json")

    @app.get("/dashboard/timeline")
    async def timeline(model: str = "", before: str = "") -> Response:
        """The events naming one model (its timeline), oldest first: those the view holds,
        or with `before` (a stream sequence) older ones read from the stream. A query
        parameter, not a path segment: model names may hold "/" and ":"."""
        if not model:
            return error(400, "model: required", "invalid_model")
        if not before:
            return Response(
                msgspec.json.encode(view.timeline(model)), media_type="application/json"
            )
        return await read_older(model, before)

    @app.get("/dashboard/log")
    async def log_page(before: str = "") -> Response:
        """A page of the event log older than what the page shows: the newest LOG_PAGE
        events before `before` (a stream sequence), oldest first, read from the stream."""
        if not before:
            return error(400, "before: required (a stream sequence number)", "invalid_before")
        return await read_older(None, before, scan=older.LOG_SCAN_MSGS, limit=older.LOG_PAGE)

    async def read_older(model: str | None, before: str, **window: int) -> Response:
        """Events before stream sequence `before` read from the stream (services.ui.older):
        a model's (its timeline) or every one (the log)."""
        try:
            seq = int(before)
        except ValueError:
            return error(400, "before: a stream sequence number", "invalid_before")
        if bus is None:
            return error(503, "the event stream is not available here", "unavailable")
        try:
            body = await older.older_events(bus, model, seq, view.model_of, **window)
        except older.ScanTimeout as e:
            return error(504, str(e), "stream_timeout")
        return Response(msgspec.json.encode(body), media_type="application/json")

    @app.get("/dashboard/instances/{instance_id}/log")
    async def instance_log(instance_id: str, lines: str = "100") -> Response:
        """A running instance's llama-server log tail, asked of its host's agent."""
        if not proto.INSTANCE_ID_RE.fullmatch(instance_id):
            return error(400, "not an instance id", "invalid_instance_id")
        try:
            n = int(lines)
        except ValueError:
            return error(400, "lines: a whole number", "invalid_lines")
        n = max(1, min(n, proto.LOG_TAIL_MAX_LINES))
        rec = find_instance(view.instances, instance_id)
        if rec is None:
            return error(404, f"no instance {instance_id}", "not_found")
        host = rec.get("host")
        if not isinstance(host, str) or not proto.HOST_ID_RE.fullmatch(host):
            return error(404, f"instance {instance_id} is not on a host", "not_found")
        if bus is None:
            return error(503, "log tails are not available here", "unavailable")
        try:
            reply = await ask_log_tail(bus, host, instance_id, n)
        except NoAnswer as e:
            return error(e.status, str(e), "agent_timeout" if e.status == 504 else "bad_reply")
        if isinstance(reply, proto.LogTailError):
            status = {"invalid": 400, "not_found": 404}.get(reply.code, 502)
            return error(status, f"{host}: {reply.reason}", reply.code)
        body = {**msgspec.to_builtins(reply), "host": host}
        body.pop("type", None)  # the wire tag: the page needs none
        return Response(msgspec.json.encode(body), media_type="application/json")

    @app.get("/dashboard/events")
    async def events() -> Response:
        return StreamingResponse(
            stream(view, hub),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app
