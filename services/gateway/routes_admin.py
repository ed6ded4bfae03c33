"""The routes the gateway answers about itself, without an instance: /health, the model list
(/v1/models), /metrics (admin), and /dashboard, proxied to the UI service (admin).

The UI service answers only requests carrying the shared secret (lls.ui_secret), which the
gateway adds after its admin check; the client's key and cookies stay here.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

import proto
from lls.config import Config
from lls.ui_secret import SECRET_HEADER, ui_secret

from . import http
from .access import authenticate, check_key, may_use
from .edge import read_body
from .errors import ApiError
from .lifecycle import upstream_error
from .metrics import Metrics
from .proxy import Passthrough, Upstream
from .router import Router

# Headers the dashboard needs from the browser; the client's key and cookies stay here.
UI_HEADERS = ("accept", "content-type", "last-event-id", "cache-control", "if-none-match")


def register(
    app: FastAPI, cfg: Config, router: Router, upstream: Upstream, metrics: Metrics
) -> AdminRoutes:
    """Add /health, /v1/models, /metrics and /dashboard to `app`; the routes' object, whose
    `aclose` the app calls at shutdown."""
    routes = AdminRoutes(cfg, router, upstream, metrics)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics_endpoint, methods=["GET"])
    app.add_api_route(
        "/dashboard{rest:path}", routes.dashboard, methods=["GET", "POST"], include_in_schema=False
    )
    return routes


class AdminRoutes:
    """The handlers, over the objects the app shares, and the dashboard's HTTP client."""

    def __init__(self, cfg: Config, router: Router, upstream: Upstream, metrics: Metrics):
        self.cfg = cfg
        self.router = router
        self.upstream = upstream
        self.metrics = metrics
        self.ui_url = cfg.gateway.ui_url.rstrip("/")
        self.ui_clients: list[http.Client] = []  # made on first use, inside the running loop

    async def health(self) -> Response:
        down = self.router.bus_down_reason(grace_s=0)
        ok = down is None and self.router.bus.nc.is_connected
        body: dict[str, object] = {"status": "ok" if ok else "degraded", "nats": ok}
        if not ok:
            body["bus"] = down or "the message bus (NATS) is unreachable; reconnecting"
        return JSONResponse(body, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        cfg = self.cfg
        key = authenticate(cfg, request)
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "llama-scheduler",
                "state": self.router.state_of(name),
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

    async def metrics_endpoint(self, request: Request) -> Response:
        check_key(self.cfg, request, None, admin=True)
        metrics = self.metrics
        for model, gate in self.upstream.gates.items():
            metrics.queue_depth.labels(model).set(gate.queued)
            metrics.in_flight.labels(model).set(gate.in_flight)
            metrics.admission_limit.labels(model).set(gate.limit)
        counts = {s.value: 0 for s in proto.InstanceState}
        for rec in self.router.instances.values():
            counts[rec.state.value] += 1
        for state, n in counts.items():
            metrics.instances.labels(state).set(n)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def dashboard(self, request: Request, rest: str) -> Response:
        check_key(self.cfg, request, None, admin=True)
        if not self.ui_clients:
            self.ui_clients.append(http.Client(read_timeout=None, max_connections=256))
        query = ""  # the UI gets the query without the key (nothing downstream sees a key)
        if request.url.query:
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "key"]
            query = f"?{urlencode(params)}" if params else ""
        headers = {h: v for h in UI_HEADERS if (v := request.headers.get(h)) is not None}
        headers[SECRET_HEADER] = ui_secret()  # the UI answers nobody else
        try:
            resp = await self.ui_clients[0].send(
                request.method,
                f"{self.ui_url}/dashboard{rest}{query}",
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
        if self.cfg.gateway.api_keys and request.query_params.get("key"):
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

    async def aclose(self) -> None:
        for client in self.ui_clients:
            await client.aclose()
