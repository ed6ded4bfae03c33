"""Forwarding a request to an instance: admission, cold-start wait, one retry, release.

`Upstream.open` returns the upstream response still streaming and a `release` callback; the
caller must call `release` exactly once (Passthrough does, whatever ends the response).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping

import msgspec
from starlette.responses import StreamingResponse

from lls.config import Config

from . import affinity, embeddings, http
from .admission import BY_ADDRESS, Gate, Limits, Room
from .errors import ApiError
from .metrics import Metrics
from .router import Router
from .timing import Ewma

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


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


# What llama-server needs from a client's request. Everything else stays here: the client's
# Authorization / x-api-key / Cookie are secrets for the gateway, not for an instance, and
# huge or numerous headers would only come back as llama-server's 400.
UPSTREAM_HEADERS = frozenset({"content-type", "accept", "accept-encoding"})


def upstream_headers(headers: Mapping[str, str], key: str) -> dict[str, str]:
    """The headers sent to an instance: the few it needs, plus its own API key."""
    out = {k: v for k, v in headers.items() if k.lower() in UPSTREAM_HEADERS}
    out["Authorization"] = f"Bearer {key}"
    return out


class Upstream:
    def __init__(self, cfg: Config, router: Router, metrics: Metrics):
        self.cfg = cfg
        self.router = router
        self.metrics = metrics
        self.limits = limits_of(cfg)
        self.gates: dict[str, Gate] = {}
        self.service_time = Ewma()  # seconds from sending a request to releasing its slot
        self._client: http.Client | None = None

    @property
    def client(self) -> http.Client:
        if self._client is None:  # made on first use, inside the running loop
            self._client = http.Client(read_timeout=self.cfg.gateway.request_timeout)
        return self._client

    def gate(self, model: str) -> Gate:
        gate = self.gates.get(model)
        if gate is None:
            gate = self.gates[model] = Gate(
                model, self.limits, self.service_time, self.weights, lambda: self.room(model)
            )
        return gate

    def room(self, model: str) -> Room:
        """A model's slots as the router sees them now (the hot path: no bus, a few lookups):
        every slot of its ready instances, each as its record says (the model's expected
        slots for an older agent's record), or one instance's when none is ready."""
        router = self.router
        ready = router.ready.get(model, ())
        expected = router.slots_expected(model)
        slots = sum(r.slots or expected for r in ready) if ready else expected
        held = router.held_elsewhere(model, ready) if router.in_flight else 0
        return Room(slots, len(ready), router.swap_wait.get(model, 5.0), held)

    def ready_changed(self, model: str) -> None:
        """The router's on_reindex: an instance that became ready (new, serving again after
        a cancelled drain, or trusted once its host was heard) takes waiters at once."""
        gate = self.gates.get(model)
        if gate is not None and gate.waiters:
            gate.fill()

    def reload(self, cfg: Config) -> None:
        """New limits from a reloaded config; waiters take what a higher limit frees, and
        those of a removed model are answered at once."""
        self.limits = limits_of(cfg)
        for model, gate in self.gates.items():
            if model not in cfg.models:
                gone = ApiError(
                    404, f"model {model} was removed from the config", "model_not_found"
                )
                gate.refuse_all(gone)
                continue
            gate.limits = self.limits
            gate.weights = self.weights
            gate.fill()

    @property
    def weights(self) -> dict[str, float]:
        """Each API key's share of a model's slots when clients queue (fair queuing)."""
        return {k.name: k.weight for k in self.cfg.gateway.api_keys}

    async def open(
        self,
        model: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        ticket: int | None = None,
        keep_alive: float | None = None,
        who: str = "",
        shown: str = BY_ADDRESS,
        overlap: bool = True,
    ) -> tuple[http.Reply, Callable[[], None]]:
        """Admit, find (or wait for) an instance, and send; the response is still streaming.

        From arrival until it is sent, the request is in the router's queue for `model`
        (`ticket`, from `router.enqueue`, when the caller wants to ask for its position).
        `who` is the client the admission queue is fair across (admission.Gate); `shown`,
        what the activity report may call it (a key's name; never an address); `overlap`,
        whether it may be sent on to wait inside a busy slot (not a streamed answer)."""
        if ticket is None:
            ticket = self.router.enqueue(model, shown)
        try:
            gate = self.gate(model)
            try:
                await gate.enter(who, ticket, overlap)
            except ApiError:
                self.metrics.refused.labels(model, "429").inc()
                raise
            try:
                return await self._send(model, path, body, headers, gate, ticket, keep_alive)
            except BaseException:
                gate.leave()
                raise
        finally:
            self.router.dequeue(model, ticket)  # refused or gone while waiting

    async def _send(
        self,
        model: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        gate: Gate,
        ticket: int,
        keep_alive: float | None,
    ) -> tuple[http.Reply, Callable[[], None]]:
        t0 = time.monotonic()
        g = self.cfg.gateway
        # the prompt is parsed only when there is a choice to make (the hot path: one replica)
        several = len(self.router.ready.get(model, ())) > 1
        prefix = (
            affinity.prefix_key(body, path, g.prefix_chars)
            if g.routing == "prefix" and several
            else None
        )
        # Sent again at most once for each of: the endpoint refused, or a pooled connection
        # was stale (the request never reached it); its host was lost before any answer (a
        # completion has no side effects: it is generated again elsewhere, not refused).
        stale_retry = lost_retry = True
        first = True
        while True:
            cold = self.router.pick(model) is None
            try:
                rec = await self.router.acquire(
                    model, self.cfg.gateway.cold_start_timeout, prefix=prefix
                )
            except ApiError as e:
                self.metrics.refused.labels(model, str(e.status)).inc()
                raise
            if cold:
                self.metrics.cold_start.labels(model).observe(time.monotonic() - t0)
            if first:
                self.metrics.queue_wait.labels(model).observe(self.router.dequeue(model, ticket))
            flight = self.router.begin(rec, keep_alive)
            sent = time.monotonic()
            try:
                sending = upstream_headers(headers, self.router.key_for(rec))
                if "embed" in path:
                    body = await self._fit_embedding_inputs(
                        model, rec.endpoint or "", body, sending
                    )
                resp = await self.client.send(
                    "POST", f"{rec.endpoint}{path}", body, sending, fresh=not first
                )
            except http.StaleConnection as e:  # the request never reached the instance
                self.router.end(rec, flight)
                if isinstance(e, http.ConnectError):  # nothing listens: skip it for a while
                    self.router.mark_bad(rec)
                if stale_retry:
                    stale_retry = first = False
                    continue
                raise ApiError(
                    502, f"instance of {model} unreachable: {e}", "upstream_error", 2
                ) from None
            except asyncio.CancelledError:  # the client left, or the instance's host was lost
                self.router.end(rec, flight)  # else its in-flight count pins the instance busy
                if lost_retry and self.router.resend_lost(asyncio.current_task()):
                    lost_retry = first = False
                    continue
                raise
            except http.TransportError as e:
                self.router.end(rec, flight)
                raise ApiError(
                    502, f"instance of {model} failed: {e!r}", "upstream_error", 2
                ) from None

            flight.reply = resp  # (a lost host's requests are cut: Router.abort_lost)

            def release(rec=rec, sent=sent, flight=flight) -> None:  # type: ignore[no-untyped-def]
                self.service_time.add(model, time.monotonic() - sent)
                self.router.end(rec, flight)
                gate.leave()

            return resp, release

    async def _fit_embedding_inputs(
        self, model: str, endpoint: str, body: bytes, headers: dict[str, str]
    ) -> bytes:
        if (mcfg := self.cfg.models.get(model)) is None:  # removed by a reload meanwhile
            return body
        limit = embeddings.token_limit(mcfg)
        auth = {"Authorization": headers["Authorization"]}  # /tokenize needs the key too
        try:
            return await embeddings.truncate(self.client, endpoint, body, limit, auth)
        except (msgspec.DecodeError, http.StatusError, KeyError, TypeError, ValueError):
            return body  # let the instance answer with its own error

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def limits_of(cfg: Config) -> Limits:
    g = cfg.gateway
    return Limits(g.max_in_flight, g.max_queue, g.queue_timeout, g.cold_start_timeout, g.overlap)


class Passthrough(StreamingResponse):
    """An upstream response streamed to the client chunk by chunk as it arrives.

    Whatever ends it (done, client gone, error), the upstream response is closed, which
    cancels the generation upstream, and `on_close` releases what the request held.
    `on_first` is called at the first chunk, `on_chunk` with each chunk.
    """

    def __init__(
        self,
        resp: http.Reply,
        on_close: Callable[[], None] | None = None,
        on_first: Callable[[], None] | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
    ):
        body = resp.aiter_raw()
        if on_first is not None or on_chunk is not None:
            body = _watched(body, on_first, on_chunk)
        super().__init__(body, status_code=resp.status_code, headers=forward_headers(resp.headers))
        self._upstream = resp
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()
            if self._on_close is not None:
                self._on_close()


async def _watched(
    chunks: AsyncIterator[bytes],
    on_first: Callable[[], None] | None,
    on_chunk: Callable[[bytes], None] | None,
) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if on_first is not None:
            on_first()
            on_first = None
        if on_chunk is not None:
            on_chunk(chunk)
        yield chunk
