"""The gateways' activity reports merged (pure): per instance, in-flight counts summed and
last use maxed over the reports that count now; the planner's View and the placement index
both merge them this way."""

from __future__ import annotations

from collections.abc import Iterable

from proto.messages import ActivityReport, InstanceActivity

__all__ = ["ACTIVITY_STALE_S", "fold_activity", "merge_activity"]

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
