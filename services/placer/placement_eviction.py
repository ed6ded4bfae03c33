"""Eviction (pure): which instances may be stopped to make room, spare copies and the least
recently used first, busy ones only where they may yield (a drain, last); and the options
that stopping them opens: one GPU, a split, a CPU-only host."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from proto.messages import InstanceActivity, InstanceRecord, InstanceState
from services.placer.placement_options import Copies, SortKey, _Option, _rank, _split_option
from services.placer.placement_room import _HostView

if TYPE_CHECKING:
    from services.placer.placement import Need


def _last_use(inst: InstanceRecord, act: InstanceActivity | None) -> float:
    since = inst.ready_at if inst.ready_at is not None else inst.updated
    return max(since, act.last_used) if act is not None else since


# (last use, instance id, record): sorts least recently used first, ties by id
Victim = tuple[float, str, InstanceRecord]
_SERVING = (InstanceState.READY, InstanceState.DRAINING)


DRAIN_ORDER = 1e12  # sorts after every idle victim's last-use time: drains come last
SPARE_FIRST = 1e12  # subtracted from a spare copy's last use: it goes before any last copy


def spare_copies(
    instances: Iterable[InstanceRecord], activity: Mapping[str, InstanceActivity]
) -> frozenset[str]:
    """READY instances whose model has another READY instance used more recently (ties: the
    lower id stays). Stopping one costs its model throughput, not a cold start, so spares
    are evicted, and yield, before any model's last instance."""
    keeper: dict[str, tuple[float, str]] = {}  # model -> (-last use, id) of the one kept
    ready = [i for i in instances if i.state == InstanceState.READY]
    for inst in ready:
        k = (-_last_use(inst, activity.get(inst.instance_id)), inst.instance_id)
        if inst.model not in keeper or k < keeper[inst.model]:
            keeper[inst.model] = k
    return frozenset(i.instance_id for i in ready if keeper[i.model][1] != i.instance_id)


def _evictables(
    instances: Sequence[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    need: Need,
    keep_loaded: frozenset[str],
    hosts: set[str],
    may_drain: Mapping[str, float],
    unsettled: Container[str],
    spares: Container[str] | None = None,
) -> tuple[dict[str, list[Victim]], int, int]:
    """Victims per host in `hosts`: idle READY (or drained) instances, spare copies of a
    model first, least recently used first; then busy ones allowed to drain in their
    `may_drain` rank; (busy, kept) counts what stays out. `spares` (default: from
    `instances`) lets a caller that passes only some hosts' instances say which are spare."""
    by_host: dict[str, list[Victim]] = defaultdict(list)
    busy = kept = 0
    if spares is None:
        spares = spare_copies(instances, activity)
    for inst in instances:
        if inst.state not in _SERVING or inst.host not in hosts or inst.model == need.model:
            continue
        if inst.state == InstanceState.DRAINING and inst.drain_for != need.model:
            busy += 1  # its room is promised to the model it yields to
            continue
        if inst.state == InstanceState.READY and inst.instance_id in unsettled:
            busy += 1  # just ready: the requests that waited for it may not show yet
            continue
        act = activity.get(inst.instance_id)
        if act is not None and act.in_flight > 0:
            if inst.instance_id in may_drain:
                order = DRAIN_ORDER + may_drain[inst.instance_id]
                by_host[inst.host].append((order, inst.instance_id, inst))
            else:
                busy += 1
        elif inst.model in keep_loaded:
            kept += 1
        else:
            order = _last_use(inst, act) - (SPARE_FIRST if inst.instance_id in spares else 0.0)
            by_host[inst.host].append((order, inst.instance_id, inst))
    for lst in by_host.values():
        lst.sort(key=lambda v: v[:2])
    return by_host, busy, kept


def _lru_until(
    free: float, needed: float, victims: list[tuple[Victim, float]]
) -> tuple[tuple[Victim, ...], float] | None:
    """The shortest LRU prefix of (victim, MiB it frees here) that makes `needed` fit."""
    if free + sum(m for _, m in victims) < needed:
        return None
    freed = 0.0
    for n, (_, mib) in enumerate(victims, 1):
        freed += mib
        if free + freed >= needed:
            return tuple(v for v, _ in victims[:n]), freed
    return None


def _evicting(o: _Option, chosen: Sequence[Victim], freed: float) -> _Option:
    ids = tuple(v[1] for v in chosen)
    drains = sum(1 for v in chosen if v[0] >= DRAIN_ORDER)
    newest = max(v[0] for v in chosen)
    return replace(o, evict=ids, freed_mib=int(freed), newest_evicted=newest, drains=drains)


def _evict_one_gpu(v: _HostView, victims: list[Victim], need: Need) -> list[_Option]:
    """Per GPU: stop only instances that sit on it, least recently used first. Of this
    host's GPUs, only those stopping the fewest and stalest instances are returned."""
    on_gpu: dict[int, list[tuple[Victim, float]]] = defaultdict(list)
    for x in victims:  # victims are in LRU order, so each per-GPU list is too
        for g in x[2].gpus:
            on_gpu[g].append((x, x[2].memory_mib / len(x[2].gpus)))
    hits = []
    for g, here in on_gpu.items():
        free = v.gpu_free.get(g)
        needed = need.memory_mib + v.gpu_extra.get(g, 0)
        if free is not None and (hit := _lru_until(free, needed, here)):
            chosen, freed = hit
            hits.append((len(chosen), max(c[0] for c in chosen), g, free, chosen, freed))
    if not hits:
        return []
    least = min(h[:2] for h in hits)
    return [
        _evicting(
            _Option(v.host_id, (g,), need.memory_mib + v.gpu_extra.get(g, 0), free, "gpu"),
            chosen,
            freed,
        )
        for n, newest, g, free, chosen, freed in hits
        if (n, newest) == least
    ]


def _evict_split(v: _HostView, victims: list[Victim], need: Need, overhead: int) -> _Option | None:
    """Stop GPU instances on this host in LRU order until a split fits."""
    gpu_free = dict(v.gpu_free)
    chosen: list[Victim] = []
    for x in victims:
        inst = x[2]
        if not inst.gpus:
            continue
        for g in inst.gpus:
            if g in gpu_free:
                gpu_free[g] += int(inst.memory_mib / len(inst.gpus))
        chosen.append(x)
        o = _split_option(
            _HostView(v.host_id, v.has_file, gpu_free, gpu_extra=v.gpu_extra), need, overhead
        )
        if o is not None:
            return _evicting(o, chosen, sum(c[2].memory_mib for c in chosen))
    return None


def _evict_cpu(v: _HostView, victims: list[Victim], need: Need) -> _Option | None:
    if v.ram_free is None:
        return None
    hit = _lru_until(
        v.ram_free, need.ram_mib, [(x, x[2].memory_mib) for x in victims if not x[2].gpus]
    )
    if hit is None:
        return None
    return _evicting(_Option(v.host_id, (), need.ram_mib, v.ram_free, "cpu"), *hit)


def _best_with_eviction(
    views: list[_HostView],
    by_host: dict[str, list[Victim]],
    need: Need,
    strategy: str,
    overhead: int,
    copies: Copies,
) -> _Option | None:
    """Same preference as without eviction (one GPU, split, CPU); within a kind: fewest
    stopped, then the stalest ones, then the usual ranking."""
    base = _rank(strategy, need.file_hosts, copies)

    def key(o: _Option) -> SortKey:
        return (o.drains, len(o.evict), o.newest_evicted, base(o))

    hosts = [(v, by_host[v.host_id]) for v in views if by_host.get(v.host_id)]
    single = [o for v, vs in hosts for o in _evict_one_gpu(v, vs, need)]
    if single:
        return min(single, key=key)
    split = [
        o for v, vs in hosts if len(v.gpu_free) > 1 and (o := _evict_split(v, vs, need, overhead))
    ]
    if split:
        return min(split, key=key)
    cpu = [o for v, vs in hosts if (o := _evict_cpu(v, vs, need))]
    return min(cpu, key=key) if cpu else None


def _most_freeable(views: list[_HostView], by_host: dict[str, list[Victim]]) -> float:
    """The most memory stopping idle instances could add to free on one GPU or one CPU host."""
    best = 0.0
    for v in views:
        victims = by_host.get(v.host_id, [])
        for g, free in v.gpu_free.items():
            gain = sum(x[2].memory_mib / len(x[2].gpus) for x in victims if g in x[2].gpus)
            best = max(best, free + gain if gain else 0)
        if v.ram_free is not None:
            gain = sum(x[2].memory_mib for x in victims if not x[2].gpus)
            best = max(best, v.ram_free + gain if gain else 0)
    return best
