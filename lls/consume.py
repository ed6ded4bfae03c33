"""The one command loop of every service (agent, downloader, inspector): a durable pull
consumer whose messages are handled one by one or in bounded tasks, riding out bus
trouble, and handling only its own durable's deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from lls.aio import wait_event
from lls.bus import Bus

log = logging.getLogger(__name__)


def durable_config(name: str, subject: str, ack_wait_s: float = 30) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=name,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=20,
        max_ack_pending=256,
    )


async def consume(
    bus: Bus,
    durable: str,
    subject: str,
    handle: Callable[[Any], Awaitable[None]],
    stop: asyncio.Event,
    *,
    stream: str,
    tasks: set[asyncio.Task[None]] | None = None,
    concurrency: int = 1,
    ack_wait_s: float = 30,
) -> None:
    """Pull a durable consumer's messages and run `handle(msg)` on each until `stop`: the one
    command loop of every service (agent, downloader, inspector).

    `handle` acks or naks the message itself. Given `tasks`, each `handle` runs in a task put
    there (the owner cancels them on shutdown), at most `concurrency` at once; without, one
    after another. Messages are fetched one at a time: nats-py's fetch of n, once one came,
    waits out its timeout for the rest, which held a second command up to a second.

    Only messages of this durable reach `handle`: a delivery from any other consumer (which
    anyone who may create one could aim at our inbox) is dropped by its ack subject.

    It rides out bus trouble: it subscribes again after an error, after 3 failed fetches in a
    row, and when fetches keep timing out while the consumer has messages pending (pull
    subscriptions have been seen to stall after a server restart, nats.py issue 504).
    """
    sub = None
    errors = idle = 0
    ours = f"$JS.ACK.{stream}.{durable}."  # the reply the server gives this durable's messages
    try:
        while not stop.is_set():
            if sub is None:
                try:
                    sub = await bus.js.pull_subscribe(
                        subject,
                        durable=durable,
                        stream=stream,
                        config=durable_config(durable, subject, ack_wait_s),
                    )
                except Exception as e:  # noqa: BLE001 - NATS not reachable yet
                    log.warning("cannot subscribe to %s: %s", subject, e)
                    await wait_event(stop, 1.0)
                    continue
            if tasks is not None and len(tasks) >= concurrency:
                await asyncio.wait(tasks, timeout=1, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await sub.fetch(1, timeout=1.0)
                errors = idle = 0
            except (TimeoutError, nats.errors.TimeoutError):
                idle += 1
                if idle % STALL_CHECK_EVERY == 0 and await _stalled(bus, stream, durable):
                    log.warning("consumer %s stalled; subscribing again", durable)
                    sub = await _drop(sub)
                continue
            except Exception as e:  # noqa: BLE001 - keep consuming through bus trouble
                errors += 1
                log.warning("consumer %s: fetching failed: %s", durable, e)
                if errors >= 3:
                    sub, errors = await _drop(sub), 0
                await wait_event(stop, 0.5)
                continue
            for msg in msgs:
                if not (msg.reply or "").startswith(ours):
                    # Not from our durable: another consumer's push delivery aimed at our
                    # inbox (docs/security.md, "Consumers"). Never handled as a command.
                    log.warning("consumer %s: ignored a message from %s", durable, msg.reply)
                    continue
                if tasks is None:
                    await handle(msg)
                else:
                    task = asyncio.create_task(handle(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
    finally:
        await _drop(sub)  # an open pull subscription would stall the connection's drain


STALL_CHECK_EVERY = 30  # idle fetches (about a second each) between checks for a stall


async def _stalled(bus: Bus, stream: str, durable: str) -> bool:
    """Messages wait for the consumer, yet fetches time out (or the consumer is gone)."""
    try:
        info = await bus.js.consumer_info(stream, durable)
    except Exception as e:  # noqa: BLE001 - consumer gone, or NATS away
        log.warning("consumer %s: %s", durable, e)
        return True
    return info.num_pending > 0


async def _drop(sub: Any) -> None:
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return None
