"""One instance as the agent runs it: its placement, its server's handle and port, its state,
and the events its lifecycle task and a stop command meet on (lifecycle.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from lls.aio import wait_event
from proto import InstanceState, StartInstance
from services.agent.runtime import Handle


@dataclass
class Instance:
    instance_id: str
    model: str
    gpus: tuple[int, ...]
    memory_mib: int
    cmd: StartInstance | None = None  # None for an adopted instance
    handle: Handle | None = None
    port: int | None = None
    state: InstanceState = InstanceState.STARTING
    stop_reason: str | None = None
    quiet: bool = False  # stop without writing the record (it is no longer ours)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    launched: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # slot_cache.cache_key of how it was launched; "" = no warm swap (cache off, adopted)
    slot_key: str = ""
    slots: int = 0  # its server's slots (requests at once), read when it became ready
    # Its llama-server's API key: from the start command, or (adopted) from the server's own
    # environment; "" = not known (no slot saves or /props for it, requests still work)
    api_key: str = ""

    def request_stop(self, reason: str, quiet: bool = False) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.quiet = reason, quiet
            self.stop_event.set()

    async def pause(self, seconds: float) -> bool:
        """Sleep, waking early on a stop request; True if a stop was requested."""
        return await wait_event(self.stop_event, seconds)
