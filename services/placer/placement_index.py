"""Indexes that let `placement.place` decide in well under a millisecond on a big cluster,
with the same answer (DESIGN.md "Cost").

`place` scans every GPU and every instance on each decision: O(hosts x GPUs + instances),
27 ms at 1,000 hosts x 8 GPUs with 33k instances, 123 ms when it evicts. `PlacementIndex`
keeps what those scans compute, updated as records change (the service feeds it from its KV
watches), and `place_indexed` answers from it:

- free room per GPU (`placement.host_room`, per host), sorted per GPU name: the best single
  GPU is a bisection, the split tier one per GPU count, the CPU tier one more;
- the merged gateway activity (`merge_activity`, kept per instance as reports change) and
  each model's most recently used READY instance (the one that is not a spare copy);
- per GPU its idle eviction victims in LRU order, with what the first k of them free and
  how recently the k-th was used, sorted per k: eviction searches the GPUs whose first k
  victims make room, stalest first, and works out only the few hosts it lands on with the
  straightforward code (`placement._evictables`, `_evict_one_gpu`), busy ones that may
  yield included.

What the index cannot answer quickly, it leaves to the straightforward path: `place_indexed`
returns None (GPU pins, an eviction only busy instances can make, a split or CPU eviction,
a NoFit that considered eviction). Everything here is deterministic, with no I/O and no
clock; the decisions stay pure: the index is an input, and `sync` only brings derived
state up to date with the view it is asked about.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Collection, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from proto.messages import (
    LIVE_STATES,
    ActivityReport,
    FileInfo,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.memory import GPU_OVERHEAD_MIB
from services.placer.placement import (
    ALL_LAYERS,
    CPU_DEVICE,
    SPARE_FIRST,
    STRATEGIES,
    Need,
    NoFit,
    Placed,
    RoomLeft,
    Victim,
    _beside,
    _best_single,
    _claims,
    _cpu_option,
    _evict_one_gpu,
    _evictables,
    _fail,
    _gone_since_heartbeat,
    _HostView,
    _last_use,
    _names,
    _Option,
    _placed_reason,
    _rank,
    _room,
    _split_capacity,
    _split_option,
    _split_share,
    host_room,
    host_view,
    lost_hosts,
    no_room_text,
    place,
)

__all__ = ["PlacementIndex", "Ranker", "ReadyRevs", "fold_activity", "place_indexed"]

_READY = InstanceState.READY
_SERVING = (InstanceState.READY, InstanceState.DRAINING)
# At most this many GPUs qualifying at one eviction step are ranked directly; above it the
# stalest-first list is walked instead (each entry checked), which stops at the first fit.
SUFFIX_MAX = 64
# More unsettled instances than this (every READY one, when the gateways went quiet): the
# straightforward path, since every host they are on would be worked out one by one.
DIRTY_MAX = 256


def fold_activity(cur: InstanceActivity | None, a: InstanceActivity) -> InstanceActivity:
    """One gateway's report of an instance folded into what the gateways before it said
    (`plan.merge_activity`): in-flight summed, last use maxed with that request's keep_alive,
    the earliest busy spell among the gateways where it is busy."""
    busy = a.busy_since if a.in_flight > 0 else None  # (an idle one's is an old spell)
    if cur is None:
        return InstanceActivity(a.in_flight, a.last_used, a.keep_alive, busy)
    cur.in_flight += a.in_flight
    if a.last_used >= cur.last_used:
        cur.keep_alive = a.keep_alive
    cur.last_used = max(cur.last_used, a.last_used)
    if busy is not None:  # the earliest gateway's spell is the instance's
        since = cur.busy_since
        cur.busy_since = busy if since is None else min(since, busy)
    return cur


class Ranker(Protocol):
    """`may_drain` computed per instance asked about (plan.Yielding): the ranks of those of
    `ids` that may yield, in the same order the whole ranking would put them."""

    def ranks_for(self, ids: Iterable[str]) -> dict[str, float]: ...


class _Sorted:
    """A sorted list of distinct tuples (bisect; a few thousand entries at most)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple] = []  # type: ignore[type-arg]

    def add(self, item: tuple) -> None:  # type: ignore[type-arg]
        insort(self.items, item)

    def discard(self, item: tuple) -> None:  # type: ignore[type-arg]
        i = bisect_left(self.items, item)
        if i < len(self.items) and self.items[i] == item:
            del self.items[i]


# One idle eviction victim on one GPU: (order, instance id, MiB it frees there), where order
# is placement's: last use, less SPARE_FIRST for a spare copy.
_Victim = tuple[float, str, float]


@dataclass
class _HostEntries:
    """What of one host is in the sorted indexes, to take out when it changes."""

    free: list[tuple[str, tuple[int, str, int]]] = field(default_factory=list)
    split: list[tuple[tuple[str, int], tuple[int, str]]] = field(default_factory=list)
    cpu: tuple[int, str] | None = None
    capacity: tuple[int, str] | None = None
    # GPU index -> (name, what its first k idle victims leave free, the k-th one's order)
    victims: dict[int, tuple[str, tuple[float, ...], tuple[float, ...]]] = field(
        default_factory=dict
    )


_ENDED = (InstanceState.STOPPED, InstanceState.FAILED)  # (`_gone_since_heartbeat` reads them)


class PlacementIndex:
    """What `place` needs, kept up to date record by record. The owner calls `put_instance`,
    `delete_instance`, `put_host`, `delete_host` as its KV views change, `set_reports` as
    gateways report, and `sync` (also called by `place_indexed`) with the reports that
    count now, the models never evicted and the RAM reserve. Records are read, never
    changed. Each change works out again only what it touches: a host's claims and room
    for a record or heartbeat, one GPU's idle victims for a use reported."""

    def __init__(
        self, *, ram_reserve_mib: int = 1024, keep_loaded: frozenset[str] = frozenset()
    ) -> None:
        self.instances: dict[str, InstanceRecord] = {}
        self.hosts: dict[str, HostRecord] = {}
        self.activity: dict[str, InstanceActivity] = {}  # merged over `_reports`
        self.keep_loaded = keep_loaded
        self.ram_reserve_mib = ram_reserve_mib
        self.gpu_free: dict[str, dict[int, int]] = {}  # host -> GPU index -> free MiB
        self.ram_free: dict[str, int | None] = {}  # CPU-only host -> free RAM MiB
        self._seq: dict[str, int] = {}  # instance -> order of first sight (the views' order)
        self._host_seq: dict[str, int] = {}
        self._next = 0
        self._on_host: dict[str, set[str]] = {}  # host -> instances recorded on it
        self._on_gpu: dict[tuple[str, int], set[str]] = {}  # (host, GPU) -> instances
        self._ended: dict[str, set[str]] = {}  # host -> its STOPPED or FAILED instances
        self._of_model: dict[str, set[str]] = {}
        self._drain_for: dict[str, set[str]] = {}  # model -> instances DRAINING for it
        self._file_hosts: dict[str, set[str]] = {}  # filename -> hosts listing it
        self._reports: list[ActivityReport] = []
        self._keeper: dict[str, tuple[float, str]] = {}  # model -> (-last use, id): not spare
        # host -> what its live instances claim: per (host, GPU), and in RAM
        self._claims: dict[str, tuple[dict[tuple[str, int], float], dict[str, float]]] = {}
        self._names: dict[str, dict[int, str]] = {}  # host -> GPU index -> GPU name
        self._gpu_hosts: set[str] = set()
        self._mixed: set[str] = set()  # hosts with GPUs of more than one name
        self._free: dict[str, _Sorted] = {}  # GPU name -> (free, host, index)
        self._split: dict[tuple[str, int], _Sorted] = {}  # (name, k) -> (k-th most free, host)
        self._cpu = _Sorted()  # (RAM free, host)
        self._capacity = _Sorted()  # (what an even split over the host's GPUs holds, host)
        self._vcap: dict[tuple[str, int], _Sorted] = {}  # (name, k) -> (free after k, host, i)
        self._vnew: dict[int, _Sorted] = {}  # k -> (order of the k-th victim, host, index)
        self._entries: dict[str, _HostEntries] = {}
        # what to work out again: hosts' claims, hosts' room, GPUs' victims (None: all)
        self._claims_dirty: set[str] = set()
        self._room_dirty: set[str] = set()
        self._victims_dirty: dict[str, set[int] | None] = {}

    # ------------------------------------------------------------------ updates

    def put_instance(self, rec: InstanceRecord) -> None:
        iid = rec.instance_id
        old = self.instances.get(iid)
        if old is None:
            self._seq[iid] = self._next
            self._next += 1
        else:
            self._unlink(old)
        self.instances[iid] = rec
        self._link(rec)
        self._rekeep(rec.model, iid)
        if old is not None and old.model != rec.model:
            self._rekeep(old.model, iid)
        self._flush()

    def delete_instance(self, iid: str) -> None:
        old = self.instances.pop(iid, None)
        if old is None:
            return
        self._seq.pop(iid, None)
        self._unlink(old)
        self._rekeep(old.model, iid)
        self._flush()

    def put_host(self, rec: HostRecord) -> None:
        host = rec.host_id
        old = self.hosts.get(host)
        if old is None:
            self._host_seq[host] = self._next
            self._next += 1
        self.hosts[host] = rec
        if old is None or old.files != rec.files:
            before = {f.filename for f in old.files} if old is not None else set()
            after = {f.filename for f in rec.files}
            for name in before - after:
                self._file_hosts.get(name, set()).discard(host)
            for name in after - before:
                self._file_hosts.setdefault(name, set()).add(host)
        self._room_dirty.add(host)
        if old is None or [(g.index, g.name) for g in old.gpus] != [
            (g.index, g.name) for g in rec.gpus
        ]:
            self._victims_dirty[host] = None
        self._flush()

    def delete_host(self, host_id: str) -> None:
        old = self.hosts.pop(host_id, None)
        if old is None:
            return
        self._host_seq.pop(host_id, None)
        for f in old.files:
            self._file_hosts.get(f.filename, set()).discard(host_id)
        self._room_dirty.add(host_id)
        self._victims_dirty[host_id] = None
        self._flush()

    def set_reports(self, fresh: Sequence[ActivityReport]) -> None:
        """The merged activity to be of `fresh` (the gateways' reports that count now, in the
        view's order): only the instances whose entries changed are merged again."""
        self._set_reports(fresh)
        self._flush()

    def sync(
        self,
        fresh: Sequence[ActivityReport],
        *,
        keep_loaded: frozenset[str],
        ram_reserve_mib: int,
    ) -> None:
        """Bring the derived state up to `fresh` (the gateways' reports that count now, in
        the view's order), `keep_loaded` and the RAM reserve. Nothing to do, the usual case,
        costs a comparison per gateway."""
        if keep_loaded != self.keep_loaded:
            changed = keep_loaded ^ self.keep_loaded
            self.keep_loaded = keep_loaded
            for m in changed:
                for iid in self._of_model.get(m, ()):
                    self._touch(self.instances[iid])
        if ram_reserve_mib != self.ram_reserve_mib:
            self.ram_reserve_mib = ram_reserve_mib
            self._room_dirty.update(h for h in self.hosts if h not in self._gpu_hosts)
        self._set_reports(fresh)
        self._flush()

    # ------------------------------------------------------------------ reads

    def records(self, ids: Iterable[str]) -> list[InstanceRecord]:
        """The records of `ids`, in the views' order."""
        seq = self._seq
        return [self.instances[i] for i in sorted(ids, key=seq.__getitem__)]

    def of_model(self, model: str) -> list[InstanceRecord]:
        return self.records(self._of_model.get(model, ()))

    def draining_for(self, model: str) -> list[InstanceRecord]:
        return self.records(self._drain_for.get(model, ()))

    def on_host(self, host: str) -> list[InstanceRecord]:
        return self.records(self._on_host.get(host, ()))

    def file_hosts(self, filename: str) -> set[str]:
        """Hosts whose last heartbeat lists `filename`."""
        return set(self._file_hosts.get(filename, ()))

    def file_info(self, filename: str, host: str | None = None) -> FileInfo | None:
        """`filename`'s entry in the heartbeat of the first host (in the views' order; only
        `host`, if given) that lists it."""
        hosts: Iterable[str] = self._file_hosts.get(filename, ())
        if host is not None:
            hosts = [host] if host in hosts else []
        for h in sorted(hosts, key=self._host_seq.__getitem__):
            for f in self.hosts[h].files:
                if f.filename == filename:
                    return f
        return None

    def keeper(self, model: str) -> str | None:
        """The model's READY instance that is not a spare copy (`placement.spare_copies`)."""
        k = self._keeper.get(model)
        return k[1] if k is not None else None

    def is_spare(self, iid: str) -> bool:
        rec = self.instances.get(iid)
        if rec is None or rec.state != _READY:
            return False
        k = self._keeper.get(rec.model)
        return k is not None and k[1] != iid

    def copies(self, model: str, exclude: str | None) -> dict[str, frozenset[int]]:
        """`placement._copies` over the instances but `exclude`."""
        out: dict[str, set[int]] = {}
        for iid in self._of_model.get(model, ()):
            r = self.instances[iid]
            if iid != exclude and r.state in LIVE_STATES and r.host is not None:
                out.setdefault(r.host, set()).update(r.gpus or (CPU_DEVICE,))
        return {h: frozenset(d) for h, d in out.items()}

    def max_victims(self) -> int:
        return max((k for k, s in self._vnew.items() if s.items), default=0)

    # ------------------------------------------------------------------ internals

    def _touch(self, rec: InstanceRecord) -> None:
        """Its GPUs' idle victims are to be worked out again."""
        host = rec.host or ""
        cur = self._victims_dirty.get(host, set())
        if cur is not None:
            cur.update(rec.gpus)
            self._victims_dirty[host] = cur

    def _link(self, rec: InstanceRecord) -> None:
        iid, host = rec.instance_id, rec.host or ""
        self._on_host.setdefault(host, set()).add(iid)
        for g in rec.gpus:
            self._on_gpu.setdefault((host, g), set()).add(iid)
        if rec.state in _ENDED:
            self._ended.setdefault(host, set()).add(iid)
        self._of_model.setdefault(rec.model, set()).add(iid)
        if rec.state == InstanceState.DRAINING and rec.drain_for:
            self._drain_for.setdefault(rec.drain_for, set()).add(iid)
        self._claims_dirty.add(host)
        self._room_dirty.add(host)
        self._touch(rec)

    def _unlink(self, rec: InstanceRecord) -> None:
        iid, host = rec.instance_id, rec.host or ""
        self._on_host.get(host, set()).discard(iid)
        for g in rec.gpus:
            self._on_gpu.get((host, g), set()).discard(iid)
        self._ended.get(host, set()).discard(iid)
        self._of_model.get(rec.model, set()).discard(iid)
        if rec.drain_for:
            self._drain_for.get(rec.drain_for, set()).discard(iid)
        self._claims_dirty.add(host)
        self._room_dirty.add(host)
        self._touch(rec)

    def _ready_key(self, iid: str) -> tuple[float, str] | None:
        rec = self.instances.get(iid)
        if rec is None or rec.state != _READY:
            return None
        return (-_last_use(rec, self.activity.get(iid)), iid)

    def _rekeep(self, model: str, changed: str) -> None:
        """The model's keeper after `changed` (one of its instances, or one that left it)
        changed: cheap unless the keeper itself fell back."""
        cur = self._keeper.get(model)
        key = self._ready_key(changed)
        if key is not None and self.instances[changed].model != model:
            key = None
        if cur is not None and cur[1] != changed:
            if key is None or key >= cur:
                return
            new: tuple[float, str] | None = key
        elif cur is not None and key is not None and key <= cur:
            new = key
        else:
            keys = [k for i in self._of_model.get(model, ()) if (k := self._ready_key(i))]
            new = min(keys, default=None)
        if new == cur:
            return
        if new is None:
            del self._keeper[model]
        else:
            self._keeper[model] = new
        for k in (cur, new):  # the old keeper becomes a spare, the new one stops being one
            if k is not None and k[1] in self.instances:
                self._touch(self.instances[k[1]])

    def _set_reports(self, fresh: Sequence[ActivityReport]) -> None:
        old = self._reports
        if len(old) == len(fresh) and all(a is b for a, b in zip(old, fresh, strict=True)):
            return
        old_by = {r.gateway_id: r for r in old}
        new_by = {r.gateway_id: r for r in fresh}
        common = set(old_by) & set(new_by)
        same_order = [r.gateway_id for r in old if r.gateway_id in common] == [
            r.gateway_id for r in fresh if r.gateway_id in common
        ]
        affected: set[str] = set()
        if len(old_by) != len(old) or len(new_by) != len(fresh) or not same_order:
            for r in (*old, *fresh):
                affected.update(r.instances)
        else:
            for gw in old_by.keys() | new_by.keys():
                a, b = old_by.get(gw), new_by.get(gw)
                if a is b:
                    continue
                if a is None or b is None:
                    affected.update((a or b).instances)  # type: ignore[union-attr]
                    continue
                ai, bi = a.instances, b.instances
                get = ai.get
                affected.update([i for i, x in bi.items() if get(i) != x])
                affected.update([i for i in ai if i not in bi])
        self._reports = list(fresh)
        for iid in affected:
            acc: InstanceActivity | None = None
            for r in fresh:
                a = r.instances.get(iid)
                if a is not None:
                    acc = fold_activity(acc, a)
            if acc == self.activity.get(iid):
                continue
            if acc is None:
                del self.activity[iid]
            else:
                self.activity[iid] = acc
            rec = self.instances.get(iid)
            if rec is not None:
                self._touch(rec)
                self._rekeep(rec.model, iid)

    def _flush(self) -> None:
        claims, self._claims_dirty = self._claims_dirty, set()
        for host in claims:
            live = [r for r in self.on_host(host) if r.state in LIVE_STATES]
            self._claims[host] = _claims(live)
        rooms, self._room_dirty = self._room_dirty, set()
        for host in rooms:
            self._refresh_room(host)
        victims, self._victims_dirty = self._victims_dirty, {}
        for host, gpus in victims.items():
            self._refresh_victims(host, gpus)

    def _refresh_room(self, host: str) -> None:
        """A host's free room per GPU (or in RAM), as `placement._build_view` works it out,
        and its entries in the room indexes. A GPU whose free room changed has its idle
        victims' sums worked out again."""
        entries = self._entries.setdefault(host, _HostEntries())
        old = (entries.free, entries.split, entries.cpu, entries.capacity)
        h = self.hosts.get(host)
        free: dict[int, int] = {}
        if h is None:
            self.gpu_free.pop(host, None)
            self.ram_free.pop(host, None)
            self._names.pop(host, None)
            self._gpu_hosts.discard(host)
            self._mixed.discard(host)
            entries.free, entries.split, entries.cpu, entries.capacity = [], [], None, None
        else:
            gpu_claims, ram_claims = self._claims.get(host) or ({}, {})
            ended = self.records(self._ended.get(host, ()))
            gone_gpu, gone_ram = _gone_since_heartbeat([h], ended)
            free, ram = _room(h, gpu_claims, ram_claims, gone_gpu, gone_ram, self.ram_reserve_mib)
            names = {g.index: g.name for g in h.gpus}
            was = self.gpu_free.get(host, {})
            self.gpu_free[host], self.ram_free[host], self._names[host] = free, ram, names
            if free:
                self._gpu_hosts.add(host)
            else:
                self._gpu_hosts.discard(host)
            kinds = set(names.values())
            self._mixed.discard(host)
            if len(kinds) > 1:
                self._mixed.add(host)
            entries.free = [(names[i], (f, host, i)) for i, f in free.items()]
            entries.split = []
            if len(kinds) == 1 and len(free) > 1:
                [name] = kinds
                ranked = sorted(free.values(), reverse=True)
                entries.split = [
                    ((name, k), (ranked[k - 1], host)) for k in range(2, len(ranked) + 1)
                ]
            entries.cpu = (ram, host) if ram is not None else None
            entries.capacity = None
            if free:
                v = _HostView(host, False, free)
                entries.capacity = (_split_capacity(v, GPU_OVERHEAD_MIB), host)
            changed = {i for i, f in free.items() if was.get(i) != f}
            if changed and host not in self._victims_dirty:
                self._victims_dirty[host] = changed
            elif changed and self._victims_dirty[host] is not None:
                self._victims_dirty[host].update(changed)  # type: ignore[union-attr]
        self._swap_room(old, entries)
        if h is None and not entries.victims:
            self._entries.pop(host, None)

    def _swap_room(self, old: tuple, new: _HostEntries) -> None:  # type: ignore[type-arg]
        free, split, cpu, capacity = old
        if free != new.free:
            for name, e in set(free) - set(new.free):
                self._free[name].discard(e)
            for name, e in set(new.free) - set(free):
                self._free.setdefault(name, _Sorted()).add(e)
        if split != new.split:
            for key, e2 in set(split) - set(new.split):
                self._split[key].discard(e2)
            for key, e2 in set(new.split) - set(split):
                self._split.setdefault(key, _Sorted()).add(e2)
        for index, a, b in ((self._cpu, cpu, new.cpu), (self._capacity, capacity, new.capacity)):
            if a != b:
                if a is not None:
                    index.discard(a)
                if b is not None:
                    index.add(b)

    def _refresh_victims(self, host: str, gpus: set[int] | None) -> None:
        """Per GPU (of `gpus`; None: all of the host's), the instances `_evictables` takes
        as idle victims for a model that has none here when none is unsettled or its model
        queued, LRU order; and what stopping the first k of them leaves free."""
        entries = self._entries.setdefault(host, _HostEntries())
        free = self.gpu_free.get(host, {})
        names = self._names.get(host, {})
        todo = set(entries.victims) | set(free) if gpus is None else gpus
        for i in todo:
            new = None
            if i in free:
                victims: list[_Victim] = []
                for iid in self._on_gpu.get((host, i), ()):
                    r = self.instances[iid]
                    if r.state != _READY or r.model in self.keep_loaded:
                        continue
                    act = self.activity.get(iid)
                    if act is not None and act.in_flight > 0:
                        continue
                    order = _last_use(r, act) - (SPARE_FIRST if self.is_spare(iid) else 0.0)
                    mib = r.memory_mib / len(r.gpus)
                    victims += [(order, iid, mib)] * r.gpus.count(i)
                if victims:
                    victims.sort(key=lambda v: v[:2])
                    caps, orders = [], []
                    freed = 0.0
                    for order, _, mib in victims:
                        freed += mib
                        caps.append(free[i] + freed)
                        orders.append(order)
                    new = (names[i], tuple(caps), tuple(orders))
            old = entries.victims.get(i)
            if old == new:
                continue
            self._swap_victims(host, i, old, new)
            if new is None:
                del entries.victims[i]
            else:
                entries.victims[i] = new
        if host not in self.hosts and not entries.victims:
            self._entries.pop(host, None)

    def _swap_victims(
        self,
        host: str,
        i: int,
        old: tuple[str, tuple[float, ...], tuple[float, ...]] | None,
        new: tuple[str, tuple[float, ...], tuple[float, ...]] | None,
    ) -> None:
        """One GPU's entries in the victim indexes, from `old` to `new`: only the k whose
        sum or order changed (a use reported moves one victim; the ones before it stay)."""
        on, nn = old or ("", (), ()), new or ("", (), ())
        for k in range(1, max(len(on[1]), len(nn[1])) + 1):
            was = (on[0], on[1][k - 1], on[2][k - 1]) if k <= len(on[1]) else None
            now = (nn[0], nn[1][k - 1], nn[2][k - 1]) if k <= len(nn[1]) else None
            if was == now:
                continue
            if was is None or now is None or was[:2] != now[:2]:
                if was is not None:
                    self._vcap[(was[0], k)].discard((was[1], host, i))
                if now is not None:
                    self._vcap.setdefault((now[0], k), _Sorted()).add((now[1], host, i))
            if was is None or now is None or was[2] != now[2]:
                if was is not None:
                    self._vnew[k].discard((was[2], host, i))
                if now is not None:
                    self._vnew.setdefault(k, _Sorted()).add((now[2], host, i))


class ReadyRevs(dict[str, int]):
    """instance -> the KV revision of the record that said READY (the placer's `ready_rev`),
    also sorted by revision: the ones newer than a gateway has seen (unsettled) are found
    without reading them all."""

    def __init__(self) -> None:
        super().__init__()
        self._log: list[tuple[int, str]] = []  # (revision, id), sorted; stale entries too

    def __setitem__(self, iid: str, rev: int) -> None:
        super().__setitem__(iid, rev)
        insort(self._log, (rev, iid))
        if len(self._log) > 2 * len(self) + 64:
            self._log = sorted((r, i) for i, r in self.items())

    def setdefault(self, iid: str, rev: int) -> int:  # type: ignore[override]
        if iid not in self:
            self[iid] = rev
        return self[iid]

    def newer_than(self, rev: int) -> frozenset[str]:
        """Those whose READY record is newer than revision `rev`."""
        log = self._log
        return frozenset(i for r, i in log[bisect_left(log, (rev + 1,)) :] if self.get(i) == r)


# ---------------------------------------------------------------- deciding from the index


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
        """`plan.placement_activity` for these instances: a READY one of a model with
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
        """`placement._evict_one_gpu` for one host, worked out the straightforward way:
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
    """`placement._best_single` over every candidate: the index for hosts with nothing
    special about them, the straightforward scan for the few that are (`views`)."""
    binpack = ask.strategy == "binpack"
    sign = 1 if binpack else -1
    best: tuple | None = None  # type: ignore[type-arg]
    for name, s in ask.index._free.items():
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
    """`placement._split_option` over every candidate, the best by `_rank`: the general
    hosts' best is at the fewest GPUs any of them can split over."""
    need, idx = ask.need, ask.index
    binpack = ask.strategy == "binpack"
    key = _rank(ask.strategy, need.file_hosts, copies)
    options = [o for v in views if (o := _split_option(v, need, overhead))]
    top = max((k for (_, k), s in idx._split.items() if s.items), default=0)
    if need.n_layers > 0:
        top = min(top, need.n_layers)
    for k in range(2, top + 1):
        _, share = _split_share(need.memory_mib, k, overhead)
        found: tuple[int, str] | None = None
        for (name, kk), s in idx._split.items():
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
    e = _pick(ask.index._cpu.items, need.ram_mib, skip, ask.strategy == "binpack")
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
    """`placement._room_left` over every candidate: the index's largest entries, and the
    few hosts worked out one by one (`views`)."""
    idx = ask.index
    largest = [e for s in idx._free.values() if (e := _last(s.items, skip)) is not None]
    largest += [(f, v.host_id, i) for v in views for i, f in v.gpu_free.items()]
    split = [e[0] for e in [_last(idx._capacity.items, skip)] if e is not None]
    split += [_split_capacity(v, GPU_OVERHEAD_MIB) for v in views if v.gpu_free]
    ram = [e[0] for e in [_last(idx._cpu.items, skip)] if e is not None]
    ram += [v.ram_free for v in views if v.ram_free is not None]
    return RoomLeft(
        gpu_hosts=gpu_hosts,
        largest=max(largest, default=None),
        split_best=max(split, default=0),
        cpu_hosts=cpu_hosts,
        best_ram=max(ram, default=0),
    )


def _stage(ask: _Ask, k: int, skip: set[str], rejected: set[str]) -> Iterator[list[str]]:
    """The hosts of the GPUs that stopping their k least recently used idle instances makes
    room on, in groups of equal staleness of the k-th one, stalest group first, each group
    in `placement._rank` order (`skip` and `rejected` hosts left out, the latter looked up
    as it goes: the caller rejects hosts while it reads)."""
    idx = ask.index
    binpack = ask.strategy == "binpack"
    found = []
    total = 0
    for (name, kk), s in idx._vcap.items():
        if kk == k:
            lo = bisect_left(s.items, (ask.needed(name),))
            total += len(s.items) - lo
            if total <= SUFFIX_MAX:
                found.extend(s.items[lo:])
    if total == 0:
        return

    def rank(host: str, i: int) -> tuple:  # type: ignore[type-arg]
        free = idx.gpu_free[host][i]
        room = free - ask.needed(idx._names[host][i]) if binpack else -free
        away = host not in ask.need.file_hosts
        return (_beside(ask.copies, host, (i,)), away, room, host, i)

    if total <= SUFFIX_MAX:  # few: rank them all
        ranked = sorted(
            (idx._entries[h].victims[i][2][k - 1], rank(h, i)) for _, h, i in found if h not in skip
        )
        j = 0
        while j < len(ranked):
            n = 1
            while j + n < len(ranked) and ranked[j + n][0] == ranked[j][0]:
                n += 1
            yield [r[3] for _, r in ranked[j : j + n]]
            j += n
        return
    items = idx._vnew.get(k, _Sorted()).items  # many: walk them stalest first
    j = 0
    while j < len(items):
        order = items[j][0]
        group = []
        while j < len(items) and items[j][0] == order:
            _, h, i = items[j]
            j += 1
            if h not in skip and h not in rejected and _fits_after(ask, h, i, k):
                group.append(rank(h, i))
        if group:
            yield [r[3] for r in sorted(group)]


def _fits_after(ask: _Ask, host: str, i: int, k: int) -> bool:
    name, caps, _ = ask.index._entries[host].victims[i]
    return caps[k - 1] >= ask.needed(name)


def _evict_single(ask: _Ask, lost: set[str], dirty: set[str]) -> _Option | None:
    """`placement._best_with_eviction`'s single-GPU answer when it stops idle instances
    only, else None (the caller then takes the straightforward path). GPUs are taken by how
    few of their idle instances make room, then how stale the last of those is; the host of
    each is worked out exactly (`_Ask.evict_on`), and one whose best there is to drain a
    busy instance (fewer stopped) is passed over, as `_evict_one_gpu` passes over its idle
    options. Hosts whose idle instances the index does not know for this decision (`dirty`)
    are worked out one by one."""
    base = _rank(ask.strategy, ask.need.file_hosts, ask.copies)

    def key(o: _Option) -> tuple:  # type: ignore[type-arg]
        return (o.drains, len(o.evict), o.newest_evicted, base(o))

    options = [o for h in dirty for o in ask.evict_on(h) if not o.drains]
    skip = lost | dirty
    rejected: set[str] = set()
    found = False
    for k in range(1, ask.index.max_victims() + 1):
        for group in _stage(ask, k, skip, rejected):
            for host in group:
                if host in rejected:
                    continue
                best = min(ask.evict_on(host), key=key, default=None)
                if best is None or best.drains:
                    rejected.add(host)
                else:
                    options.append(best)
                    found = True
            if found:
                break
        if found:
            break
    return min(options, key=key) if options else None


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
    `plan.placement_activity` reads)."""
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


def _dirty(ask: _Ask, queues: Collection[str], unsettled: Collection[str]) -> set[str] | None:
    """Hosts whose idle victims in the index are not this decision's: an unsettled instance
    there, one of a model with requests queued (busy for placement), one of the model being
    placed (never its own victim), one drained for it, the excluded one. None: too many to
    work out one by one."""
    idx = ask.index
    if len(unsettled) > DIRTY_MAX:
        return None
    out: set[str] = set()
    ids: list[str] = [*unsettled]
    for m in (*queues, ask.need.model):  # type: ignore[misc]
        ids.extend(idx._of_model.get(m, ()))
    ids.extend(idx._drain_for.get(ask.need.model, ()))
    for iid in ids:
        r = idx.instances.get(iid)
        if r is not None and r.host is not None and r.state in _SERVING:
            out.add(r.host)
    if ask.exclude_host is not None:
        out.add(ask.exclude_host)
    return {h for h in out if h in idx.hosts}
