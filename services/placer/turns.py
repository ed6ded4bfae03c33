"""Taking turns when more models are wanted than fit: pure decisions (no I/O, no logging).

When a waiting model fits only if a busy model makes room, the busy one *yields*: it is
marked DRAINING, gateways stop admitting new requests to it (they queue for its next turn),
its requests in flight finish, and it is stopped for the waiting model. The functions here
decide who waits first, who yields, and when a drain is over; `service.py` carries it out.
See DESIGN.md section 7 for why each rule is there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from proto.messages import (
    LIVE_STATES,
    ActivityReport,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.placement import spare_copies

__all__ = [
    "DrainStatus",
    "Waiting",
    "drain_status",
    "group_conflicts",
    "may_yield",
    "merged_queues",
    "waiting_order",
]

DrainStatus = Literal["drained", "draining", "expired", "moot"]


@dataclass(frozen=True)
class Waiting:
    """Requests waiting for a model, summed over gateways."""

    waiting: int
    since: float  # when the oldest of them began to wait


def merged_queues(reports: Iterable[ActivityReport], fresh_after: float) -> dict[str, Waiting]:
    """What waits per model across gateways whose report is newer than `fresh_after`."""
    out: dict[str, Waiting] = {}
    for rep in reports:
        if rep.ts < fresh_after:
            continue
        for model, q in rep.queues.items():
            if q.waiting <= 0:
                continue
            cur = out.get(model)
            out[model] = (
                Waiting(q.waiting, q.since)
                if cur is None
                else Waiting(cur.waiting + q.waiting, min(cur.since, q.since))
            )
    return out


def waiting_order(demanded: Mapping[str, float], queues: Mapping[str, Waiting]) -> list[str]:
    """Models to place, the one whose oldest request has waited longest first.

    `demanded` maps a model to when demand for it last arrived (events, preload, CLI); a
    model only in `queues` (a report newer than any demand event) counts too. First come,
    first served across models is what bounds each model's wait while others take turns.
    """
    models = set(demanded) | set(queues)

    def key(m: str) -> tuple[float, str]:
        q = queues.get(m)
        return (q.since if q is not None else demanded[m], m)

    return sorted(models, key=key)


def may_yield(
    instances: Sequence[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    queues: Mapping[str, Waiting],
    *,
    for_model: str,
    now: float,
    min_turn_s: float,
    keep_loaded: frozenset[str],
) -> dict[str, float]:
    """Busy READY instances that may drain to make room for `for_model`, with their rank
    (lower yields first).

    Never: a `keep_loaded` model, another copy of `for_model`, or an instance that has been
    ready for less than `min_turn_s` (its turn: the requests that waited for it get served
    before it can be swapped out again, so two models cannot thrash).
    Order: spare copies of a model (replicas; the model keeps serving) before any model's
    last instance, then models with fewer requests waiting (they lose least), then the one
    whose turn began earliest, and those an Ollama client asked to keep (keep_alive < 0)
    last of all.
    """
    ranked: list[tuple[tuple[float, ...], str]] = []
    spares = spare_copies(instances, activity)
    for inst in instances:
        if inst.state != InstanceState.READY or inst.model == for_model:
            continue
        if inst.model in keep_loaded:
            continue
        ready_at = inst.ready_at if inst.ready_at is not None else inst.updated
        if now - ready_at < min_turn_s:
            continue
        act = activity.get(inst.instance_id)
        pinned = act is not None and act.keep_alive is not None and act.keep_alive < 0
        q = queues.get(inst.model)
        last = inst.instance_id not in spares
        waiting = float(q.waiting if q else 0)
        ranked.append(((float(pinned), float(last), waiting, ready_at), inst.instance_id))
    ranked.sort()
    return {iid: float(n) for n, (_, iid) in enumerate(ranked)}


def drain_status(
    rec: InstanceRecord,
    reports: Iterable[ActivityReport],
    *,
    now: float,
    fresh_after: float,
    drain_timeout_s: float,
    still_wanted: bool,
) -> DrainStatus:
    """Where a DRAINING instance stands.

    drained:  every live gateway has seen the drain (lists it in `draining`, so it admits
              nothing new) and has no request in flight on it. A gateway that has not yet
              seen it could still send one, so its silence does not count as done.
    moot:     the model it yields to no longer needs the room (its requests left, or it
              was placed elsewhere): the instance goes back to serving.
    expired:  requests still run after `drain_timeout_s`: the swap is abandoned rather than
              cutting them off.
    """
    if not still_wanted:
        return "moot"
    pending = False
    for rep in reports:
        if rep.ts < fresh_after:
            continue  # a gateway gone quiet holds nothing (its in-flight counts are void)
        act = rep.instances.get(rec.instance_id)
        if rec.instance_id not in rep.draining or (act is not None and act.in_flight > 0):
            pending = True
            break
    if not pending:
        return "drained"
    since = rec.drain_since if rec.drain_since is not None else rec.updated
    return "expired" if now - since >= drain_timeout_s else "draining"


def group_conflicts(
    model: str, groups: Mapping[str, str], instances: Iterable[InstanceRecord]
) -> list[InstanceRecord]:
    """Live instances of other models in `model`'s exclusive group (at most one runs)."""
    group = groups.get(model)
    if not group:
        return []
    return [
        r
        for r in instances
        if r.model != model and groups.get(r.model) == group and r.state in LIVE_STATES
    ]
