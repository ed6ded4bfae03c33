"""Eviction searched in the index (`placement_index`): the GPUs whose k least recently used
idle instances make room, k = 1, 2, ..., stalest first. Each host it lands on is worked out
with placement's own code (`placement_eviction._evictables`/`_evict_one_gpu`, busy
instances that may yield included), and a host whose best is a drain is passed over as
`_evict_one_gpu` does. Hosts whose idle victims differ for this decision (`_dirty`) are
worked out one by one. No I/O, no clock."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from proto.messages import InstanceState
from services.placer.placement_options import _beside, _Option, _rank
from services.placer.sorted_room import _Sorted

if TYPE_CHECKING:
    from services.placer.indexed_placement import _Ask

__all__ = ["DIRTY_MAX", "SUFFIX_MAX"]

_SERVING = (InstanceState.READY, InstanceState.DRAINING)
# At most this many GPUs qualifying at one eviction step are ranked directly; above it the
# stalest-first list is walked instead (each entry checked), which stops at the first fit.
SUFFIX_MAX = 64
# More unsettled instances than this (every READY one, when the gateways went quiet): the
# straightforward path, since every host they are on would be worked out one by one.
DIRTY_MAX = 256


def _stage(ask: _Ask, k: int, skip: set[str], rejected: set[str]) -> Iterator[list[str]]:
    """The hosts of the GPUs that stopping their k least recently used idle instances makes
    room on, in groups of equal staleness of the k-th one, stalest group first, each group
    in `placement_options._rank` order (`skip` and `rejected` hosts left out, the latter looked up
    as it goes: the caller rejects hosts while it reads)."""
    idx = ask.index
    binpack = ask.strategy == "binpack"
    found = []
    total = 0
    for (name, kk), s in idx.rooms.vcap.items():
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
    items = idx.rooms.vnew.get(k, _Sorted()).items  # many: walk them stalest first
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
