"""Fan-out of view changes to connected browsers, one bounded queue per client.

A client that falls behind by more than `maxlen` messages loses its oldest ones (the deque
drops them) and is marked for resync: it is sent a fresh snapshot instead of stale deltas,
so a slow browser costs bounded memory and still ends up showing the truth.
"""

from __future__ import annotations

import asyncio
from collections import deque

from lls.aio import wait_event

QUEUE_MAX = 1000  # messages per client before the oldest are dropped


class Client:
    def __init__(self, maxlen: int = QUEUE_MAX):
        self.queue: deque[tuple[str, bytes]] = deque(maxlen=maxlen)
        self.wakeup = asyncio.Event()
        self.resync = True  # the first thing every client gets is a snapshot
        self.dropped = 0
        self.closed = False

    def push(self, kind: str, data: bytes) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
            self.resync = True
        self.queue.append((kind, data))
        self.wakeup.set()

    def take(self) -> list[tuple[str, bytes]]:
        items = list(self.queue)
        self.queue.clear()
        self.wakeup.clear()
        return items

    async def wait(self, within: float) -> bool:
        """Wait for messages; False when none came within `within` seconds."""
        return await wait_event(self.wakeup, within)


class Hub:
    def __init__(self, maxlen: int = QUEUE_MAX):
        self.maxlen = maxlen
        self.clients: set[Client] = set()

    def subscribe(self) -> Client:
        client = Client(self.maxlen)
        self.clients.add(client)
        return client

    def unsubscribe(self, client: Client) -> None:
        self.clients.discard(client)

    def publish(self, kind: str, data: bytes) -> None:
        for client in self.clients:
            client.push(kind, data)

    def resync(self) -> None:
        """Send every browser a fresh snapshot (after something deltas do not carry changed)."""
        for client in self.clients:
            client.resync = True
            client.wakeup.set()

    def close(self) -> None:
        """End every stream (on shutdown, so the server need not wait for browsers)."""
        for client in self.clients:
            client.closed = True
            client.wakeup.set()
