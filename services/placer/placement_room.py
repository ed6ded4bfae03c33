"""Free room per GPU and per CPU-only host, as `placement.place` sees it (pure): the total
less the larger of live usage and our claims (plus memory of processes that are not ours),
with memory of instances stopped since the host's last heartbeat counted free. The index
(`placement_index`) keeps the same figures per host."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proto.messages import LIVE_STATES, HostRecord, InstanceRecord, InstanceState

if TYPE_CHECKING:
    from services.placer.placement import Need


@dataclass
class _HostView:
    host_id: str
    has_file: bool
    gpu_free: dict[int, int] = field(default_factory=dict)  # GPU index -> free MiB
    # GPU index -> MiB the model needs there beyond need.memory_mib (measured on that kind)
    gpu_extra: dict[int, int] = field(default_factory=dict)
    ram_free: int | None = None  # CPU-only hosts: RAM free after reserve and claims


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
