"""This host's instance records and the agent's events: compare-and-set writes under the
lifecycle table (proto/lifecycle.py), each followed by its InstanceChanged event; refusals;
best-effort emits. The agent never creates a record: the placer writes it before a start."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

import proto
from lls.bus import Bus, kv_snapshot
from proto import InstanceRecord, InstanceState, lifecycle
from services.agent.instance import Instance
from services.agent.runtime import Runtime

log = logging.getLogger(__name__)


class Records:
    """Reads and writes this host's records in KV `lls_instances`, and emits events."""

    def __init__(self, bus: Bus, host: str, runtime: Runtime):
        self.bus = bus
        self.host = host
        self.runtime = runtime  # what a STARTING record names as its program and backend

    async def get(self, instance_id: str) -> InstanceRecord | None:
        try:
            entry = await self.bus.instances.get(proto.instance_key(self.host, instance_id))
        except KeyNotFoundError:  # deleted keys too
            return None
        if not entry.value:
            return None
        try:
            return proto.decode(entry.value, InstanceRecord)
        except msgspec.ValidationError:
            log.warning("unreadable instance record %s", instance_id)
            return None

    async def snapshot(self) -> dict[str, InstanceRecord]:
        records = await kv_snapshot(self.bus, self.bus.instances, InstanceRecord, timeout=60)
        return {r.instance_id: r for r in records.values()}

    async def _update(
        self, instance_id: str, state: InstanceState, mutate: Callable[[InstanceRecord], None]
    ) -> tuple[InstanceRecord, int] | str:
        """Compare-and-set this host's record of `instance_id` into `state`: the record and
        its new revision, or why the lifecycle refuses it (proto/lifecycle.py). A lost race
        reads again and asks again, so a newer decision of the placer (stopping, lost) is
        never overwritten, and a purged record is never created again."""
        kv, key = self.bus.instances, proto.instance_key(self.host, instance_id)
        for _ in range(20):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # deleted keys too
                entry = None
            old = proto.decode(entry.value, InstanceRecord) if entry and entry.value else None
            why = lifecycle.refusal(lifecycle.AGENT, old.state if old else None, state)
            if why is not None:
                return why
            assert old is not None and entry is not None  # the agent never creates a record
            rec = msgspec.structs.replace(old, state=state)
            mutate(rec)
            rec.updated = proto.now()
            try:
                return rec, await kv.update(key, proto.encode(rec), last=entry.revision)
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.01)  # someone wrote in between: read again
        raise RuntimeError(f"instance record {instance_id}: too much write contention")

    async def transition(
        self, instance_id: str, model: str, state: InstanceState, **fields: Any
    ) -> None:
        def mutate(r: InstanceRecord) -> None:
            r.host = self.host
            for k, v in fields.items():
                setattr(r, k, v)

        try:
            async with asyncio.timeout(10):
                done = await self._update(instance_id, state, mutate)
        except Exception as e:  # noqa: BLE001 - the bus is away; the lifecycle goes on
            log.error("cannot record %s %s: %s", instance_id, state.value, e)
            return
        if isinstance(done, str):  # the placer decided otherwise; its command follows
            log.info("not recording %s (%s) %s: %s", instance_id, model, state.value, done)
            return
        rec, rev = done
        await self.bus.emit_record(
            proto.InstanceChanged(
                instance_id=instance_id,
                model=rec.model,
                state=state,
                host=self.host,
                endpoint=rec.endpoint,
                reason=rec.reason,
                record=rec,
                revision=rev,
            )
        )

    async def set(self, inst: Instance, state: InstanceState, **fields: Any) -> None:
        inst.state = state
        if state == InstanceState.STARTING:
            fields["gpus"] = list(inst.gpus)
            fields["binary"], fields["backend"] = self.runtime.program, self.runtime.backend
            if inst.memory_mib:  # keep what the placer reserved when the command has none
                fields["memory_mib"] = inst.memory_mib
        log.info(
            "%s (%s): %s %s", inst.instance_id, inst.model, state.value, fields.get("reason", "")
        )
        await self.transition(inst.instance_id, inst.model, state, **fields)

    async def emit(self, event: proto.Event) -> None:
        try:
            await self.bus.emit(event)
        except Exception as e:  # noqa: BLE001 - events are best effort; KV holds the state
            log.warning("cannot emit %s: %s", type(event).__name__, e)

    async def refuse(
        self, command: str, instance_id: str, model: str, reason: str, cmd_id: str
    ) -> None:
        log.warning("refused %s command for %r (%s): %s", command, instance_id, model, reason)
        await self.emit(
            proto.CommandRefused(
                host=self.host,
                command=command,
                instance_id=instance_id[:200],
                model=model[:200],
                reason=reason,
                cmd_id=cmd_id[:200],
            )
        )
