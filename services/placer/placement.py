"""Where a model instance runs: pure decisions over a cluster view (no I/O, no logging).

`place` narrows the hosts step by step; every step that removes candidates writes a sentence,
and when nothing is left those sentences are the answer the user sees (NoFit.reason). The
chain: drop lost hosts -> apply pins -> one GPU that fits -> several GPUs of one host ->
a CPU-only host -> the same again after stopping least-recently-used idle instances.

Free GPU memory = total - max(live used, our claims + memory of processes that are not ours).
Claims (InstanceRecord.memory_mib of our live instances) cover instances NVML cannot see yet
(pending, downloading, starting); live usage covers everything else on the card. Allocating
from claims alone is GPUStack's known failure (its issues 1965 and 1047).

The steps live beside it: `placement_room` (free room per GPU and host), `placement_options`
(one GPU, split, CPU, and their ranking), `placement_eviction` (who may be stopped, least
recently used first) and `placement_sentences` (the reasons and NoFit sentences).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from msgspec.structs import replace as replace_struct

from proto.messages import HostRecord, InstanceActivity, InstanceRecord
from services.placer.memory import GPU_OVERHEAD_MIB
from services.placer.placement_eviction import _best_with_eviction, _evictables, _most_freeable
from services.placer.placement_options import _best_without_eviction, _copies, _Option
from services.placer.placement_room import _build_view
from services.placer.placement_sentences import (
    _fail,
    _names,
    _no_eviction,
    _no_room,
    _placed_reason,
)

__all__ = [
    "Need",
    "NoFit",
    "Placed",
    "STRATEGIES",
    "at_rest",
    "lost_hosts",
    "place",
]


STRATEGIES = ("binpack", "spread")
ALL_LAYERS = 999  # -ngl value that puts every layer on the GPU(s)


@dataclass(frozen=True)
class Need:
    model: str
    memory_mib: int  # on a GPU: estimate or ModelConfig.memory_mib override
    n_layers: int = 0
    pin_host: str | None = None
    pin_gpus: tuple[int, ...] = ()
    file_hosts: frozenset[str] = frozenset()  # hosts whose store already holds the file
    cpu_memory_mib: int = 0  # on a CPU-only host, without the GPU overhead; 0 = memory_mib
    # GPU name -> MiB on that kind of GPU, where agents measured more than memory_mib
    gpu_memory_mib: Mapping[str, int] = field(default_factory=dict)

    @property
    def ram_mib(self) -> int:
        return self.cpu_memory_mib or self.memory_mib


@dataclass(frozen=True)
class Placed:
    host: str
    gpus: tuple[int, ...]  # GPU indexes on host; () = CPU (n_gpu_layers 0)
    n_gpu_layers: int  # 999 for all layers on GPU, 0 for CPU
    memory_mib: int
    reason: str  # sentence for users: why this host/GPU
    evict: tuple[str, ...] = ()  # instance ids to stop first (LRU idle ones)
    drain: tuple[str, ...] = ()  # of `evict`, the busy ones that must drain first (a swap)


@dataclass(frozen=True)
class NoFit:
    reason: str
    busy: int = 0  # instances that could make room once their requests finish


# ---------------------------------------------------------------- the decisions


def lost_hosts(
    hosts: Sequence[HostRecord],
    now: float,
    host_lost_after: float,
    heard: Mapping[str, float] | None = None,
) -> list[str]:
    """Hosts whose last heartbeat is older than `host_lost_after` seconds.

    `heard`, where given, says when the placer received each host's last heartbeat, on the
    placer's own clock (as `now` is): a host whose clock is off is then not lost for it.
    Without it, the heartbeat's own `ts` is used (the host's clock)."""
    if heard is None:
        return [h.host_id for h in hosts if now - h.ts > host_lost_after]
    return [h.host_id for h in hosts if now - heard.get(h.host_id, now) > host_lost_after]


def _pin_host(
    alive: list[HostRecord], hosts: Sequence[HostRecord], need: Need
) -> tuple[list[HostRecord], str | None]:
    if need.pin_host is None:
        return alive, None
    kept = [h for h in alive if h.host_id == need.pin_host]
    if kept:
        others = len(alive) - 1
        return kept, (
            f"{others} of {len(hosts)} hosts excluded: model is pinned to {need.pin_host}"
            if others
            else None
        )
    known = any(h.host_id == need.pin_host for h in hosts)
    state = "has no heartbeat" if known else "is not a known host"
    return [], f"model is pinned to host {need.pin_host}, which {state}"


def place(
    hosts: Sequence[HostRecord],
    instances: Sequence[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    need: Need,
    *,
    now: float,
    strategy: str = "binpack",
    host_lost_after: float = 10.0,
    ram_reserve_mib: int = 1024,
    keep_loaded: frozenset[str] = frozenset(),
    split_overhead_mib: int = GPU_OVERHEAD_MIB,
    heard: Mapping[str, float] | None = None,
    may_drain: Mapping[str, float] | None = None,
    unsettled: frozenset[str] = frozenset(),
    may_evict: bool = True,
) -> Placed | NoFit:
    """Choose a host and GPUs for one new instance of `need.model`, or say why none fits.

    `may_drain` (instance id -> rank, lower first) lists busy instances that may yield
    their memory (see turns.may_yield); a decision that needs them says so in `drain`.
    `unsettled` instances (ready, but not yet seen so by every gateway) are never stopped
    for another model: the requests that waited for them may not be counted yet, and
    swapping them out at once would thrash.
    Another copy of `need.model` is never evicted for it. A new copy goes apart from the
    live ones: another host first, then another GPU of the same host, the same GPU (or CPU)
    only if nothing else fits. `may_evict=False` (a replica) takes free room only."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r} (use one of {STRATEGIES})")
    if not hosts:
        return NoFit("no hosts have joined yet: start an agent")
    notes: list[str] = []
    lost = lost_hosts(hosts, now, host_lost_after, heard)
    if lost:
        notes.append(
            f"{len(lost)} of {len(hosts)} hosts excluded: no heartbeat for over"
            f" {host_lost_after:g} s ({_names(lost)})"
        )
    alive = [h for h in hosts if h.host_id not in set(lost)]
    candidates, pin_note = _pin_host(alive, hosts, need)
    if pin_note:
        notes.append(pin_note)
    if not candidates:
        return NoFit(_fail(need, notes))
    views = _build_view(candidates, instances, need, ram_reserve_mib)
    if need.pin_gpus:  # a model pinned to GPUs never runs on a CPU-only host
        for v in views:
            v.ram_free = None

    copies = _copies(instances, need.model)
    best = _best_without_eviction(views, need, strategy, split_overhead_mib, copies)
    if best is None and not may_evict:
        room = _no_room(views, need, len(hosts), split_overhead_mib)
        return NoFit(_fail(need, notes + room + ["nothing is stopped to make room for it"]))
    if best is None:
        here = {v.host_id for v in views}
        by_host, busy, kept = _evictables(
            instances,
            activity,
            need,
            keep_loaded,
            here,
            may_drain or {},
            unsettled,
        )
        best = _best_with_eviction(views, by_host, need, strategy, split_overhead_mib, copies)
        if best is None:
            room = _no_room(views, need, len(hosts), split_overhead_mib)
            reach = _most_freeable(views, by_host)
            more = _no_eviction(busy, kept, reach, bool(by_host))
            return NoFit(_fail(need, notes + room + [more]), busy=busy)
    return Placed(
        host=best.host,
        gpus=best.gpus,
        n_gpu_layers=0 if best.kind == "cpu" else ALL_LAYERS,
        memory_mib=best.memory_mib,
        reason=_placed_reason(best, need, strategy, notes, copies),
        evict=best.evict,
        drain=_drains(best, instances, activity),
    )


def _drains(
    o: _Option, instances: Sequence[InstanceRecord], activity: Mapping[str, InstanceActivity]
) -> tuple[str, ...]:
    if not o.drains:
        return ()
    busy = {
        i.instance_id
        for i in instances
        if (a := activity.get(i.instance_id)) is not None and a.in_flight > 0
    }
    return tuple(iid for iid in o.evict if iid in busy)


def at_rest(hosts: Sequence[HostRecord]) -> list[HostRecord]:
    """The hosts as they would be with none of our instances running: GPUs hold only other
    processes' memory, CPU hosts all their RAM. `place` over this view (with only the
    instances that never yield) tells whether a model can ever fit, however turns go."""
    out = []
    for h in hosts:
        gpus = [
            replace_struct(g, memory_used_mib=sum(p.used_mib for p in g.processes if not p.ours))
            for g in h.gpus
        ]
        out.append(replace_struct(h, gpus=gpus, ram_free_mib=h.ram_total_mib))
    return out
