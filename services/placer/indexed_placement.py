"""Placing from the index (`placement_index.PlacementIndex`): `place_indexed` gives
`placement.place`'s decision and sentence without scanning every GPU and instance.

- one GPU, split, CPU: a bisection each in the index's sorted room; the few hosts that rank
  apart (holding the file, running a copy, the excluded instance's) are worked out one by
  one with placement's own code, then compared;
- eviction: `indexed_eviction` (GPUs whose k least recently used idle instances make room);
- a model pinned to a host: `place` itself over that host's instances.

What it cannot answer quickly, it leaves to the straightforward path and returns None (GPU
pins, an eviction only busy instances can make, a split or CPU eviction, a NoFit that
considered eviction). No I/O, no clock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from proto.messages import (
    ActivityReport,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.indexed_eviction import _dirty, _evict_single
from services.placer.memory import GPU_OVERHEAD_MIB
from services.placer.placement import (
    ALL_LAYERS,
    STRATEGIES,
    Need,
    NoFit,
    Placed,
    lost_hosts,
    place,
)
from services.placer.placement_eviction import Victim, _evict_one_gpu, _evictables
from services.placer.placement_index import PlacementIndex
from services.placer.placement_options import (
    _beside,
    _best_single,
    _cpu_option,
    _Option,
    _rank,
    _split_option,
    _split_share,
)
from services.placer.placement_room import _HostView, host_room, host_view
from services.placer.placement_sentences import (
    RoomLeft,
    _fail,
    _names,
    _placed_reason,
    _split_capacity,
    no_room_text,
)

__all__ = ["Ranker", "place_indexed"]

_READY = InstanceState.READY


class Ranker(Protocol):
    """`may_drain` computed per instance asked about (plan.Yielding): the ranks of those of
    `ids` that may yield, in the same order the whole ranking would put them."""

    def ranks_for(self, ids: Iterable[str]) -> dict[str, float]: ...


class _Spares(Container[str]):
    def __init__(self, index: PlacementIndex) -> None:
        self.index = index

    def __contains__(self, iid: object) -> bool:
        return isinstance(iid, str) and self.index.is_spare(iid)


@dataclass
class _Ask:
    """One decision's inputs, with the per-host work it has done so far."""

    index: PlacementIndex
    need: Need
    now: float
    strategy: str
    keep_loaded: frozenset[str]
    unsettled: Container[str]
    queues: Collection[str]
    may_drain: Mapping[str, float] | Ranker | None
    exclude: str | None
    exclude_host: str | None
    copies: dict[str, frozenset[int]] = field(default_factory=dict)
    evaluated: dict[str, list[_Option]] = field(default_factory=dict)

    def needed(self, name: str) -> int:
        """What the model needs on a GPU of this name (`host_view`'s gpu_extra)."""
        m = self.need.memory_mib
        return max(m, self.need.gpu_memory_mib.get(name, 0))

    def instances(self, host: str) -> list[InstanceRecord]:
        return [r for r in self.index.on_host(host) if r.instance_id != self.exclude]

    def view(self, host: str) -> _HostView:
        idx = self.index
        h = idx.hosts[host]
        if host == self.exclude_host:  # its room without the excluded instance's claim
            free, ram = host_room(h, self.instances(host), idx.ram_reserve_mib)
        else:
            free, ram = idx.gpu_free[host], idx.ram_free[host]
        return host_view(h, free, ram, self.need)

    def activity(self, recs: Iterable[InstanceRecord]) -> dict[str, InstanceActivity]:
        """`plan_view.placement_activity` for these instances: a READY one of a model with
        requests queued counts busy."""
        acts = self.index.activity
        out: dict[str, InstanceActivity] = {}
        for r in recs:
            a = acts.get(r.instance_id)
            if r.state == _READY and r.model in self.queues and (a is None or a.in_flight == 0):
                a = InstanceActivity(1, self.now)
            if a is not None:
                out[r.instance_id] = a
        return out

    def ranks(self, busy: list[str]) -> dict[str, float]:
        md = self.may_drain
        if md is None or not busy:
            return {}
        if hasattr(md, "ranks_for"):  # (never read it as a mapping: that ranks them all)
            return md.ranks_for(busy)  # type: ignore[union-attr]
        assert isinstance(md, Mapping)
        return {i: md[i] for i in busy if i in md}

    def evict_on(self, host: str) -> list[_Option]:
        """`placement_eviction._evict_one_gpu` for one host, worked out the straightforward way:
        the best single-GPU evictions there (fewest and stalest victims). Which busy
        instances may yield is asked only where draining one could beat the idle ones."""
        got = self.evaluated.get(host)
        if got is not None:
            return got
        recs = self.instances(host)
        act = self.activity(recs)
        view = self.view(host)
        got, idle = self._evict_on(host, recs, act, view, {})
        busy = [i for i, a in act.items() if a.in_flight > 0]
        if busy and self.may_drain is not None:
            # A drain option stops every idle victim of its GPU and one busy one at least:
            # it wins only on a GPU with fewer idle victims than the idle winners stop, less one.
            fewest = len(got[0].evict) if got else None
            on_gpu: dict[int, int] = {}
            for x in idle:
                for g in x[2].gpus:
                    on_gpu[g] = on_gpu.get(g, 0) + 1
            gpus = {g for i in busy for g in self.index.instances[i].gpus if g in view.gpu_free}
            if fewest is None or any(on_gpu.get(g, 0) + 1 < fewest for g in gpus):
                got, _ = self._evict_on(host, recs, act, view, self.ranks(busy))
        self.evaluated[host] = got
        return got

    def _evict_on(
        self,
        host: str,
        recs: list[InstanceRecord],
        act: dict[str, InstanceActivity],
        view: _HostView,
        ranks: Mapping[str, float],
    ) -> tuple[list[_Option], list[Victim]]:
        """The host's best single-GPU evictions with these busy ones allowed to drain, and
        the victims they were chosen from."""
        by_host, _, _ = _evictables(
            recs,
            act,
            self.need,
            self.keep_loaded,
            {host},
            ranks,
            self.unsettled,
            spares=_Spares(self.index),
        )
        victims = by_host.get(host, [])
        return (_evict_one_gpu(view, victims, self.need) if victims else []), victims


def _first(items: list[tuple], lo: int, skip: Container[str]) -> tuple | None:  # type: ignore[type-arg]
    """The first entry from `lo` on whose host (its second field) is not skipped."""
    for j in range(lo, len(items)):
        if items[j][1] not in skip:
            return items[j]
    return None


def _most(items: list[tuple], skip: Container[str]) -> tuple | None:  # type: ignore[type-arg]
    """The entry with the largest first field, among those whose host is not skipped, the
    lowest host (then the rest) among equals."""
    for j in range(len(items) - 1, -1, -1):
        if items[j][1] not in skip:
            return _first(items, bisect_left(items, (items[j][0],)), skip)
    return None


def _pick(
    items: list[tuple],
    least: int,
    skip: Container[str],
    binpack: bool,  # type: ignore[type-arg]
) -> tuple | None:  # type: ignore[type-arg]
    """binpack: the entry with the smallest first field >= `least`; spread: the largest.
    Ties: the lowest host, then index."""
    if binpack:
        return _first(items, bisect_left(items, (least,)), skip)
    top = _most(items, skip)
    return top if top is not None and top[0] >= least else None


def _single(ask: _Ask, skip: set[str], views: list[_HostView], copies: dict) -> _Option | None:  # type: ignore[type-arg]
    """`placement_options._best_single` over every candidate: the index for hosts with nothing
    special about them, the straightforward scan for the few that are (`views`)."""
    binpack = ask.strategy == "binpack"
    sign = 1 if binpack else -1
    best: tuple | None = None  # type: ignore[type-arg]
    for name, s in ask.index.rooms.free.items():
        e = _pick(s.items, ask.needed(name), skip, binpack)
        if e is not None:
            free, host, i = e
            k = (0, True, sign * free, host, i, free, ask.needed(name))
            if best is None or k < best:
                best = k
    o = _best_single(views, ask.need, ask.strategy, copies)
    if o is not None:
        k = (
            _beside(copies, o.host, o.gpus),
            o.host not in ask.need.file_hosts,
            sign * o.free_mib,
            o.host,
            o.gpus[0],
            o.free_mib,
            o.memory_mib,
        )
        if best is None or k < best:
            best = k
    if best is None:
        return None
    *_, host, i, free, needed = best
    return _Option(host, (i,), needed, free, "gpu")


def _split(
    ask: _Ask,
    skip: set[str],
    views: list[_HostView],
    copies: dict,
    overhead: int,  # type: ignore[type-arg]
) -> _Option | None:
    """`placement_options._split_option` over every candidate, the best by `_rank`: the general
    hosts' best is at the fewest GPUs any of them can split over."""
    need, idx = ask.need, ask.index
    binpack = ask.strategy == "binpack"
    key = _rank(ask.strategy, need.file_hosts, copies)
    options = [o for v in views if (o := _split_option(v, need, overhead))]
    top = max((k for (_, k), s in idx.rooms.split.items() if s.items), default=0)
    if need.n_layers > 0:
        top = min(top, need.n_layers)
    for k in range(2, top + 1):
        _, share = _split_share(need.memory_mib, k, overhead)
        found: tuple[int, str] | None = None
        for (name, kk), s in idx.rooms.split.items():
            if kk != k:
                continue
            e = _pick(s.items, share + ask.needed(name) - need.memory_mib, skip, binpack)
            if e is not None:
                room = e[0] if binpack else -e[0]
                if found is None or (room, e[1]) < found:
                    found = (room, e[1])
        if found is not None:
            o = _split_option(ask.view(found[1]), need, overhead)
            assert o is not None and len(o.gpus) == k
            options.append(o)
            break
    return min(options, key=key) if options else None


def _cpu(ask: _Ask, skip: set[str], views: list[_HostView], copies: dict) -> _Option | None:  # type: ignore[type-arg]
    need = ask.need
    options = [o for v in views if (o := _cpu_option(v, need))]
    e = _pick(ask.index.rooms.cpu.items, need.ram_mib, skip, ask.strategy == "binpack")
    if e is not None:
        options.append(_Option(e[1], (), need.ram_mib, e[0], "cpu"))
    return min(options, key=_rank(ask.strategy, need.file_hosts, copies)) if options else None


def _last(items: list[tuple], skip: Container[str]) -> tuple | None:  # type: ignore[type-arg]
    """The largest entry whose host (its second field) is not skipped."""
    for j in range(len(items) - 1, -1, -1):
        if items[j][1] not in skip:
            return items[j]
    return None


def _room_left(
    ask: _Ask, skip: set[str], views: list[_HostView], gpu_hosts: int, cpu_hosts: int
) -> RoomLeft:
    """`placement_sentences._room_left` over every candidate: the index's largest entries, and the
    few hosts worked out one by one (`views`)."""
    idx = ask.index
    largest = [e for s in idx.rooms.free.values() if (e := _last(s.items, skip)) is not None]
    largest += [(f, v.host_id, i) for v in views for i, f in v.gpu_free.items()]
    split = [e[0] for e in [_last(idx.rooms.capacity.items, skip)] if e is not None]
    split += [_split_capacity(v, GPU_OVERHEAD_MIB) for v in views if v.gpu_free]
    ram = [e[0] for e in [_last(idx.rooms.cpu.items, skip)] if e is not None]
    ram += [v.ram_free for v in views if v.ram_free is not None]
    return RoomLeft(
        gpu_hosts=gpu_hosts,
        largest=max(largest, default=None),
        split_best=max(split, default=0),
        cpu_hosts=cpu_hosts,
        best_ram=max(ram, default=0),
    )


def _pinned(ask: _Ask, hlist: list[HostRecord], host: str, **kw: object) -> Placed | NoFit:
    """A model pinned to one host: `place` itself, over that host's instances (and those
    its answer reads elsewhere: the model's own, for where its copies run, and each model's
    keeper, for which copies are spare)."""
    idx = ask.index
    ids = set(idx._on_host.get(host, ())) | idx._of_model.get(ask.need.model, set())
    ids |= {k for m in {idx.instances[i].model for i in ids} if (k := idx.keeper(m))}
    ids.discard(ask.exclude or "")
    recs = idx.records(ids)
    act = ask.activity(recs)
    busy = [r.instance_id for r in recs if r.host == host and r.instance_id in act]
    busy = [i for i in busy if act[i].in_flight > 0]
    return place(
        hlist,
        recs,
        act,
        ask.need,
        now=ask.now,
        strategy=ask.strategy,
        keep_loaded=ask.keep_loaded,
        may_drain=ask.ranks(busy),
        unsettled=frozenset(i for i in ids if i in ask.unsettled),
        **kw,  # type: ignore[arg-type]
    )


def _without_eviction(
    ask: _Ask, hosts: Mapping[str, HostRecord], lostset: set[str]
) -> tuple[_Option | None, list[_HostView], set[str]]:
    """One GPU, split, CPU, from the index for hosts with nothing special about them and one
    by one for those that rank apart (holding the file, running a copy, the excluded
    instance's): the best option, those hosts' views, and the hosts the index skips."""
    index, need, copies = ask.index, ask.need, ask.copies
    special = {h for h in (*need.file_hosts, *copies, ask.exclude_host) if h in hosts}
    special -= lostset
    views = [ask.view(h) for h in sorted(special)]
    skip = lostset | special
    overhead = GPU_OVERHEAD_MIB
    best = _single(ask, skip, views, copies)
    if best is None:
        best = _split(
            ask,
            skip | index._mixed,
            views + [ask.view(h) for h in sorted(index._mixed - skip)],
            copies,
            overhead,
        )
    if best is None:
        best = _cpu(ask, skip, views, copies)
    return best, views, skip


def place_indexed(
    index: PlacementIndex,
    hosts: Mapping[str, HostRecord],
    need: Need,
    *,
    now: float,
    fresh: Sequence[ActivityReport],
    queues: Collection[str],
    strategy: str = "binpack",
    host_lost_after: float = 10.0,
    ram_reserve_mib: int = 1024,
    keep_loaded: frozenset[str] = frozenset(),
    heard: Mapping[str, float] | None = None,
    may_drain: Mapping[str, float] | Ranker | None = None,
    unsettled: Collection[str] = frozenset(),
    may_evict: bool = True,
    exclude: str | None = None,
) -> Placed | NoFit | None:
    """`placement.place(hosts, instances but exclude, placement activity, need, ...)` from
    the index: the same decision and sentence, or None where only the straightforward path
    can tell. `index` must hold the same hosts and instances as the view; `fresh` are the
    gateway reports that count now and `queues` the models with requests waiting (what
    `plan_view.placement_activity` reads)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r} (use one of {STRATEGIES})")
    if not hosts:
        return NoFit("no hosts have joined yet: start an agent")
    if need.pin_gpus or len(hosts) != len(index.hosts):
        return None
    ex = index.instances.get(exclude) if exclude is not None else None
    if ex is not None and ex.state == _READY:
        return None  # (it would change which copy of its model is spare)
    index.sync(fresh, keep_loaded=keep_loaded, ram_reserve_mib=ram_reserve_mib)
    hlist = list(hosts.values())
    notes: list[str] = []
    if heard and not now - min(heard.values()) > host_lost_after:
        lost = []  # (no host silent for that long: the usual case, told without a scan)
    else:
        lost = lost_hosts(hlist, now, host_lost_after, heard)
    if lost:
        notes.append(
            f"{len(lost)} of {len(hosts)} hosts excluded: no heartbeat for over"
            f" {host_lost_after:g} s ({_names(lost)})"
        )
    lostset = set(lost)
    ask = _Ask(
        index,
        need,
        now,
        strategy,
        keep_loaded,
        unsettled,
        queues,
        may_drain,
        exclude,
        ex.host if ex is not None else None,
    )
    if need.pin_host is not None:
        return _pinned(
            ask,
            hlist,
            need.pin_host,
            host_lost_after=host_lost_after,
            ram_reserve_mib=ram_reserve_mib,
            heard=heard,
            may_evict=may_evict,
        )
    if len(lostset) == len(hosts):
        return NoFit(_fail(need, notes))
    ask.copies = copies = index.copies(need.model, exclude)
    best, views, skip = _without_eviction(ask, hosts, lostset)
    if best is None and not may_evict:
        gpu_hosts = len(index._gpu_hosts - lostset)
        cpu_hosts = len(hosts) - len(index._gpu_hosts) - len(lostset - index._gpu_hosts)
        left = _room_left(ask, skip, views, gpu_hosts, cpu_hosts)
        room = no_room_text(left, need, len(hosts))
        return NoFit(_fail(need, notes + room + ["nothing is stopped to make room for it"]))
    if best is None:
        dirty = _dirty(ask, queues, unsettled)
        if dirty is None:
            return None
        best = _evict_single(ask, lostset, dirty - lostset)
        if best is None:
            return None
    return Placed(
        host=best.host,
        gpus=best.gpus,
        n_gpu_layers=0 if best.kind == "cpu" else ALL_LAYERS,
        memory_mib=best.memory_mib,
        reason=_placed_reason(best, need, strategy, notes, copies),
        evict=best.evict,
    )
