"""What a placement says (pure): the reason of a Placed (where, why there, what it stops)
and the sentences of a NoFit (how much room is left where, what could not be stopped)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.placer.memory import gib
from services.placer.placement_options import Copies, _beside, _Option
from services.placer.placement_room import _HostView

if TYPE_CHECKING:
    from services.placer.placement import Need


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


def _fail(need: Need, notes: list[str]) -> str:
    return f"no host can run {need.model} (needs {gib(need.memory_mib)}): " + "; ".join(notes)
