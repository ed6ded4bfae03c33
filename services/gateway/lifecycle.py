"""One request's lifecycle, the same for every proxied route: OpenAI and Anthropic bodies,
Ollama's chat, generate and embeddings, streamed or not, warm or cold.

    admit   the API key's usage lease (a 429 past the key's limits)
    open    an admission slot, a ready instance (or a wait for one), send; the answer's head
    read    a whole answer                     \\ either
    relay   a stream, or a cold stream's wait  /
    finish  release the slot and the lease, observe: exactly once, whatever ended it

A route decodes its body and shapes its answer; everything else is here, in one place each:
the usage lease (`Call.admit`), the client-gone watch (`Call.open`/`Call.read`; a stream's
response watches for itself), the upstream open and its deadlines (`Call.open`: the gate's
queue_timeout, the router's cold_start_timeout, the HTTP client's connect and read
timeouts), the metrics (`Call.finish`, through observe.Observer) and the release on every
exit path (`Call.finish`, from `read`, from `Relay` whatever ends a stream, and on errors).

A request is counted with its outcome: the answer's status; 499 when its client left before
the answer ended; the error's status when it was refused or failed, also when that error
went out as an event in a stream whose head already said 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lls.config import ApiKey

from . import http
from .errors import ApiError, sse_error, style_of
from .metrics import TPS_KEY
from .observe import Observer
from .proxy import Upstream
from .router import Router
from .usage import Lease, Usage

T = TypeVar("T")

# The client-gone watch starts this long after the request is sent: most answers come
# sooner, and a timer costs far less than a task reading the connection. A client that
# left earlier is seen at once when the watch starts.
WATCH_AFTER_S = 0.05
KEEPALIVE_S = 5.0  # SSE comment interval while a streaming request waits, if nothing changed
FIRST_COMMENT_S = 0.1  # a wait longer than this is announced with the request's place
PLACE_EVERY_S = 0.5  # a waiting stream looks this often whether its place or stage changed

CLIENT_GONE = "client closed the request"


def client_gone() -> ApiError:
    return ApiError(499, CLIENT_GONE, "client_closed")


class Calls:
    """What every request's lifecycle uses: one per app."""

    __slots__ = ("usage", "upstream", "router", "observer")

    def __init__(self, usage: Usage, upstream: Upstream, router: Router, observer: Observer):
        self.usage, self.upstream, self.router, self.observer = usage, upstream, router, observer

    def call(
        self,
        receive: Receive,
        model: str,
        route: str,
        key: ApiKey | None,
        who: str,
        shown: str,
        started: float,
    ) -> Call:
        """A request for `model` on `route` (its path, the metrics' label), from `who` (the
        client fair queuing is fair across), shown as `shown` in the activity report."""
        return Call(self, receive, model, route, key, who, shown, started)


class Call:
    """One request from admission to its last byte."""

    __slots__ = (
        "_calls",
        "_receive",
        "model",
        "route",
        "key",
        "who",
        "shown",
        "started",
        "lease",
        "resp",
        "_release",
        "_finished",
        "_task",
        "_timer",
        "_watcher",
        "_gone",
    )

    def __init__(
        self,
        calls: Calls,
        receive: Receive,
        model: str,
        route: str,
        key: ApiKey | None,
        who: str,
        shown: str,
        started: float,
    ) -> None:
        self._calls, self._receive = calls, receive
        self.model, self.route, self.key = model, route, key
        self.who, self.shown, self.started = who, shown, started
        self.lease: Lease | None = None
        self.resp: http.Reply | None = None
        self._release: Callable[[], None] | None = None
        self._finished = False
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._gone = False

    # ------------------------------------------------------------------ admit, open

    def admit(self) -> None:
        """Take the key's usage lease; past its limits, a 429 (counted) is raised."""
        try:
            self.lease = self._calls.usage.enter(self.key, self.model)
        except ApiError as e:
            self.finish(e.status)
            raise

    async def open(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        ticket: int | None = None,
        keep_alive: float | None = None,
        watch: bool = True,
        overlap: bool = True,
    ) -> http.Reply:
        """Admission, an instance (waiting for one if none is ready), send: the answer's
        head, its body still to come. `watch`: give up with a 499 if the client leaves (a
        waiting stream watches its own way); `overlap`: whether it may be sent on to wait
        inside a busy slot (a stream waits at the gateway instead, where it hears its place).
        Refused, failed or gone: finished, and raised."""
        if self.lease is None:
            self.admit()
        assert self.lease is not None
        opening = self._calls.upstream.open(
            self.model, path, body, headers, ticket, keep_alive, self.who, self.shown, overlap
        )
        try:
            if watch:
                self._arm()
                resp, release = await self._guarded(opening)
            else:
                resp, release = await opening
        except ApiError as e:
            self.finish(e.status)
            raise
        except asyncio.CancelledError:
            if (lost := self._lost()) is not None:  # its instance's host was lost
                self.finish(lost.status)
                raise lost from None
            self.finish(499)
            raise
        except BaseException:
            self.finish(500)
            raise
        if self._finished:  # the request ended while this opened (its stream closed)
            await resp.aclose()
            release()
            raise client_gone()
        self.resp, self._release = resp, release
        return resp

    # ------------------------------------------------------------------ read, relay

    async def read(self) -> bytes:
        """The whole answer (the client still watched); then the call is finished, its
        speed and token counts taken from it. An error answer is raised as ours
        (`upstream_error`), and counted with the status the client gets."""
        resp = self.resp
        assert resp is not None and self.lease is not None
        try:
            data = await self._guarded(resp.aread())
        except ApiError as e:  # the client left
            await self.close(e.status)
            raise
        except asyncio.CancelledError:  # not by the watch: its host lost, the gateway stopping
            if (lost := self._lost()) is not None:
                await self.close(lost.status)
                raise lost from None
            await self.close(499)
            raise
        except BaseException:
            await self.close(500)  # what the client gets for it (the app's catch-all)
            raise
        await resp.aclose()
        self._calls.observer.speed(self.model, data)
        self.lease.count(data)
        if resp.status_code >= 400:
            error = upstream_error(self.model, resp.status_code, data)
            self.finish(error.status)
            raise error
        self.finish()
        return data

    def relay(
        self,
        chunks: AsyncIterator[bytes],
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Relay:
        """The opened answer streamed to the client as `chunks` (its raw body, or lines
        made from it); finished when the stream ends, whatever ends it."""
        self._disarm()  # from here the streaming response watches the client itself
        assert self.resp is not None
        return Relay(self, chunks, self.resp.status_code, headers, media_type, True, on_chunk)

    def chunk(self, data: bytes) -> None:
        """A raw streamed chunk on its way: token counts and speed come in the last ones."""
        assert self.lease is not None
        self.lease.feed(data)
        if TPS_KEY in data:
            self._calls.observer.speed(self.model, data)

    async def lines(self, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's SSE lines on their way (to be translated): token counts and speed."""
        assert self.lease is not None
        async for line in self.lease.lines(lines):
            if '"timings"' in line:
                self._calls.observer.speed(self.model, line.encode())
            yield line

    def waiting(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        comment: Callable[[str, int], bytes],
    ) -> Relay:
        """A streaming request that has to wait (its model is not ready, or every slot is
        taken): the head goes now and SSE comments (`comment(model, ticket)`: its place in
        the model's queue and what it waits for) while it waits, so the client sees progress
        and proxies in between do not time out. The head is sent: errors come as an SSE
        error event."""
        chunks = self._waiting(path, body, headers, comment)
        return Relay(self, chunks, 200, None, "text/event-stream", False, None)

    async def _waiting(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        comment: Callable[[str, int], bytes],
    ) -> AsyncIterator[bytes]:
        router = self._calls.router
        ticket = router.enqueue(self.model, self.shown)
        opening = asyncio.ensure_future(
            self.open(path, body, headers, ticket=ticket, watch=False, overlap=False)
        )
        try:
            said, said_at = b"", 0.0
            wait = FIRST_COMMENT_S  # say at once that it waits and where, then on change
            while True:
                done, _ = await asyncio.wait({opening}, timeout=wait)
                if done:
                    break
                text = comment(self.model, ticket)
                if text != said or time.monotonic() - said_at >= KEEPALIVE_S:
                    yield text
                    said, said_at = text, time.monotonic()
                wait = PLACE_EVERY_S
            try:
                resp = opening.result()
            except ApiError as e:  # refused or failed: finished with its status
                yield sse_error(e, style_of(self.route))
                return
            if resp.status_code != 200:  # the instance's error, as an event too
                error = upstream_error(self.model, resp.status_code, await resp.aread())
                await self.close(error.status)
                yield sse_error(error, style_of(self.route))
                return
            self.first()
            async for chunk in resp.aiter_raw():
                self.chunk(chunk)
                yield chunk
        finally:
            router.dequeue(self.model, ticket)
            if not opening.done():  # the client left while it waited: give up the wait
                opening.cancel()  # its own task finishes the call (499)

    # ------------------------------------------------------------------ finish, observe

    def first(self) -> None:
        """The first chunk of a streamed answer is leaving for the client."""
        self._calls.observer.first(self.model, self.route, time.monotonic() - self.started)

    async def close(self, status: int | None = None) -> None:
        """Close the upstream answer (an unfinished one: that stops the generation), then
        finish."""
        if self.resp is not None:
            await self.resp.aclose()  # (again, if it was: that does nothing)
        self.finish(status)

    def finish(self, status: int | None = None) -> None:
        """The request ended with `status` (default: the answer's): give back its slot and
        its lease, and count it. Once; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        self._disarm()
        if status is None:
            status = self.resp.status_code if self.resp is not None else 500
        if self.lease is not None:
            self.lease.close(status)  # before the release, which would close it with 200
        if self._release is not None:
            self._release()
        self._calls.observer.done(self.model, self.route, status, time.monotonic() - self.started)

    # ------------------------------------------------------------------ client-gone watch
    # While the request waits (for a slot, an instance, the answer's head or a whole answer)
    # nothing reads its connection: a watcher does, and when the client has gone it cancels
    # the request's own task; the await it waits in (`_guarded`) turns that into a 499.
    # Whatever was under way unwinds as on any cancel (the gate, the router and the lease
    # give back what they held), so there is no second task whose result might need undoing.
    # Every await between `_arm` and `_disarm` is `_guarded`.

    def _arm(self) -> None:
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._watch)

    def _watch(self) -> None:
        self._timer = None
        self._watcher = asyncio.ensure_future(self._until_gone())

    async def _until_gone(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        assert self._task is not None
        self._task.cancel()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _lost(self) -> ApiError | None:
        """The 502 to answer with when this request's task was cancelled because its
        instance's host was lost (Router.abort_lost), else None."""
        task = asyncio.current_task()
        why = self._calls.router.lost_reason(task)
        if why is None or task is None or task.uncancel() > 0:
            return None
        return ApiError(502, why, "instance_lost", 2)

    async def _guarded(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except asyncio.CancelledError:
            if self._gone and self._task is not None:
                self._gone = False
                if self._task.uncancel() == 0:  # nobody else cancelled this request
                    raise client_gone() from None
            raise


class Relay(StreamingResponse):
    """A streamed answer. Whatever ends it (its end, the client gone, an upstream failure,
    never started), the upstream response is closed and the call finished once: with the
    answer's status if the stream ran to its end, 499 if the client left first, 502 if the
    instance failed mid-stream."""

    def __init__(
        self,
        call: Call,
        chunks: AsyncIterator[bytes],
        status_code: int,
        headers: Mapping[str, str] | None,
        media_type: str | None,
        first: bool,
        on_chunk: Callable[[bytes], None] | None,
    ) -> None:
        super().__init__(self._relay(chunks, first, on_chunk), status_code, headers, media_type)
        self._call = call
        self._ended = False

    async def _relay(
        self,
        chunks: AsyncIterator[bytes],
        first: bool,
        on_chunk: Callable[[bytes], None] | None,
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if first:
                self._call.first()
                first = False
            if on_chunk is not None:
                on_chunk(chunk)
            yield chunk
        self._ended = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status: int | None = None
        try:
            await super().__call__(scope, receive, send)
            if not self._ended:
                status = 499  # the response's disconnect listener stopped it
        except http.TransportError:  # the instance failed mid-stream
            status = 502
            raise
        except Exception:
            status = 500
            raise
        except BaseException:  # cancelled: the client gone, or the gateway stopping
            status = 499
            raise
        finally:
            await self._call.close(status)


# ---------------------------------------------------------------------- helpers


async def until_disconnected(receive: Receive) -> None:
    """Returns once the client has closed the connection (the body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless(
    gone: asyncio.Future[None],
    work: Awaitable[T],
    undo: Callable[[T], Awaitable[None]] | None = None,
) -> T:
    """`work`'s result, unless the client goes first: then `work` is cancelled (releasing
    what it held) and a 499 ApiError is raised. Should `work` finish anyway (the cancel
    came too late), `undo` gives back what its result holds. (For routes outside the
    request lifecycle: /api/pull.)"""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        result = await task
        if undo is not None:
            await undo(result)
    raise client_gone()


def upstream_error(model: str, status: int, data: bytes) -> ApiError:
    """An instance's (or the UI's) error answer as ours: the status it meant, its message.

    llama-server answers some bad requests with 500 (a JSON field of the wrong type fails
    deep in its parser): those are the client's to fix, so they become 400s; a 501 is a
    feature this model was not started with. An empty or non-JSON error gets a message.
    """
    try:
        err = msgspec.json.decode(data)["error"]
        detail = err["message"] if isinstance(err, dict) else str(err)
    except (msgspec.DecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        detail = data[:200].decode("utf-8", "replace").strip() or "no details"
    detail = str(detail)[:1000]
    if status == 501:
        return ApiError(
            400, f"model {model!r}: {detail} (see models.{model}.args)", "not_supported"
        )
    if status == 500 and any(m in detail for m in CLIENT_FAULTS):
        return ApiError(400, f"invalid request for {model}: {detail}", "invalid_request")
    if status < 400 or status > 599:
        status = 502
    code = "upstream_error" if status >= 500 else "invalid_request"
    return ApiError(status, f"{model}: {detail}", code, 2 if status in (502, 503) else None)


# llama-server's 500s that a request's own content caused (nlohmann::json type and parse
# errors, unsupported inputs): a client error, not a server fault.
CLIENT_FAULTS = (
    "[json.exception.",
    "type must be",
    "image input is not supported",
    "is not supported",
    "Invalid",
    "invalid",
    "must be",
    "Expected",
    "expected",
    "is required",  # a field the request lacks ("'messages' is required" on /v1/messages)
)
