"""Following a config reload: instances of removed models, and of models whose launch
config changed, are stopped or retired (drained, then stopped), and a changed model gets a
current instance beside its stale one first (pure `reload.plan`). Retiring instances (a
reload's stale one, a replica gone idle) stop once drained (pure `plan.plan_retire`)."""

from __future__ import annotations

import logging

from lls.config import Config
from proto import InstanceState

from .executor import Executor
from .placement import Placed
from .plan import plan_retire
from .planning import Planning
from .reload import plan as reload_plan
from .watches import Watches
from .writes import Writer

log = logging.getLogger(__name__)


class ConfigFollower:
    """What a reload asks of the running instances, carried out each pass."""

    def __init__(
        self,
        cfg: Config,
        *,
        watches: Watches,
        planning: Planning,
        writer: Writer,
        executor: Executor,
    ) -> None:
        self.cfg = cfg
        self.watches = watches
        self.planning = planning
        self.writer = writer
        self.executor = executor

    async def follow(self, now: float) -> None:
        """After a reload: instances of removed models, and of models whose launch config
        changed, are stopped or retired (drained, then stopped); a changed model gets a
        current instance beside its stale one first (pure `reload.plan`)."""
        w = self.watches
        live = [r for r in w.instances.values() if r.host not in w.lost]
        todo = reload_plan(self.cfg.models, live)
        for iid, why in todo.stop:
            if (rec := w.instances.get(iid)) is not None:
                await self.writer.stop(rec, why)
        for iid, why in todo.retire:
            if (rec := w.instances.get(iid)) is not None:
                log.info("retiring %s: %s", iid, why)
                await self.writer.write(
                    rec, state=InstanceState.DRAINING, drain_for="", drain_since=now, reason=why
                )
        for model in todo.replace:
            await self._replace(model, now)
        # Retiring ones (a reload's stale instance, a replica above replicas.min gone idle)
        # stop once drained (pure `plan.plan_retire`).
        await self.executor.execute(plan_retire(self.planning.view(), now), now)

    async def _replace(self, model: str, now: float) -> None:
        """Place a current instance of `model` beside its stale one, which serves until the
        new one is READY. Without room beside it, the stale one drains and stops first:
        requests then wait (queued, within their deadline) for the one their demand places."""
        if self.planning.recent_failure(model, now) is not None:
            return  # the replacement failed (bad new args?): the stale one serves; retry later
        need = self.planning.need(model, self.cfg.models[model], host=None)
        decision = self.planning.place(need, now)
        if isinstance(decision, Placed) and not decision.evict:
            log.info("replacing %s: its config changed; a new instance first", model)
            await self.executor.create(model, need, decision, now)
            return
        why = f"{model}'s config changed (reload); no room for a new instance beside it"
        for rec in self.watches.live(model):
            if rec.state == InstanceState.READY:
                await self.writer.write(
                    rec, state=InstanceState.DRAINING, drain_for="", drain_since=now, reason=why
                )
