"""A model's older events, read from the event stream on demand: what its timeline in the
view no longer holds (its ring is full, or they came before the UI's replay began).

Event subjects do not carry the model, so a window of the stream is read and filtered here;
each click on "older" reads the window before the previous one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

import proto
from lls.aio import wait_event
from lls.bus import Bus
from services.ui.view import decode_event, models_named

SCAN_MSGS = 20_000  # stream messages read per request (progress included): about a second
SCAN_DEADLINE_S = 10.0


class ScanTimeout(Exception):
    pass


async def older_events(
    bus: Bus, model: str, before: int, model_of: dict[str, str]
) -> dict[str, Any]:
    """The events naming `model` among the SCAN_MSGS stream messages before sequence
    `before`, oldest first; `held_from` is where the next, older, read would end."""
    info = await bus.js.stream_info(proto.EVENTS_STREAM)
    first = info.state.first_seq
    before = min(before, info.state.last_seq + 1)  # nothing to wait for past the end
    start = max(first, before - SCAN_MSGS, 1)
    found: list[dict[str, Any]] = []
    if start >= before:
        return {"model": model, "events": found, "complete": True, "held_from": 0}
    known = dict(model_of)  # learned from the window too: a victim's events precede its eviction
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq < before and (ev := decode_event(msg.subject, msg.data)) is not None:
            ev["seq"] = seq
            iid, m = ev.get("instance_id"), ev.get("model")
            if isinstance(iid, str) and isinstance(m, str):
                known[iid] = m
            if ev.get("kind") != "download.progress" and model in models_named(ev, known):
                found.append(ev)
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
    complete = start <= first
    return {
        "model": model,
        "events": found,
        "complete": complete,
        "held_from": 0 if complete else start,
    }
