"""What the pure planner reads (no I/O): `View`, the placer's knowledge at one moment (KV
views, gateway reports, the config knobs as `Limits`, the per-key timing), and the activity
a placement or idle stop counts (`placement_activity`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proto.messages import (
    LIVE_STATES,
    ActivityReport,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.activity import ACTIVITY_STALE_S, merge_activity
from services.placer.backoff import Key, Try
from services.placer.placement_index import PlacementIndex
from services.placer.turns import Waiting

__all__ = ["DEMAND_FRESH_S", "Limits", "View", "placement_activity"]


DEMAND_FRESH_S = 5.0  # a demand event counts this long (gateways resend every 2 s)


@dataclass(frozen=True)
class Limits:
    """The config knobs the planner reads (lls/config.py)."""

    host_lost_after: float = 10.0
    failure_backoff: float = 30.0
    drain_timeout: float = 60.0
    request_timeout: float = 600.0  # a retiring instance's requests get this long
    idle_timeout: float = 300.0  # the global one; 0 = never
    idle_timeouts: Mapping[str, float] = field(default_factory=dict)  # per model, where set
    download_timeout: float = 3600.0  # downloader.timeout
    models: frozenset[str] = frozenset()  # configured models
    groups: Mapping[str, str] = field(default_factory=dict)  # model -> exclusive group
    keep_loaded: frozenset[str] = frozenset()  # the config's keep_loaded models
    strategy: str = "binpack"  # placer.strategy
    min_turn: float = 5.0  # placer.min_turn
    max_turn: float = 30.0  # placer.max_turn
    ram_reserve_mib: int = 1024  # agent.ram_reserve_mib


def _frozen(m: Mapping) -> Mapping:  # type: ignore[type-arg]
    return m if isinstance(m, MappingProxyType) else MappingProxyType(m)


@dataclass(frozen=True)
class View:
    """What the placer knows at one moment: the KV views, the gateways' reports, the config
    and the per-key timing. Mappings are read-only proxies (and `reports` a values view)
    over the service's own dicts, where copying them would cost each step O(instances):
    planning is synchronous (no await),
    so nothing changes them while the planner reads, and the executor checks each action's
    record against its revision at planning time before acting on it."""

    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)
    hosts: Mapping[str, HostRecord] = field(default_factory=dict)
    heard: Mapping[str, float] = field(default_factory=dict)  # host -> received, our clock
    lost: frozenset[str] = frozenset()  # hosts found lost by the last plan_hosts
    reports: Collection[ActivityReport] = ()  # every gateway's last report, stale ones too
    queues: Mapping[str, Waiting] = field(default_factory=dict)  # model -> what waits (fresh)
    last_demand: Mapping[str, float] = field(default_factory=dict)  # model -> last demand
    limits: Limits = field(default_factory=Limits)
    holds: Mapping[Key, Try] = field(default_factory=dict)  # Backoff.view()
    started: float = 0.0  # when this placer started
    pinned: frozenset[str] = frozenset()  # models pinned in KV desired (`lls load --pin`)
    epoch: int = 0  # this leader's lease epoch
    download_epochs: Mapping[str, int] = field(default_factory=dict)  # DOWNLOADING -> sent in
    # READY instances some live gateway has not reported on since it saw them ready (its
    # waiting requests may be about to start there): never evicted without a drain
    unsettled: frozenset[str] = frozenset()
    # The same instances and hosts, indexed (the service keeps it): placements, and the
    # lookups by model, read it instead of scanning every instance and GPU
    index: PlacementIndex | None = None

    def __post_init__(self) -> None:
        names = ("instances", "hosts", "heard", "queues", "last_demand", "holds", "download_epochs")
        for name in names:
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def activity(self, now: float) -> dict[str, InstanceActivity]:
        return merge_activity(self.reports, now - ACTIVITY_STALE_S)

    def activity_known(self, now: float) -> bool:
        """Whether the reports tell what is in use: some are fresh, or there are none. All
        gone stale means the bus was away, not that nothing is used."""
        return not self.reports or any(r.ts >= now - ACTIVITY_STALE_S for r in self.reports)

    def live(self, model: str) -> list[InstanceRecord]:
        return [
            r for r in self.of_model(model) if r.state in LIVE_STATES and r.host not in self.lost
        ]

    def of_model(self, model: str) -> list[InstanceRecord]:
        """The model's instance records, in the view's order."""
        if self.index is not None:
            return self.index.of_model(model)
        return [r for r in self.instances.values() if r.model == model]

    def draining_for(self, model: str) -> list[InstanceRecord]:
        """Instances DRAINING to make room for `model`, in the view's order."""
        if self.index is not None:
            return self.index.draining_for(model)
        return [
            r
            for r in self.instances.values()
            if r.state == InstanceState.DRAINING and r.drain_for == model
        ]

    def fresh(self, now: float) -> list[ActivityReport]:
        """The gateways' reports that count at `now`, in the view's order."""
        return [r for r in self.reports if r.ts >= now - ACTIVITY_STALE_S]

    def indexed(self, now: float) -> PlacementIndex | None:
        """The index, brought up to the reports that count at `now` and the config."""
        if self.index is not None:
            self.index.sync(
                self.fresh(now),
                keep_loaded=self.keep_loaded(),
                ram_reserve_mib=self.limits.ram_reserve_mib,
            )
        return self.index

    def held(self, kind: str, key: str, now: float) -> bool:
        t = self.holds.get((kind, key))
        return t is not None and now < t.until

    def keep_loaded(self) -> frozenset[str]:
        """Never evicted: the config's keep_loaded models and the pinned ones."""
        return self.limits.keep_loaded | self.pinned


def placement_activity(view: View, now: float) -> dict[str, InstanceActivity]:
    """The gateways' activity, where a READY instance of a model with requests queued
    counts busy even between two of them."""
    activity = view.activity(now)
    if view.queues:
        for r in view.instances.values():
            if r.state == InstanceState.READY and r.model in view.queues:
                act = activity.get(r.instance_id)
                if act is None or act.in_flight == 0:
                    activity[r.instance_id] = InstanceActivity(1, now)
    return activity
