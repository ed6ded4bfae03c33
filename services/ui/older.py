"""Older events, read from the event stream on demand: what the view no longer holds (its
rings are full, or they came before the UI's replay began). One path serves both readers:
a model's timeline (the events naming it) and the event log's older pages (every event).

Event subjects do not carry the model, so a window of the stream is read and filtered here;
each click on "older" reads the window before the previous one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

import proto
from lls.aio import wait_event
from lls.bus import Bus
from services.ui.view import decode_event, models_named

SCAN_MSGS = 20_000  # stream messages read per request (progress included): about a second
SCAN_DEADLINE_S = 10.0
LOG_SCAN_MSGS = 2_000  # the log's page: every event counts, so a shorter window fills one
LOG_PAGE = 200  # events per page of the log at most (the newest of its window)


class ScanTimeout(Exception):
    pass


async def older_events(
    bus: Bus,
    model: str | None,
    before: int,
    model_of: dict[str, str],
    *,
    scan: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """The events naming `model` (None: every event) among the `scan` stream messages
    (default SCAN_MSGS) before sequence `before`, oldest first; with `limit`, only the
    newest `limit` of them. `held_from` is where the next, older, read would end."""
    info = await bus.js.stream_info(proto.EVENTS_STREAM)
    first = info.state.first_seq
    before = min(before, info.state.last_seq + 1)  # nothing to wait for past the end
    start = max(first, before - (scan or SCAN_MSGS), 1)
    found: deque[dict[str, Any]] = deque(maxlen=limit)
    if start >= before:
        return {"model": model, "events": [], "complete": True, "held_from": 0}
    known = dict(model_of)  # learned from the window too: a victim's events precede its eviction
    done = asyncio.Event()
    matched = 0  # found ever, the ones `limit` dropped included

    async def on_msg(msg: Msg) -> None:
        nonlocal matched
        seq = msg.metadata.sequence.stream
        if seq < before and (ev := decode_event(msg.subject, msg.data)) is not None:
            ev["seq"] = seq
            iid, m = ev.get("instance_id"), ev.get("model")
            if isinstance(iid, str) and isinstance(m, str):
                known[iid] = m
            if ev.get("kind") != "download.progress" and (
                model is None or model in models_named(ev, known)
            ):
                found.append(ev)  # past `limit`, the oldest found drops out
                matched += 1
        if seq >= before - 1:
            done.set()

    sub = await bus.js.subscribe(
        proto.EVENTS_SUBJECTS,
        stream=proto.EVENTS_STREAM,
        cb=on_msg,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
    )
    try:
        if not await wait_event(done, SCAN_DEADLINE_S):
            raise ScanTimeout(f"the event stream did not deliver {start}..{before - 1} in time")
    finally:
        await sub.unsubscribe()
    # Cut by the limit: the next read ends at the oldest event kept (the dropped ones
    # before it are read again then).
    cut = matched > len(found)
    complete = start <= first and not cut
    held_from = 0 if complete else found[0]["seq"] if cut else start
    return {"model": model, "events": list(found), "complete": complete, "held_from": held_from}
