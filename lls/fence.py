"""Fencing a deposed leader: the receiving side of the placer's lease epochs.

Every command a leading placer sends carries its epoch (services/placer/lease.py). Agents
and downloaders remember the highest epoch they have seen, from the commands and from the
lease record itself (KV leases, which every service may read), and refuse a command from a
lower one: a placer that was frozen or cut off and lost its lease can still have commands
on their way, and they must not run beside the new leader's.
"""

from __future__ import annotations

import asyncio

import proto
from lls.bus import Bus, watch_kv

LEASE_KEY = "placer"  # the placer's lease in KV leases


def stale(epoch: int, highest: int) -> str | None:
    """Why a command of `epoch` is refused when `highest` has been seen; None: run it.

    Epoch 0 is a command from no leader (`lls pull`, an operator's tool, a placer older than
    epochs): never fenced, as before epochs existed."""
    if epoch and epoch < highest:
        return f"stale leader epoch {epoch} < {highest}"
    return None


class Fence:
    """The highest leader epoch this service has seen."""

    def __init__(self) -> None:
        self.highest = 0

    def saw(self, epoch: int) -> None:
        self.highest = max(self.highest, epoch)

    def admit(self, epoch: int) -> str | None:
        """Why a command of `epoch` is refused, or None (and its epoch is remembered)."""
        why = stale(epoch, self.highest)
        if why is None:
            self.saw(epoch)
        return why

    def _on_lease(self, key: str, rec: proto.LeaseRecord, _rev: int) -> None:
        if key == LEASE_KEY:
            self.saw(rec.epoch)

    async def follow(self, bus: Bus, stop: asyncio.Event) -> None:
        """Learn each take-over from the lease record as it happens, so a deposed leader's
        command is refused even before the new leader's first command arrives."""
        await watch_kv(bus, bus.leases, proto.LeaseRecord, self._on_lease, _ignore, stop)


def _ignore(_key: str) -> None:
    """A deleted lease record says nothing about epochs: the highest seen stays."""
