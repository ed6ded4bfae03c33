"""Asking the pure planner: the `View` built from the watches, a model's `Need` (from the
file and header views and what agents measured), and placements over the current views.
Every step of a pass goes through here, so each decides from what the one before it wrote.
"""

from __future__ import annotations

from lls.config import Config, ModelConfig, store_filename_of
from proto import InstanceRecord

from .backoff import Backoff
from .desired import pinned
from .lease import Lease
from .memory import CPU_OVERHEAD_MIB, GPU_OVERHEAD_MIB, estimate_mib, gpu_needs
from .placement import Need, NoFit, Placed
from .plan_demand import place_at_rest, place_in, recent_failure
from .plan_view import Limits, View
from .turns import Waiting
from .watches import Watches


def limits_of(cfg: Config) -> Limits:
    """The knobs the planner reads, from the config."""
    return Limits(
        host_lost_after=cfg.placer.host_lost_after,
        failure_backoff=cfg.placer.failure_backoff,
        drain_timeout=cfg.placer.drain_timeout,
        request_timeout=cfg.gateway.request_timeout,
        idle_timeout=cfg.idle_timeout,
        download_timeout=cfg.downloader.timeout,
        idle_timeouts={
            n: m.idle_timeout for n, m in cfg.models.items() if m.idle_timeout is not None
        },
        models=frozenset(cfg.models),
        groups={n: m.group for n, m in cfg.models.items() if m.group},
        keep_loaded=frozenset(n for n, m in cfg.models.items() if m.keep_loaded),
        strategy=cfg.placer.strategy,
        min_turn=cfg.placer.min_turn,
        max_turn=max(cfg.placer.max_turn, cfg.placer.min_turn),
        ram_reserve_mib=cfg.agent.ram_reserve_mib,
    )


class Planning:
    """What the planner is asked with, built from the watches right before each step."""

    def __init__(
        self,
        cfg: Config,
        watches: Watches,
        *,
        backoff: Backoff,
        lease: Lease,
        started: float,
    ) -> None:
        self.cfg = cfg
        self.watches = watches
        self.backoff = backoff
        self.lease = lease
        self.started = started
        # The Limits of the config sections they were built from (rebuilt after a reload)
        self._limits_of: tuple[object, ...] = ()
        self._limits_built = Limits()

    def limits(self) -> Limits:
        """The knobs the planner reads, built once per config (re)load: a reload swaps the
        config's sections (lls.service.apply_live), and only then is this built again."""
        cfg = self.cfg
        of = (cfg.models, cfg.placer, cfg.gateway, cfg.downloader, cfg.agent, cfg.idle_timeout)
        old = self._limits_of
        if len(old) == len(of) and all(a is b for a, b in zip(old[:-1], of[:-1], strict=True)):
            if old[-1] == of[-1]:
                return self._limits_built
        self._limits_of = of
        self._limits_built = limits_of(cfg)
        return self._limits_built

    def view(self, queues: dict[str, Waiting] | None = None, now: float | None = None) -> View:
        """What the planner decides from: the current views, read-only. Built right before
        each step, so a step sees what the one before it wrote. With `now`, also which READY
        instances are unsettled (only placements read that)."""
        w = self.watches
        return View(
            instances=w.instances,
            hosts=w.hosts,
            heard=w.heard(),
            lost=frozenset(w.lost),
            reports=w.activity.values(),
            # What waits at the gateways, as of their last reports: every decision that could
            # stop an instance must see it (a model with requests queued is never idle).
            queues=queues if queues is not None else w.queues(),
            last_demand=w.last_demand,
            limits=self.limits(),
            holds=self.backoff.view(),
            started=self.started,
            pinned=pinned(w.desired),
            epoch=self.lease.epoch,
            download_epochs=w.download_epoch,
            unsettled=w.unsettled(now) if now is not None else frozenset(),
            index=w.placement_index,
        )

    def need(self, model: str, mcfg: ModelConfig, host: str | None) -> Need:
        """What one instance of `model` needs: the config's `memory_mib`, else the estimate
        from the file's header (on a host, or read from its source), raised per GPU kind to
        what agents measured."""
        filename = store_filename_of(model, mcfg)
        index = self.watches.placement_index
        # (hosts whose heartbeat lists the file, from the index: not a scan of every store)
        file_hosts = frozenset(index.file_hosts(filename))
        memory = mcfg.memory_mib or 0
        cpu_memory = 0  # a CPU process has no GPU overhead; 0: the same as on a GPU
        n_layers = 0
        if not memory:
            info = index.file_info(filename, host)
            header = self.watches.header(model) if info is None else None
            if info is not None and info.gguf is not None:
                memory = estimate_mib(info.gguf, info.size, mcfg.ctx_size).total_mib
                cpu_memory = estimate_mib(
                    info.gguf, info.size, mcfg.ctx_size, n_gpu_layers=0
                ).total_mib
                n_layers = info.gguf.n_layers
            elif info is not None:
                memory = info.size // (1 << 20) + GPU_OVERHEAD_MIB
                cpu_memory = info.size // (1 << 20) + CPU_OVERHEAD_MIB
            elif header is not None and header.gguf is not None:
                if header.gguf.tensor_bytes or header.size:  # else the weights are unknown
                    size = header.size or 0
                    memory = estimate_mib(header.gguf, size, mcfg.ctx_size).total_mib
                    cpu_memory = estimate_mib(
                        header.gguf, size, mcfg.ctx_size, n_gpu_layers=0
                    ).total_mib
                    n_layers = header.gguf.n_layers
        return Need(
            model=model,
            memory_mib=memory,
            n_layers=n_layers,
            pin_host=host or mcfg.host,
            pin_gpus=tuple(mcfg.gpus),
            file_hosts=file_hosts,
            cpu_memory_mib=cpu_memory,
            # what agents measured, per GPU kind, where above the estimate (not over an override)
            gpu_memory_mib=gpu_needs(memory, self.watches.measured, model, mcfg.ctx_size)
            if memory and not mcfg.memory_mib
            else {},
        )

    def place(
        self,
        need: Need,
        now: float,
        *,
        exclude: str | None = None,
        queues: dict[str, Waiting] | None = None,
        may_evict: bool = True,
    ) -> Placed | NoFit:
        """The pure placement (`plan_demand.place_in`) over the current views."""
        return place_in(self.view(queues, now), need, now, exclude=exclude, may_evict=may_evict)

    def place_at_rest(self, need: Need, now: float) -> Placed | NoFit:
        """Where `need` goes once every model that may yield has stopped."""
        return place_at_rest(self.view(), need, now)

    def recent_failure(self, model: str, now: float) -> InstanceRecord | None:
        return recent_failure(
            self.watches.instances.values(), model, now, self.cfg.placer.failure_backoff
        )
