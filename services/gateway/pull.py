"""Ollama's /api/pull and /api/delete over the bus.

The gateway only asks: it publishes PullRequested / DeleteRequested (its NATS identity may
command no host), the placer decides and commands the downloaders, and the gateway follows
the placer's answer and the downloaders' events. It subscribes before it asks, so no event
of its request is missed, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

import proto
from lls.bus import Bus, new_id

from . import ollama
from .errors import ApiError

log = logging.getLogger(__name__)

ANSWER_WAIT_S = 15.0  # the leading placer answers within a pass or two; else none leads
PULL_IDLE_S = 300.0  # a download with no event this long is given up (a sha256 check is silent)
DELETE_WAIT_S = 30.0  # each host's downloader confirms a delete within this
QUEUE_MAX = 1000  # events waiting to be read (progress beyond it is dropped, never results)


class Follow:
    """Events on `subjects` that `keep` accepts, queued from subscription on."""

    def __init__(self, bus: Bus, subjects: list[str], keep: Callable[[proto.Event], bool]):
        self.bus = bus
        self.subjects = subjects
        self.keep = keep
        self.queue: asyncio.Queue[proto.Event] = asyncio.Queue(QUEUE_MAX)
        self._subs: list[Any] = []

    async def __aenter__(self) -> Follow:
        try:
            for subject in self.subjects:
                self._subs.append(await self.bus.subscribe(subject, cb=self._on_msg))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as e:  # noqa: BLE001 - a connection gone takes its subscriptions
                log.debug("unsubscribe: %r", e)

    async def _on_msg(self, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            ev = proto.decode(msg.data, proto.Event)
        except msgspec.DecodeError:  # includes ValidationError: not ours to read
            return
        if self.keep(ev) and not self.queue.full():
            self.queue.put_nowait(ev)

    async def next(self, timeout: float) -> proto.Event:
        """The next event; TimeoutError after `timeout` seconds without one."""
        async with asyncio.timeout(max(0.0, timeout)):
            return await self.queue.get()


async def _ask(bus: Bus, request: proto.Event) -> None:
    try:
        await bus.emit(request)
    except Exception as e:  # noqa: BLE001 - a frozen or lost bus: say so, quickly
        raise ApiError(
            503, f"the message bus (NATS) did not take the request: {e!r}", "bus_unavailable", 5
        ) from None


async def _answer(
    follow: Follow, request_id: str, typ: type, early: list[proto.Event] | None = None
) -> Any:  # noqa: ANN401
    """The placer's answer to our request, or a 503 when no placer answers in time. Other
    events that came first go to `early`: a host can act on the placer's command before the
    placer's answer reaches us."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    while True:
        try:
            ev = await follow.next(deadline - time.monotonic())
        except TimeoutError:
            raise ApiError(
                503,
                f"no placer answered within {ANSWER_WAIT_S:g} s; is the placer running?",
                "placer_unavailable",
                5,
            ) from None
        if isinstance(ev, typ) and getattr(ev, "request_id", None) == request_id:
            return ev
        if early is not None:
            early.append(ev)


class Pull:
    """One /api/pull: `begin()` gets the placer's answer (an ApiError before anything is
    sent when it refuses), then `lines()` yields Ollama's progress lines to the end."""

    def __init__(
        self,
        bus: Bus,
        gateway_id: str,
        model: str,
        digest: str,
        size_of: Callable[[str], int | None],
    ):
        self.bus = bus
        self.gateway_id = gateway_id
        self.model = model
        self.digest = digest
        self.size_of = size_of  # host -> the file's size there, from its heartbeat
        self.request_id = new_id()
        self.answer: proto.PullAnswered | None = None
        self.early: list[proto.Event] = []  # download events that came before the answer
        self.follow = Follow(
            bus,
            [proto.evt("pull.answered"), "lls.evt.download.>"],
            lambda ev: getattr(ev, "model", None) == model,
        )

    async def begin(self) -> None:
        await self.follow.__aenter__()
        try:
            await _ask(
                self.bus,
                proto.PullRequested(
                    model=self.model, request_id=self.request_id, gateway_id=self.gateway_id
                ),
            )
            answer = await _answer(self.follow, self.request_id, proto.PullAnswered, self.early)
        except BaseException:
            await self.follow.close()
            raise
        if answer.status == "refused":
            await self.follow.close()
            raise ApiError(503, f"cannot pull {self.model}: {answer.reason}", "pull_refused", 10)
        self.answer = answer

    async def lines(self, total_s: float) -> AsyncIterator[dict[str, Any]]:
        """Progress as the download on the chosen host reports it; the last line is
        {"status": "success"} or {"error": ...}. Ends within `total_s`, and after
        PULL_IDLE_S without any word from the downloader."""
        assert self.answer is not None, "begin() first"
        host = self.answer.host
        try:
            yield {"status": ollama.PULL_START}
            if self.answer.status == "present":
                size = self.size_of(host)
                if size is not None:
                    yield ollama.pull_progress(self.digest, size, size)
                for status in ollama.PULL_END:
                    yield {"status": status}
                return
            deadline = time.monotonic() + total_s
            while True:
                left = deadline - time.monotonic()
                try:
                    ev = (
                        self.early.pop(0)
                        if self.early
                        else await self.follow.next(min(left, PULL_IDLE_S))
                    )
                except TimeoutError:
                    why = (
                        f"no progress for {PULL_IDLE_S:g} s"
                        if left > PULL_IDLE_S
                        else f"not done within {total_s:g} s"
                    )
                    yield {"error": f"pulling {self.model} on {host}: {why}"}
                    return
                if getattr(ev, "host", None) != host:
                    continue
                if isinstance(ev, proto.DownloadProgress):
                    yield ollama.pull_progress(self.digest, ev.bytes, ev.total)
                elif isinstance(ev, proto.DownloadCompleted):
                    yield ollama.pull_progress(self.digest, ev.size, ev.size)
                    for status in ollama.PULL_END:
                        yield {"status": status}
                    return
                elif isinstance(ev, proto.DownloadFailed):
                    yield {"error": f"pulling {self.model} on {host} failed: {ev.reason}"}
                    return
        finally:
            await self.follow.close()

    async def result(self, total_s: float) -> dict[str, Any]:
        """`stream: false`: the last line, or an ApiError carrying the failure."""
        last: dict[str, Any] = {}
        async with contextlib.aclosing(self.lines(total_s)) as lines:  # closed if cancelled
            async for line in lines:
                last = line
        if "error" in last:
            raise ApiError(502, last["error"], "pull_failed")
        return {"status": "success"}


async def delete(bus: Bus, gateway_id: str, model: str) -> None:
    """Have every host's store drop the model's file; an ApiError says why not: 409 while
    the model runs (or its file is being downloaded), 404 when no host holds it."""
    request_id = new_id()

    def ours(ev: proto.Event) -> bool:
        return getattr(ev, "model", None) == model

    subjects = [proto.evt("delete.answered"), proto.evt("file.>")]
    async with Follow(bus, subjects, ours) as follow:
        await _ask(
            bus, proto.DeleteRequested(model=model, request_id=request_id, gateway_id=gateway_id)
        )
        early: list[proto.Event] = []
        answer: proto.DeleteAnswered = await _answer(
            follow, request_id, proto.DeleteAnswered, early
        )
        if answer.status == "refused":
            raise ApiError(409, f"cannot delete {model}: {answer.reason}", "model_in_use", 5)
        if answer.status == "absent":
            raise ApiError(404, f"model {model!r} has no file on any host", "model_not_found")
        waiting = {f"del-{request_id}-{h}": h for h in answer.hosts}
        deadline = time.monotonic() + DELETE_WAIT_S
        while waiting:
            try:
                ev = early.pop(0) if early else await follow.next(deadline - time.monotonic())
            except TimeoutError:
                hosts = ", ".join(sorted(waiting.values()))
                raise ApiError(
                    504,
                    f"deleting {model}: no confirmation from {hosts} within {DELETE_WAIT_S:g} s",
                    "delete_timeout",
                ) from None
            if not isinstance(ev, proto.FileDeleted | proto.FileDeleteFailed):
                continue
            if waiting.pop(ev.cmd_id, None) is None:
                continue
            if isinstance(ev, proto.FileDeleteFailed):
                status, code = (409, "model_in_use") if ev.busy else (502, "delete_failed")
                raise ApiError(status, f"deleting {model} on {ev.host}: {ev.reason}", code)


class PullStream(StreamingResponse):
    """A pull's NDJSON lines; its subscriptions end with the answer, even one never sent."""

    def __init__(self, pull: Pull, total_s: float) -> None:
        lines = (msgspec.json.encode(line) + b"\n" async for line in pull.lines(total_s))
        super().__init__(lines, media_type="application/x-ndjson")
        self._pull = pull

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._pull.follow.close()
