"""Instance API keys (KV instance keys, lls/instance_key.py): the key a start command hands
an instance, the same on every resend, and the sweep of keys whose instance ended."""

from __future__ import annotations

import proto
from lls import instance_key
from lls.bus import Bus
from proto import InstanceRecord

from .lease import Lease
from .watches import Watches

KEY_SWEEP_S = 10.0  # instance keys of ended (or vanished) instances are deleted this often


class Keys:
    """Reads, issues and sweeps instance keys as the leader (the watches keep the view)."""

    def __init__(self, bus: Bus, lease: Lease, watches: Watches) -> None:
        self.bus = bus
        self.lease = lease
        self.watches = watches
        self.swept = 0.0

    async def api_key(self, rec: InstanceRecord) -> str:
        """The key issued for `rec`: the same on every resend (its server may run with it
        already); read from KV when this placer did not see it issued (a new leader); issued
        now for a record placed before instance keys existed."""
        host = rec.host or ""
        placed = self.watches.keys.get(rec.instance_id)
        if placed is None or placed.host != host:
            placed = await instance_key.read(self.bus, host, rec.instance_id)
        if placed is None or placed.host != host or placed.model != rec.model:
            placed = instance_key.issue(host, rec.instance_id, rec.model)
            self.lease.check()
            key = proto.instance_key(host, rec.instance_id)
            await self.bus.instance_keys.put(key, proto.encode(placed))
        self.watches.on_key("", placed, 0)
        return placed.key

    async def sweep(self, now: float) -> None:
        """Delete the keys of instances that ended (their server is gone) or whose record
        went; every KEY_SWEEP_S. A key is written before its record: one younger than that
        may be waiting for it."""
        if now - self.swept < KEY_SWEEP_S:
            return
        self.swept = now
        for iid, placed in list(self.watches.keys.items()):
            rec = self.watches.instances.get(iid)
            ended = (
                rec.state in proto.END_STATES
                if rec is not None
                else now - placed.issued > KEY_SWEEP_S
            )
            if ended:
                self.lease.check()
                await self.bus.instance_keys.delete(proto.instance_key(placed.host, iid))
                self.watches.on_key_del(proto.instance_key(placed.host, iid))
