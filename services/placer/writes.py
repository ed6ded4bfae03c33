"""The placer's writes: instance records by compare-and-set, commands stamped with the
leader's epoch, and the events that tell what happened (a swap's stages, a refusal). Each
write and command checks the lease first (`lease.check()`): a deposed or lapsed leader
writes and sends nothing, and the pass aborts with `LeaseLost`.
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

import proto
from lls.bus import Bus
from proto import InstanceRecord, InstanceState, lifecycle

from .lease import Lease
from .watches import Watches

log = logging.getLogger(__name__)


class Writer:
    """Record writes, commands and their events, as the leader."""

    def __init__(self, bus: Bus, lease: Lease, watches: Watches) -> None:
        self.bus = bus
        self.lease = lease
        self.watches = watches
        self.refused: dict[str, tuple[float, str]] = {}  # model -> last PlacementFailed

    async def write(self, rec: InstanceRecord, **changes: object) -> bool:
        """Compare-and-set an instance record; False when someone else changed it first, or
        when the lifecycle does not let the placer make this change (proto/lifecycle.py)."""
        new = msgspec.structs.replace(rec, updated=time.time(), **changes)
        why = lifecycle.refusal(lifecycle.PLACER, rec.state, new.state)
        if why is not None:
            log.warning("not writing %s %s: %s", rec.instance_id, new.state.value, why)
            return False
        rev = self.watches.revisions.get(rec.instance_id)
        self.lease.check()  # a deposed or lapsed leader writes nothing (aborts the pass)
        try:
            rev = await self.bus.instances.update(
                proto.instance_key(rec.host or "", rec.instance_id), proto.encode(new), last=rev
            )
        except KeyWrongLastSequenceError:
            return False  # the next pass sees the newer record and decides again
        self.watches.on_instance(rec.instance_id, new, rev)
        await self.recorded(new, rev)
        return True

    async def recorded(self, rec: InstanceRecord, rev: int) -> None:
        """The event of a write: the whole record and its revision (lls/history.py)."""
        await self.bus.emit_record(
            proto.InstanceChanged(
                instance_id=rec.instance_id,
                model=rec.model,
                state=rec.state,
                host=rec.host,
                endpoint=rec.endpoint,
                reason=rec.reason,
                record=rec,
                revision=rev,
            )
        )

    async def command(
        self, subject: str, cmd: proto.AgentCommand | proto.DownloaderCommand | proto.InspectModel
    ) -> None:
        """Send a command as the leader: only while the lease is valid (else LeaseLost aborts
        the pass), stamped with its epoch, so that once another placer took over, agents and
        downloaders refuse what this one may still have on its way."""
        self.lease.check()
        await self.bus.command(subject, msgspec.structs.replace(cmd, epoch=self.lease.epoch))

    async def stop(self, rec: InstanceRecord, reason: str) -> None:
        if rec.state not in proto.LIVE_STATES:
            return
        if await self.write(rec, state=InstanceState.STOPPING, reason=reason):
            await self.command(
                proto.cmd_agent(rec.host or ""),
                proto.StopInstance(
                    cmd_id=f"stop-{rec.instance_id}", instance_id=rec.instance_id, reason=reason
                ),
            )

    async def fail(self, rec: InstanceRecord, reason: str) -> None:
        await self.write(rec, state=InstanceState.FAILED, reason=reason)

    async def refuse(self, model: str, reason: str, retry_after: float) -> None:
        """Tell waiting gateways this model cannot be served now (they answer 503)."""
        self.refused[model] = (time.time(), reason)  # a pending `lls load` fails with it
        await self.bus.emit(
            proto.PlacementFailed(model=model, reason=reason, retry_after_s=max(1.0, retry_after))
        )

    # ------------------------------------------------------------------ swaps

    async def drain(self, model: str, victims: list[InstanceRecord], why: str, now: float) -> None:
        """The first step of a swap: `victims` stop taking requests, for `model`'s sake."""
        log.info("swap for %s: %s drain; %s", model, ", ".join(v.instance_id for v in victims), why)
        for vic in victims:
            await self.write(
                vic, state=InstanceState.DRAINING, drain_for=model, drain_since=now, reason=why
            )
        await self.swap_event(model, "draining", victims, why)

    async def swap_event(
        self,
        model: str,
        stage: str,
        victims: list[InstanceRecord],
        why: str,
        drain_s: float | None = None,
    ) -> None:
        await self.bus.emit(
            proto.SwapChanged(
                model=model,
                stage=stage,
                yielding=[v.instance_id for v in victims],
                yielding_models=sorted({v.model for v in victims}),
                reason=why,
                drain_s=drain_s,
            )
        )

    async def end_drain(self, rec: InstanceRecord, stage: str, why: str, now: float) -> None:
        log.info("swap %s: %s", stage, why)
        if await self.write(rec, state=InstanceState.READY, drain_for="", drain_since=None):
            drained_for = now - (rec.drain_since or now)
            await self.swap_event(rec.drain_for, stage, [rec], why, drain_s=drained_for)
