"""The replica step of a pass: for every model with a live instance, models with the oldest
waiting requests first, the pure `replicas.plan` says add a replica (placed in free room
only: throughput never costs another model its instance) or retire one gone idle (it
drains, then the reload follower's `plan_retire` stops it). DESIGN.md section 8."""

from __future__ import annotations

import logging
import time

import proto
from lls.bus import Bus
from lls.config import Config
from proto import InstanceRecord, InstanceState

from .executor import Executor
from .placement import NoFit
from .plan_view import DEMAND_FRESH_S
from .planning import Planning
from .replicas import AddReplica, StopReplica
from .replicas import plan as replica_plan
from .turns import Waiting
from .watches import Watches
from .writes import Writer

log = logging.getLogger(__name__)


class Scaling:
    """Replicas added under load and retired when idle."""

    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        *,
        watches: Watches,
        planning: Planning,
        writer: Writer,
        executor: Executor,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.watches = watches
        self.planning = planning
        self.writer = writer
        self.executor = executor
        self.blocked: dict[str, str] = {}  # model -> why its last replica found no room

    async def scale(self, now: float, queues: dict[str, Waiting], order: list[str]) -> None:
        """One replica step per model (pure `replicas.plan`), models with the oldest waiting
        requests first. Runs after the demand pass: a model still without a live instance
        then waits for room, and no model gets a replica before it is placed."""
        w = self.watches
        by_model: dict[str, list[InstanceRecord]] = {}
        for r in w.instances.values():
            if r.state in proto.LIVE_STATES and r.host not in w.lost:
                by_model.setdefault(r.model, []).append(r)
        waiting = set(queues) | {m for m, at in w.last_demand.items() if now - at < DEMAND_FRESH_S}
        starved = {m for m in waiting if m in self.cfg.models and m not in by_model}
        activity = w.merged_activity()
        known = w.activity_known(now)
        first = [m for m in order if m in by_model]
        for model in first + sorted(set(by_model) - set(first)):
            mcfg = self.cfg.models.get(model)
            if mcfg is None:
                continue  # removed by a reload: the config follower retires it
            action = replica_plan(
                model,
                by_model[model],
                activity,
                queues.get(model),
                mcfg.replicas,
                now=now,
                demanded=now - w.last_demand.get(model, -DEMAND_FRESH_S) < DEMAND_FRESH_S,
                others_waiting=starved,
            )
            if isinstance(action, AddReplica):
                await self._add(model, action.reason, now, queues)
            elif isinstance(action, StopReplica) and known:
                await self._remove(model, action)

    async def _remove(self, model: str, action: StopReplica) -> None:
        """Retire an idle replica: it drains (gateways stop sending to it, and say so), then
        `plan_retire` stops it. The placer's view of its idleness is a report old, and a
        request sent to it since must not be cut off."""
        rec = self.watches.instances.get(action.instance_id)
        if rec is None or rec.state != InstanceState.READY:
            return
        ok = await self.writer.write(
            rec,
            state=InstanceState.DRAINING,
            drain_for="",
            drain_since=time.time(),
            reason=action.reason,
        )
        if not ok:
            return
        log.info("replica of %s removed (%s): %s", model, rec.instance_id, action.reason)
        await self.bus.emit(
            proto.ReplicaChanged(
                model=model,
                stage="removed",
                instance_id=rec.instance_id,
                replicas=self._count(model),
                reason=action.reason,
            )
        )

    def _count(self, model: str) -> int:
        """Live instances of `model` that stay (a draining one is on its way out)."""
        return sum(1 for r in self.watches.live(model) if r.state != InstanceState.DRAINING)

    async def _add(self, model: str, why: str, now: float, queues: dict[str, Waiting]) -> None:
        """Another instance of a model that runs already, in free room only: a replica adds
        throughput, which never costs another model its instance."""
        if self.planning.recent_failure(model, now) is not None:
            return  # one failed lately: no tight retry loop (placer.failure_backoff)
        need = self.planning.need(model, self.cfg.models[model], host=None)
        if not need.memory_mib:
            return  # size unknown: only the demand path fetches first and checks after
        decision = self.planning.place(need, now, queues=queues, may_evict=False)
        if isinstance(decision, NoFit):
            if self.blocked.get(model) != decision.reason:
                log.info("no room for another %s (%s): %s", model, why, decision.reason)
            self.blocked[model] = decision.reason
            return
        self.blocked.pop(model, None)
        rec = await self.executor.create(model, need, decision, now)
        log.info("replica of %s added (%s): %s", model, rec.instance_id, why)
        await self.bus.emit(
            proto.ReplicaChanged(
                model=model,
                stage="added",
                instance_id=rec.instance_id,
                replicas=self._count(model),
                reason=f"{why}; {decision.reason}",
            )
        )
