"""Where a model instance runs: pure decisions over a cluster view (no I/O, no logging).

`place` narrows the hosts step by step; every step that removes candidates writes a sentence,
and when nothing is left those sentences are the answer the user sees (NoFit.reason). The
chain: drop lost hosts -> apply pins -> one GPU that fits -> several GPUs of one host ->
a CPU-only host -> the same again after stopping least-recently-used idle instances.

Free GPU memory = total - max(live used, our claims + memory of processes that are not ours).
Claims (InstanceRecord.memory_mib of our live instances) cover instances NVML cannot see yet
(pending, downloading, starting); live usage covers everything else on the card. Allocating
from claims alone is GPUStack's known failure (its issues 1965 and 1047).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from msgspec.structs import replace as replace_struct

from proto.messages import (
    LIVE_STATES,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.memory import GPU_OVERHEAD_MIB, gib

__all__ = [
    "Need",
    "NoFit",
    "Placed",
    "STRATEGIES",
    "at_rest",
    "idle_to_stop",
    "lost_hosts",
    "place",
    "spare_copies",
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


# ---------------------------------------------------------------- the cluster view


@dataclass
class _HostView:
    host_id: str
    has_file: bool
    gpu_free: dict[int, int] = field(default_factory=dict)  # GPU index -> free MiB
    # GPU index -> MiB the model needs there beyond need.memory_mib (measured on that kind)
    gpu_extra: dict[int, int] = field(default_factory=dict)
    ram_free: int | None = None  # CPU-only hosts: RAM free after reserve and claims


@dataclass(frozen=True)
class _Option:
    host: str
    gpus: tuple[int, ...]
    memory_mib: int  # total for the instance (split adds a per-GPU overhead)
    free_mib: int  # free on the tightest chosen device before placing
    kind: str  # "gpu" | "split" | "cpu"
    evict: tuple[str, ...] = ()
    freed_mib: int = 0
    newest_evicted: float = 0.0  # last use of the most recently used evicted instance
    drains: int = 0  # how many of `evict` are busy and must drain first


def _claims(
    instances: Iterable[InstanceRecord],
) -> tuple[dict[tuple[str, int], float], dict[str, float]]:
    """MiB claimed by our live instances, per (host, GPU) and per host for CPU ones."""
    gpu: dict[tuple[str, int], float] = defaultdict(float)
    ram: dict[str, float] = defaultdict(float)
    for inst in instances:
        if inst.state not in LIVE_STATES or inst.host is None:
            continue
        if inst.gpus:
            share = inst.memory_mib / len(inst.gpus)  # a split instance spreads evenly
            for g in inst.gpus:
                gpu[(inst.host, g)] += share
        else:
            ram[inst.host] += inst.memory_mib
    return gpu, ram


def _gone_since_heartbeat(
    hosts: Sequence[HostRecord], instances: Iterable[InstanceRecord]
) -> tuple[dict[tuple[str, int], float], dict[str, float]]:
    """MiB that a host's last heartbeat still counted as used, held by instances its agent
    has since reported stopped: a swap need not wait a heartbeat to see the room."""
    beat = {h.host_id: h for h in hosts}
    gpu: dict[tuple[str, int], float] = defaultdict(float)
    ram: dict[str, float] = defaultdict(float)
    for inst in instances:
        h = beat.get(inst.host or "")
        if (
            h is None
            or inst.state not in (InstanceState.STOPPED, InstanceState.FAILED)
            or inst.updated <= h.ts
            or inst.instance_id not in h.instances
        ):
            continue
        if inst.gpus:
            for g in inst.gpus:
                gpu[(h.host_id, g)] += inst.memory_mib / len(inst.gpus)
        else:
            ram[h.host_id] += inst.memory_mib
    return gpu, ram


def host_room(
    h: HostRecord,
    instances: Iterable[InstanceRecord],
    ram_reserve_mib: int,
) -> tuple[dict[int, int], int | None]:
    """Free MiB per GPU index of `h`, and free RAM if it is CPU-only (None otherwise), from
    its heartbeat and those of `instances` that are on it (in the view's order: the claims
    of split instances are float shares, summed in that order)."""
    gpu_claims, ram_claims = _claims(instances)
    gone_gpu, gone_ram = _gone_since_heartbeat([h], instances)
    return _room(h, gpu_claims, ram_claims, gone_gpu, gone_ram, ram_reserve_mib)


def _room(
    h: HostRecord,
    gpu_claims: Mapping[tuple[str, int], float],
    ram_claims: Mapping[str, float],
    gone_gpu: Mapping[tuple[str, int], float],
    gone_ram: Mapping[str, float],
    ram_reserve_mib: int,
) -> tuple[dict[int, int], int | None]:
    gpu_free: dict[int, int] = {}
    for g in h.gpus:
        foreign = sum(p.used_mib for p in g.processes if not p.ours) if g.processes else 0
        claimed = gpu_claims.get((h.host_id, g.index), 0.0) + foreign
        used = g.memory_used_mib - gone_gpu.get((h.host_id, g.index), 0.0)
        gpu_free[g.index] = int(g.memory_total_mib - max(used, claimed))
    ram_free = None
    if not h.gpus:  # same rule as GPUs: live usage vs our claims, whichever is larger
        used = h.ram_total_mib - h.ram_free_mib - gone_ram.get(h.host_id, 0.0)
        claimed = ram_claims.get(h.host_id, 0.0)
        reserve = ram_reserve_mib if h.ram_reserve_mib is None else h.ram_reserve_mib
        ram_free = int(h.ram_total_mib - reserve - max(used, claimed))
    return gpu_free, ram_free


def host_view(
    h: HostRecord, gpu_free: Mapping[int, int], ram_free: int | None, need: Need
) -> _HostView:
    """What `need` sees of one host: its free room (`_room`), narrowed to the pinned GPUs,
    with what the model needs beyond `need.memory_mib` on each kind of GPU."""
    v = _HostView(h.host_id, h.host_id in need.file_hosts)
    for g in h.gpus:
        if need.pin_gpus and g.index not in need.pin_gpus:
            continue
        v.gpu_free[g.index] = gpu_free[g.index]
        extra = need.gpu_memory_mib.get(g.name, 0) - need.memory_mib
        if extra > 0:
            v.gpu_extra[g.index] = extra
    v.ram_free = ram_free
    return v


def _build_view(
    hosts: Sequence[HostRecord],
    instances: Sequence[InstanceRecord],
    need: Need,
    ram_reserve_mib: int,
) -> list[_HostView]:
    gpu_claims, ram_claims = _claims(instances)
    gone_gpu, gone_ram = _gone_since_heartbeat(hosts, instances)
    views = []
    for h in hosts:
        free, ram = _room(h, gpu_claims, ram_claims, gone_gpu, gone_ram, ram_reserve_mib)
        views.append(host_view(h, free, ram, need))
    return views


# ---------------------------------------------------------------- fitting without eviction


def _split_share(memory_mib: int, k: int, overhead_mib: int) -> tuple[int, int]:
    """(total, per GPU) when one instance spans k GPUs: each extra GPU has its own context."""
    total = memory_mib + (k - 1) * overhead_mib
    return total, math.ceil(total / k)


# Where live copies of the model being placed run: host -> device indexes (CPU_DEVICE for a
# CPU instance). Another copy goes apart from them: another host first, then another device.
Copies = Mapping[str, frozenset[int]]
CPU_DEVICE = -1


def _copies(instances: Iterable[InstanceRecord], model: str) -> dict[str, frozenset[int]]:
    out: dict[str, set[int]] = defaultdict(set)
    for inst in instances:
        if inst.model == model and inst.state in LIVE_STATES and inst.host is not None:
            out[inst.host].update(inst.gpus or (CPU_DEVICE,))
    return {h: frozenset(d) for h, d in out.items()}


def _beside(copies: Copies, host: str, gpus: tuple[int, ...]) -> int:
    """0: no copy of the model on this host; 1: on the host, not on these devices; 2: on
    one of these devices (a replica there shares its compute: only if nothing else fits)."""
    here = copies.get(host)
    if not here:
        return 0
    return 2 if here.intersection(gpus or (CPU_DEVICE,)) else 1


def _best_single(
    views: list[_HostView], need: Need, strategy: str, copies: Copies
) -> _Option | None:
    """The one-GPU option `_rank` would pick, without building an option per GPU (a scan
    of 8,000 GPUs runs on every decision)."""
    sign = 1 if strategy == "binpack" else -1
    best: tuple[int, bool, int, str, int, int, int] | None = None
    for v in views:
        away = v.host_id not in need.file_hosts
        for i, free in v.gpu_free.items():
            needed = need.memory_mib + v.gpu_extra.get(i, 0)
            if free >= needed:
                k = (
                    _beside(copies, v.host_id, (i,)),
                    away,
                    sign * free,
                    v.host_id,
                    i,
                    free,
                    needed,
                )
                if best is None or k < best:
                    best = k
    if best is None:
        return None
    *_, host, i, free, needed = best
    return _Option(host, (i,), needed, free, "gpu")


def _split_option(v: _HostView, need: Need, overhead_mib: int) -> _Option | None:
    """Fewest GPUs of this host, largest free first, that hold the model split evenly."""
    ranked = sorted(v.gpu_free.items(), key=lambda kv: (-kv[1], kv[0]))
    max_k = len(ranked) if need.n_layers <= 0 else min(len(ranked), need.n_layers)
    for k in range(2, max_k + 1):
        total, share = _split_share(need.memory_mib, k, overhead_mib)
        tightest = ranked[k - 1][1]
        if all(f >= share + v.gpu_extra.get(i, 0) for i, f in ranked[:k]):
            gpus = tuple(sorted(i for i, _ in ranked[:k]))
            extra = sum(v.gpu_extra.get(i, 0) for i in gpus)
            return _Option(v.host_id, gpus, total + extra, tightest, "split")
    return None


def _cpu_option(v: _HostView, need: Need) -> _Option | None:
    if v.ram_free is None or v.ram_free < need.ram_mib:
        return None
    return _Option(v.host_id, (), need.ram_mib, v.ram_free, "cpu")


SortKey = tuple[object, ...]


def _rank(
    strategy: str, file_hosts: frozenset[str], copies: Copies
) -> Callable[[_Option], SortKey]:
    """Sort key: away from other copies of the model, then hosts holding the file, then
    best fit (least left) or most free."""

    def key(o: _Option) -> SortKey:
        fit = o.free_mib - o.memory_mib if o.kind != "split" else o.free_mib
        room = fit if strategy == "binpack" else -o.free_mib
        beside = _beside(copies, o.host, o.gpus)
        return (beside, o.host not in file_hosts, len(o.gpus), room, o.host, o.gpus)

    return key


def _best_without_eviction(
    views: list[_HostView], need: Need, strategy: str, overhead_mib: int, copies: Copies
) -> _Option | None:
    single = _best_single(views, need, strategy, copies)
    if single is not None:
        return single
    key = _rank(strategy, need.file_hosts, copies)
    split = [o for v in views if (o := _split_option(v, need, overhead_mib))]
    if split:
        return min(split, key=key)
    cpu = [o for v in views if (o := _cpu_option(v, need))]
    return min(cpu, key=key) if cpu else None


# ---------------------------------------------------------------- eviction


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


# ---------------------------------------------------------------- sentences


def _names(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _where(o: _Option) -> str:
    if o.kind == "cpu":
        return f"CPU on {o.host}"
    label = "GPU" if len(o.gpus) == 1 else "GPUs"
    return f"{o.host} {label} {','.join(map(str, o.gpus))}"


def _placed_reason(o: _Option, need: Need, strategy: str, notes: list[str], copies: Copies) -> str:
    needs = gib(o.memory_mib if o.kind != "split" else need.memory_mib)
    if o.kind == "gpu":
        how = "best fit" if strategy == "binpack" else "most free memory"
        s = f"{how} on {_where(o)}: {gib(o.free_mib)} free, model needs {needs}"
    elif o.kind == "split":
        per = math.ceil(o.memory_mib / len(o.gpus))
        s = (
            f"no single GPU has {needs} free; split across {_where(o)}"
            f" ({gib(per)} on each, {gib(o.memory_mib)} in all)"
        )
    else:
        s = f"CPU on {o.host}: {gib(o.free_mib)} RAM free after the reserve, model needs {needs}"
    if o.host in need.file_hosts:
        s += f"; the file is already on {o.host}"
    if copies:
        where = ["apart from", "on the same host as", "sharing a device with"]
        s += f"; {where[_beside(copies, o.host, o.gpus)]} its other instance(s)"
    if o.evict and o.drains:
        who = _names(list(o.evict))
        s += f"; once {who} yield (drain, then stop), which frees {gib(o.freed_mib)}"
    elif o.evict:
        idle = _names(list(o.evict))
        s += f"; after stopping least recently used idle {idle}, which frees {gib(o.freed_mib)}"
    return "; ".join([s, *notes])


@dataclass(frozen=True)
class RoomLeft:
    """What the candidate hosts have free, for the sentences of a NoFit."""

    gpu_hosts: int  # hosts with a GPU (a pinned one, where pinned)
    largest: tuple[int, str, int] | None  # (free MiB, host, GPU index): the most on one GPU
    split_best: int  # the largest model an even split over one host's GPUs could hold
    cpu_hosts: int  # CPU-only hosts
    best_ram: int  # the most RAM free on one of them (0: none)
    empty: tuple[str, ...] = ()  # hosts with none of the pinned GPUs


def _room_left(views: list[_HostView], overhead_mib: int) -> RoomLeft:
    gpu_views = [v for v in views if v.gpu_free]
    cpu_views = [v for v in views if v.ram_free is not None]
    return RoomLeft(
        gpu_hosts=len(gpu_views),
        largest=max(
            ((f, v.host_id, i) for v in gpu_views for i, f in v.gpu_free.items()), default=None
        ),
        split_best=max((_split_capacity(v, overhead_mib) for v in gpu_views), default=0),
        cpu_hosts=len(cpu_views),
        best_ram=max((v.ram_free or 0 for v in cpu_views), default=0),
        empty=tuple(v.host_id for v in views if not v.gpu_free and v.ram_free is None),
    )


def _no_room(views: list[_HostView], need: Need, total_hosts: int, overhead_mib: int) -> list[str]:
    return no_room_text(_room_left(views, overhead_mib), need, total_hosts)


def no_room_text(left: RoomLeft, need: Need, total_hosts: int) -> list[str]:
    needs = gib(need.memory_mib)
    out = []
    if left.gpu_hosts and left.largest is not None:
        free, host, index = left.largest
        s = (
            f"{left.gpu_hosts} of {total_hosts} hosts excluded: not enough free memory on any GPU,"
            f" largest free {gib(max(free, 0))} ({host} GPU {index}), model needs {needs}"
        )
        if left.split_best > 0:
            s += f"; split across the GPUs of one host, at most {gib(left.split_best)} fits"
        out.append(s)
    if left.cpu_hosts:
        out.append(
            f"{left.cpu_hosts} of {total_hosts} hosts excluded: CPU-only with at most"
            f" {gib(max(left.best_ram, 0))} RAM free after the reserve, model needs {gib(need.ram_mib)}"
        )
    if left.empty:
        pins = ",".join(map(str, need.pin_gpus))
        empty = list(left.empty)
        out.append(
            f"{len(empty)} of {total_hosts} hosts excluded: no pinned GPU {pins} there ({_names(empty)})"
        )
    return out


def _split_capacity(v: _HostView, overhead_mib: int) -> int:
    """The largest model (MiB) an even split over this host's GPUs could hold."""
    ranked = sorted(v.gpu_free.values(), reverse=True)
    best = 0
    for k in range(2, len(ranked) + 1):
        best = max(best, k * max(ranked[k - 1], 0) - (k - 1) * overhead_mib)
    return best


def _no_eviction(busy: int, kept: int, reachable: float, had_candidates: bool) -> str:
    held = []
    if busy:
        held.append(f"{busy} busy with requests in flight")
    if kept:
        held.append(f"{kept} marked keep_loaded")
    why = f" ({', '.join(held)})" if held else ""
    if not had_candidates:
        return f"no idle instance could be stopped to make room{why}"
    return (
        f"stopping idle instances would leave at most {gib(reachable)} free on one GPU or host,"
        f" not enough{why}"
    )


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


def _fail(need: Need, notes: list[str]) -> str:
    return f"no host can run {need.model} (needs {gib(need.memory_mib)}): " + "; ".join(notes)


def _fmt_duration(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def keep_alive_timeout(keep_alive: float) -> float:
    """An Ollama request's keep_alive as an idle timeout: 0 unloads right after the answer,
    a negative value keeps the model loaded (our 0, never)."""
    if keep_alive < 0:
        return 0.0
    return keep_alive if keep_alive > 0 else 1e-6


def idle_to_stop(
    instances: Sequence[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    idle_timeouts: Mapping[str, float],
    default_idle: float,
    now: float,
) -> list[tuple[str, str]]:
    """(instance_id, reason) for READY instances idle past their timeout, longest idle first.

    Idle is measured from the end of the last request (activity.last_used), or from ready_at
    when never used; a timeout of 0 means never; an instance with requests in flight is
    never idle. The last request's Ollama keep_alive, when it set one, replaces the model's
    timeout.
    """
    out: list[tuple[float, str, str]] = []
    for inst in instances:
        if inst.state != InstanceState.READY:
            continue
        timeout = idle_timeouts.get(inst.model, default_idle)
        act = activity.get(inst.instance_id)
        if act is not None and act.keep_alive is not None:
            timeout = keep_alive_timeout(act.keep_alive)
        if timeout <= 0 or (act is not None and act.in_flight > 0):
            continue
        idle = now - _last_use(inst, act)
        if idle >= timeout:
            why = f"idle for {_fmt_duration(idle)} (idle_timeout {timeout:g} s)"
            if act is not None and act.keep_alive is not None:
                why = f"idle for {_fmt_duration(idle)} (the last request's keep_alive {act.keep_alive:g} s)"
            out.append((-idle, inst.instance_id, why))
    out.sort()
    return [(iid, why) for _, iid, why in out]
