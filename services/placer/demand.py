"""The demand step of a pass: for each model with requests waiting or demand lately (oldest
waiting first), the pure gates (`plan_demand.demand_gate`), the header wait for a model of
unknown size (an InspectModel to a downloader), then the pure decision
(`plan_demand.plan_demand`: the exclusive group makes way, refuse, wait, a swap, or a new
instance), carried out by the executor."""

from __future__ import annotations

import logging

import proto
from lls.config import Config, ModelConfig, store_filename_of

from .actions import Refuse
from .backoff import HEADER_WAIT, INSPECT, Backoff
from .executor import Executor
from .plan_demand import demand_gate, plan_demand
from .plan_view import View
from .planning import Planning
from .turns import Waiting
from .watches import Watches
from .writes import Writer

log = logging.getLogger(__name__)

INSPECT_WAIT_S = 10.0  # demand for a model of unknown size waits this long for its header
INSPECT_RETRY_S = 300.0  # a header that never came is asked for again after this


class Demand:
    """Demand for one model at a time, decided by the pure planner."""

    def __init__(
        self,
        cfg: Config,
        *,
        backoff: Backoff,
        watches: Watches,
        planning: Planning,
        writer: Writer,
        executor: Executor,
    ) -> None:
        self.cfg = cfg
        self.backoff = backoff
        self.watches = watches
        self.planning = planning
        self.writer = writer
        self.executor = executor

    def release_header_waits(self, now: float) -> None:
        """Models whose header came, or waited INSPECT_WAIT_S for it: demanded again now."""
        for model in self.backoff.keys(HEADER_WAIT):
            held = self.backoff.since(HEADER_WAIT, model, now)
            if self.watches.header(model) is not None or now - held >= INSPECT_WAIT_S:
                self.backoff.clear(HEADER_WAIT, model)
                self.watches.demanded.setdefault(model, now)

    async def decide(
        self, model: str, now: float, queues: dict[str, Waiting], view: View | None = None
    ) -> None:
        # The gates before a placement are pure (`plan_demand.demand_gate`): unconfigured,
        # live, a swap under way, failed lately, no host yet.
        gate = demand_gate(view if view is not None else self.planning.view(queues), model, now)
        if gate is not None:
            await self.executor.execute([gate], now)
            return
        mcfg = self.cfg.models[model]
        need = self.planning.need(model, mcfg, host=None)
        if not need.memory_mib and await self._wait_for_header(model, mcfg, now):
            return  # the next passes place it once the header is in, or after INSPECT_WAIT_S
        # The rest is pure (`plan_demand.plan_demand`): the exclusive group makes way, then
        # the placement -> refused as never fitting, a swap (drain), a new instance, or a wait.
        actions = plan_demand(self.planning.view(queues, now), model, need, now)
        for act in actions:
            if isinstance(act, Refuse):
                log.info("refusing %s: %s", model, act.reason)
        await self.executor.execute(actions, now)

    async def _wait_for_header(self, model: str, mcfg: ModelConfig, now: float) -> bool:
        """Whether demand for a model of unknown size waits for a downloader to read its
        header, so that it is placed by its real memory need rather than downloaded to
        wherever the most memory is free and checked afterwards."""
        info = self.watches.header(model)
        if info is not None and (info.gguf is not None or now - info.ts < INSPECT_RETRY_S):
            return False  # read, or failed lately: decide with what is known
        if self.backoff.get(HEADER_WAIT, model) is not None:
            return True
        if self.backoff.holding(INSPECT, model, now):
            return False  # asked lately and no answer came in time: go on without it
        self.backoff.note(INSPECT, model, now, wait=INSPECT_RETRY_S)
        self.backoff.note(HEADER_WAIT, model, now)
        await self.writer.command(
            proto.cmd_inspect(),
            proto.InspectModel(
                cmd_id=f"inspect-{proto.kv_key(model)}-{int(now)}",
                model=model,
                url=mcfg.url,
                filename=store_filename_of(model, mcfg),
            ),
        )
        return True
