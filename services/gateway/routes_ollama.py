"""The Ollama API's routes, so the `ollama` client works unchanged: chat, generate and
embeddings through the one request lifecycle (lifecycle.Call), and what the gateway answers
itself (tags, ps, show, pull, delete, version).

The translations between Ollama's shapes and llama-server's OpenAI API are ollama.py's; pull
and delete ask the placer over the bus (pull.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from lls.config import Config, store_filename_of

from . import ollama, pull
from .access import authenticate, client, may_use, resolve, shown
from .edge import read_body
from .errors import ApiError
from .lifecycle import Calls, unless, until_disconnected, upstream_error
from .proxy import Upstream
from .router import Router
from .template import template_in_use


def register(app: FastAPI, cfg: Config, router: Router, upstream: Upstream, calls: Calls) -> None:
    """Add the Ollama routes (/api/...) to `app`."""
    routes = OllamaRoutes(cfg, router, upstream, calls)
    app.add_api_route("/api/chat", routes.api_chat, methods=["POST"])
    app.add_api_route("/api/generate", routes.api_generate, methods=["POST"])
    app.add_api_route("/api/embed", routes.embed_route(False), methods=["POST"])
    app.add_api_route("/api/embeddings", routes.embed_route(True), methods=["POST"])
    app.add_api_route("/api/tags", routes.api_tags, methods=["GET"])
    app.add_api_route("/api/ps", routes.api_ps, methods=["GET"])
    app.add_api_route("/api/show", routes.api_show, methods=["POST"])
    app.add_api_route("/api/pull", routes.api_pull, methods=["POST"])
    app.add_api_route("/api/delete", routes.api_delete, methods=["DELETE"])
    app.add_api_route("/api/version", routes.api_version, methods=["GET"])


def bus_up(router: Router) -> None:
    if (down := router.bus_down_reason()) is not None:
        raise ApiError(503, down, "bus_unavailable", 5)


class OllamaRoutes:
    """The handlers, over the objects the app shares (config, router, upstream, calls)."""

    def __init__(self, cfg: Config, router: Router, upstream: Upstream, calls: Calls):
        self.cfg = cfg
        self.router = router
        self.upstream = upstream
        self.calls = calls

    # ------------------------------------------------------------------ proxied

    async def ollama_call(
        self,
        request: Request,
        kind: type,
        path: str,
        make_body: Callable[..., Any],
        reply: Callable[..., Any],
        stream_generate: bool | None,
    ) -> Response:
        """One Ollama request through the request lifecycle: `make_body` turns it into an
        OpenAI body (for `path`, or a (path, body) pair), `reply` shapes a whole answer;
        `stream_generate` None: never streamed, else streamed lines as generate's or chat's."""
        cfg = self.cfg
        started = time.monotonic()
        route = request.scope["path"]
        key = authenticate(cfg, request)
        req = ollama.parse_body(await read_body(request), kind)
        model = resolve(cfg, req.model, key, route)
        keep_alive = ollama.keep_alive_seconds(getattr(req, "keep_alive", None))
        out = make_body(req, model)
        if isinstance(out, tuple):
            path, out = out
        for k, v in cfg.models[model].defaults.items():
            out.setdefault(k, v)
        body = msgspec.json.encode(out)
        streamed = stream_generate is not None and bool(out.get("stream"))
        who = client(request, key)
        call = self.calls.call(request.receive, model, route, key, who, shown(key), started)
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

    async def api_chat(self, request: Request) -> Response:
        return await self.ollama_call(
            request,
            ollama.ChatRequest,
            "/v1/chat/completions",
            ollama.chat_request,
            ollama.chat_response,
            False,
        )

    async def api_generate(self, request: Request) -> Response:
        def reply(model: str, data: dict[str, Any], started: float) -> dict[str, Any]:
            return ollama.as_generate(ollama.chat_response(model, data, started))

        return await self.ollama_call(
            request, ollama.GenerateRequest, "", ollama.generate_request, reply, True
        )

    def embed_route(self, legacy: bool):  # type: ignore[no-untyped-def]
        """/api/embed (`input`, `embeddings`) and the older /api/embeddings (`prompt`)."""

        async def handler(request: Request) -> Response:
            return await self.ollama_call(
                request,
                ollama.EmbedRequest,
                "/v1/embeddings",
                lambda req, m: ollama.embed_request(req, m, legacy=legacy),
                lambda m, d, _s: ollama.embed_response(m, d, legacy=legacy),
                None,
            )

        return handler

    # ------------------------------------------------------------------ answered here

    async def api_tags(self, request: Request) -> Response:
        key = authenticate(self.cfg, request)
        names = [n for n in self.cfg.models if may_use(key, n)]
        return JSONResponse({"models": [ollama.model_entry(n, 0) for n in names]})

    async def api_ps(self, request: Request) -> Response:
        cfg, router = self.cfg, self.router
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

    async def api_show(self, request: Request) -> Response:
        key = authenticate(self.cfg, request)
        req = ollama.parse_body(await read_body(request), ollama.ShowRequest)
        model = resolve(self.cfg, req.model or req.name, key, request.url.path)
        m = self.cfg.models[model]
        admin = key is None or key.admin  # where it comes from and how it runs: admins only
        summary, size = await self.router.header_of(model)
        details = ollama.model_entry(model, size or 0)["details"]
        model_info: dict[str, object] = {}
        if summary is not None:  # known once a host holds the file or its header was read
            facts, model_info = ollama.model_facts(summary)
            details.update(facts)
        return JSONResponse(
            {
                "modelfile": f"FROM {m.url}" if admin else f"FROM {model}",
                "parameters": " ".join(m.args) if admin else "",
                "template": await template_in_use(model, m, self.upstream),
                "details": details,
                "model_info": {**model_info, "llama_scheduler.ctx_size": m.ctx_size},
                "capabilities": ["embedding"] if m.embeddings else ["completion"],
            }
        )

    async def api_pull(self, request: Request) -> Response:
        """Download a configured model where it would run, as a cold start would (the placer
        picks the host; see pull.py), with Ollama's progress lines."""
        cfg, router = self.cfg, self.router
        key = authenticate(cfg, request)
        req = ollama.parse_body(await read_body(request), ollama.PullRequest)
        model = resolve(cfg, req.model or req.name, key, request.url.path)
        bus_up(router)
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

    async def api_delete(self, request: Request) -> Response:
        """Remove a model's file from every host's store; refused while the model runs.
        Destructive for everyone using the model: an admin key's when keys are configured."""
        key = authenticate(self.cfg, request)
        if key is not None and not key.admin:
            raise ApiError(403, "deleting a model needs an admin API key", "forbidden")
        req = ollama.parse_body(await read_body(request), ollama.DeleteRequest)
        model = resolve(self.cfg, req.model or req.name, key, request.url.path)
        bus_up(self.router)
        await pull.delete(self.router.bus, self.router.gateway_id, model)
        return JSONResponse({"status": "success"})

    async def api_version(self) -> Response:
        return JSONResponse({"version": ollama.OLLAMA_VERSION})
