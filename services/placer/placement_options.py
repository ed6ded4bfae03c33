"""Where one instance could go without stopping anything (pure): the best single GPU, the
fewest GPUs of one host split evenly, a CPU-only host; and how options rank (apart from the
model's other copies, then hosts holding the file, then best fit or most free)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proto.messages import LIVE_STATES, InstanceRecord
from services.placer.placement_room import _HostView

if TYPE_CHECKING:
    from services.placer.placement import Need


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
