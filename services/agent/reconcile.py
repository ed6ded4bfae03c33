"""Reconciling KV with what really runs on this host: at start, adopt the servers an earlier
agent left running (or stop those nobody wants) and settle the records of those that are
gone; while running, stop a ready instance whose record says nobody wants it, and record a
ready one again when the bus lost that write."""

from __future__ import annotations

import asyncio
import logging

import proto
from lls.config import AgentConfig
from proto import InstanceState
from services.agent import slot_cache
from services.agent.blocking import BlockingPool
from services.agent.instance import Instance
from services.agent.lifecycle import STOP_GRACE_S, Lifecycle
from services.agent.records import Records
from services.agent.runtime import Runtime

log = logging.getLogger(__name__)

NOT_FOUND_AFTER_RESTART = "agent restarted; instance process not found"


class Reconciler:
    """Adoption at start and the periodic check of ready instances against their records."""

    def __init__(
        self,
        cfg: AgentConfig,
        host: str,
        runtime: Runtime,
        *,
        records: Records,
        lifecycle: Lifecycle,
        pool: BlockingPool,
    ):
        self.cfg = cfg
        self.host = host
        self.runtime = runtime
        self.records = records
        self.lifecycle = lifecycle
        self.instances = lifecycle.instances  # shared, never replaced
        self.pool = pool

    async def adopt(self) -> None:
        """Reconcile KV with what really runs for this host id, before taking commands."""
        handles = await self.pool.call(self.runtime.discover)
        records = await self.records.snapshot()
        unwanted = []
        for h in handles:
            rec = records.get(h.instance_id)
            if (
                rec is None
                or rec.state not in proto.LIVE_STATES
                or rec.host not in (None, self.host)
            ):
                why = "no record" if rec is None else f"record is {rec.state.value}"
                log.info("stopping %s left by an earlier agent: %s", h.instance_id, why)
                unwanted.append(self.pool.call(self.runtime.stop, h, STOP_GRACE_S))
                continue
            log.info("adopting %s (%s) on port %d", h.instance_id, rec.model, h.port)
            inst = Instance(
                h.instance_id, rec.model, tuple(rec.gpus), rec.memory_mib, handle=h, port=h.port
            )
            inst.state = rec.state
            inst.api_key = h.api_key  # from its server's environment (the runtime read it)
            if not h.api_key:
                log.warning("%s: its API key cannot be read back; no slot saves", h.instance_id)
            if self.cfg.slot_cache_mib and slot_cache.is_key(h.slot_key):
                inst.slot_key = h.slot_key  # launched with saving on: it saves when it stops
            inst.launched.set()
            self.lifecycle.spawn(inst)
        await asyncio.gather(*unwanted, return_exceptions=True)
        for iid, rec in records.items():
            if rec.host != self.host or iid in self.instances:
                continue
            if rec.state in (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING):
                log.warning("%s: %s", iid, NOT_FOUND_AFTER_RESTART)
                await self.records.transition(
                    iid,
                    rec.model,
                    InstanceState.FAILED,
                    reason=NOT_FOUND_AFTER_RESTART,
                    endpoint=None,
                )
            elif rec.state == InstanceState.STOPPING:
                await self.records.transition(
                    iid, rec.model, InstanceState.STOPPED, reason=rec.reason
                )

    async def reconcile(self) -> None:
        """Stop ready instances whose record says nobody wants them any more (marked lost
        while this host was unreachable, or deleted); say again that a ready one is ready
        when its record missed it (the write was lost while the bus was away)."""
        for inst in list(self.instances.values()):
            if inst.state != InstanceState.READY or inst.stop_reason is not None:
                continue
            rec = await self.records.get(inst.instance_id)
            if rec is None or rec.state in proto.END_STATES or rec.host not in (None, self.host):
                why = "no record" if rec is None else f"record is {rec.state.value} on {rec.host}"
                log.warning("stopping %s: %s; nobody wants it", inst.instance_id, why)
                inst.request_stop(f"{why}; nobody wants it", quiet=True)
            elif rec.state in (InstanceState.PENDING, InstanceState.STARTING):
                log.warning(
                    "%s is ready but its record says %s: recording it again",
                    inst.instance_id,
                    rec.state.value,
                )
                await self.lifecycle.mark_ready(
                    inst, "ready (recorded again after the bus was away)"
                )
