"""Indexes that let `placement.place` decide in well under a millisecond on a big cluster,
with the same answer (DESIGN.md "Cost").

`place` scans every GPU and every instance on each decision: O(hosts x GPUs + instances),
27 ms at 1,000 hosts x 8 GPUs with 33k instances, 123 ms when it evicts. `PlacementIndex`
keeps what those scans compute, updated as records change (the service feeds it from its KV
watches), and `indexed_placement.place_indexed` answers from it:

- free room per GPU (`placement_room.host_room`, per host), sorted per GPU name
  (`sorted_room.SortedRoom`): the best single GPU is a bisection, the split tier one per GPU
  count, the CPU tier one more;
- the merged gateway activity (`activity.merge_activity`, kept per instance as reports
  change) and each model's most recently used READY instance (the one that is not a spare
  copy);
- per GPU its idle eviction victims in LRU order, with what the first k of them free and
  how recently the k-th was used, sorted per k: eviction (`indexed_eviction`) searches the
  GPUs whose first k victims make room, stalest first.

Everything here is deterministic, with no I/O and no clock; the decisions stay pure: the
index is an input, and `sync` only brings derived state up to date with the view it is
asked about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from proto.messages import (
    LIVE_STATES,
    ActivityReport,
    FileInfo,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.activity import fold_activity
from services.placer.memory import GPU_OVERHEAD_MIB
from services.placer.placement_eviction import SPARE_FIRST, _last_use
from services.placer.placement_options import CPU_DEVICE
from services.placer.placement_room import _claims, _gone_since_heartbeat, _HostView, _room
from services.placer.placement_sentences import _split_capacity
from services.placer.sorted_room import SortedRoom, _HostEntries

__all__ = ["PlacementIndex"]

_READY = InstanceState.READY
_ENDED = (InstanceState.STOPPED, InstanceState.FAILED)  # (`_gone_since_heartbeat` reads them)

# One idle eviction victim on one GPU: (order, instance id, MiB it frees there), where order
# is placement's: last use, less SPARE_FIRST for a spare copy.
_Victim = tuple[float, str, float]


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
        self.rooms = SortedRoom()  # the sorted entries a placement searches
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

    def set_reports(
        self, fresh: Sequence[ActivityReport], changed: Mapping[str, set[str]] | None = None
    ) -> None:
        """The merged activity to be of `fresh` (the gateways' reports that count now, in the
        view's order): only the instances whose entries changed are merged again. `changed`:
        for a gateway whose report changed, those instances (activity.ReportedUse knows
        them; its reports change in place), instead of comparing every entry."""
        self._set_reports(fresh, changed or {})
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
        """The model's READY instance that is not a spare copy
        (`placement_eviction.spare_copies`)."""
        k = self._keeper.get(model)
        return k[1] if k is not None else None

    def is_spare(self, iid: str) -> bool:
        rec = self.instances.get(iid)
        if rec is None or rec.state != _READY:
            return False
        k = self._keeper.get(rec.model)
        return k is not None and k[1] != iid

    def copies(self, model: str, exclude: str | None) -> dict[str, frozenset[int]]:
        """`placement_options._copies` over the instances but `exclude`."""
        out: dict[str, set[int]] = {}
        for iid in self._of_model.get(model, ()):
            r = self.instances[iid]
            if iid != exclude and r.state in LIVE_STATES and r.host is not None:
                out.setdefault(r.host, set()).update(r.gpus or (CPU_DEVICE,))
        return {h: frozenset(d) for h, d in out.items()}

    def max_victims(self) -> int:
        return max((k for k, s in self.rooms.vnew.items() if s.items), default=0)

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

    def _set_reports(
        self, fresh: Sequence[ActivityReport], changed: Mapping[str, set[str]] | None = None
    ) -> None:
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
                if changed and gw in changed:
                    affected.update(changed[gw])
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
        """A host's free room per GPU (or in RAM), as `placement_room._build_view` works it out,
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
        self.rooms.swap_room(old, entries)
        if h is None and not entries.victims:
            self._entries.pop(host, None)

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
            self.rooms.swap_victims(host, i, old, new)
            if new is None:
                del entries.victims[i]
            else:
                entries.victims[i] = new
        if host not in self.hosts and not entries.victims:
            self._entries.pop(host, None)
