"""Waiting with a deadline.

Use these (or `async with asyncio.timeout(...)`) rather than `asyncio.wait_for`: on Python
3.11, wait_for swallows a cancel that arrives as the awaited thing completes, so a task told
to stop (a client gone, a service shutting down) would carry on as if never told.
"""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True if it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
