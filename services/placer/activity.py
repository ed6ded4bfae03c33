"""The gateways' activity reports merged (pure): per instance, in-flight counts summed and
last use maxed over the reports that count now; the planner's View and the placement index
both merge them this way.

A gateway's report is compact (`ActivityReport.horizon` > 0): it lists only the instances
used lately, in flight or with a keep_alive, so that it stays small (a record is at most
1 MiB, and a whole list of 40,000 instances is ~3 MB, which a placer took tens of ms to
read). `ReportedUse` rebuilds from them what a whole list would say, at a cost that grows
with what changed: an instance leaves the list only once it has been idle for the horizon,
so its last entry still holds (nothing in flight, no keep_alive, its last use). Uses from
before this placer's first report of a gateway (minus its horizon) it never saw, nor any in
a gap between two reports longer than the horizon (it lagged, or was away): every instance
live then counts as last used at that horizon's start, which puts its idle stop off by up
to the horizon and never brings it forward."""

from __future__ import annotations

from collections.abc import Iterable

from msgspec.structs import replace

from proto.messages import LIVE_STATES, ActivityReport, InstanceActivity, InstanceRecord

__all__ = ["ACTIVITY_STALE_S", "ReportedUse", "fold_activity", "merge_activity"]

ACTIVITY_STALE_S = 10.0  # a gateway report older than this is ignored (gateway gone)


def fold_activity(cur: InstanceActivity | None, a: InstanceActivity) -> InstanceActivity:
    """One gateway's report of an instance folded into what the gateways before it said
    (`merge_activity`): in-flight summed, last use maxed with that request's keep_alive,
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


def merge_activity(
    reports: Iterable[ActivityReport], fresh_after: float
) -> dict[str, InstanceActivity]:
    """In-flight counts summed and last use maxed over the gateways' fresh reports; the
    latest request's keep_alive holds. A stale report's in-flight counts are void."""
    out: dict[str, InstanceActivity] = {}
    for rep in reports:
        if rep.ts < fresh_after:
            continue
        for iid, a in rep.instances.items():
            out[iid] = fold_activity(out.get(iid), a)
    return out


class ReportedUse:
    """Each gateway's use of the instances as a whole list would report it, rebuilt from its
    compact reports. `take` and `seed` say which instances' entries they changed, so that
    the placement index merges those again and nothing else."""

    def __init__(self) -> None:
        self._whole: dict[str, dict[str, InstanceActivity]] = {}  # gateway -> instance -> use
        self._floor: dict[str, float] = {}  # gateway -> its uses before this, never seen here
        self._reports: dict[str, ActivityReport] = {}  # gateway -> its report, made whole

    def take(
        self, rep: ActivityReport, known: Iterable[InstanceRecord]
    ) -> tuple[ActivityReport, set[str] | None]:
        """`rep` made whole, and the instances whose entries changed (None: any may have;
        the caller compares). `known`: the instances the placer knows now (a gateway's first
        compact report gives each live one its floor)."""
        gw = rep.gateway_id
        if rep.horizon <= 0:  # a whole list already (an older gateway)
            for d in (self._whole, self._floor, self._reports):
                d.pop(gw, None)
            return rep, None
        whole = self._whole.get(gw)
        changed: set[str] | None = set()
        prev = self._reports.get(gw)
        floor = rep.ts - rep.horizon
        if whole is None or prev is None or prev.ts < floor:
            # Its first report here, or the last one seen is older than this one's horizon
            # (this placer lagged or was away): uses before `floor` were never seen here.
            # A new dict: the old report keeps the old one, for the caller to compare.
            whole = self._whole[gw] = dict(whole or {})
            self._floor[gw] = floor
            seedling = InstanceActivity(0, floor)  # one for all (entries are never changed)
            for r in known:
                a = whole.get(r.instance_id)
                if _before(r, floor) and (a is None or a.in_flight or a.last_used < floor):
                    whole[r.instance_id] = (
                        seedling
                        if a is None or a.last_used < floor
                        else InstanceActivity(0, a.last_used)
                    )
            changed = None
        for iid, a in rep.instances.items():
            if whole.get(iid) != a:
                whole[iid] = a
                if changed is not None:
                    changed.add(iid)
        made = self._reports[gw] = replace(rep, instances=whole)
        return made, changed

    def seed(self, rec: InstanceRecord) -> dict[str, ActivityReport]:
        """An instance record arrived: if it was live before a gateway's floor and that
        gateway's rebuilt list has no entry for it, it gets the floor (as in `take`). The
        reports it changed (each changed only in `rec`'s entry)."""
        out: dict[str, ActivityReport] = {}
        for gw, floor in self._floor.items():
            whole = self._whole[gw]
            if _before(rec, floor) and rec.instance_id not in whole:
                whole[rec.instance_id] = InstanceActivity(0, floor)
                out[gw] = self._reports[gw] = replace(self._reports[gw])
        return out

    def floor(self, gateway_id: str) -> float | None:
        """Uses of the gateway's from before this were not seen here (None: a whole list)."""
        return self._floor.get(gateway_id)

    def forget(self, instance_id: str) -> None:
        """Its record is gone (purged): nothing more to keep of it."""
        for whole in self._whole.values():
            whole.pop(instance_id, None)

    def gone(self, gateway_id: str) -> None:
        for d in (self._whole, self._floor, self._reports):
            d.pop(gateway_id, None)


def _before(rec: InstanceRecord, floor: float) -> bool:
    """Live since before `floor`: a gateway may have used it before what it reported."""
    since = rec.ready_at if rec.ready_at is not None else rec.updated
    return rec.state in LIVE_STATES and since < floor
