"""The routes proxied by model: OpenAI's (chat, completions, embeddings, responses, rerank,
infill) and Anthropic's messages. The body's `model` picks the instance; llama-server serves
them all natively.

OpenAI bodies are forwarded as the bytes the client sent; only `model` and `stream` are
decoded, with a msgspec struct that skips every other field. Bodies are re-encoded only when
the model has an alias or default parameters to apply, or an untrusted caller set
llama-server's slot fields (SLOT_FIELDS, dropped). A stream that must wait for an instance or
a slot answers at once and sends waiting comments (`: waiting for ...`) until it is served.

This is the gateway's hot path (app.fast_path calls `forward` directly): the handler reads
the shared objects as closure variables, nothing per request beyond what it needs.
"""

from __future__ import annotations

import time

import msgspec
from fastapi import FastAPI, Request
from starlette.responses import Response

from lls.config import Config

from .access import authenticate, client, resolve, shown, trusted
from .admission import stage_of
from .edge import decode_body, read_body
from .errors import ApiError
from .lifecycle import Calls
from .proxy import UPSTREAM_HEADERS, Upstream, forward_headers
from .router import Router

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


def rewrite(cfg: Config, body: bytes, model: str, drop_slots: bool = False) -> bytes:
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


def upstream_subset(request: Request) -> dict[str, str]:
    """The client's headers an instance needs (proxy.upstream_headers adds its key)."""
    return {k: v for k, v in request.headers.items() if k in UPSTREAM_HEADERS}


def register(app: FastAPI, cfg: Config, router: Router, upstream: Upstream, calls: Calls) -> None:
    """Route OPENAI_ROUTES to one handler, `forward`, kept also as `app.state.forward` for
    app.fast_path."""

    async def forward(request: Request) -> Response:
        started = time.monotonic()
        route = request.scope["path"]
        key = authenticate(cfg, request)  # from the headers: no body is read for a bad key
        body = await read_body(request)
        head = parse_head(body)
        model = resolve(cfg, head.model, key, route)
        drop_slots = head.sets_slots() and not trusted(key)
        if head.model != model or cfg.models[model].defaults or drop_slots:
            body = rewrite(cfg, body, model, drop_slots)
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
