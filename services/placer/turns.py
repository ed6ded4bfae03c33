"""Taking turns when more models are wanted than fit: pure decisions (no I/O, no logging).

When a waiting model fits only if a busy model makes room, the busy one *yields*: it is
marked DRAINING, gateways stop admitting new requests to it (they queue for its next turn),
its requests in flight finish, and it is stopped for the waiting model. The functions here
decide who waits first, who yields, and when a drain is over; the service carries it out
(`plan_demand.py` plans the drains, `executor.py` and `writes.py` act).
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
from services.placer.placement_eviction import spare_copies

__all__ = [
    "DrainStatus",
    "Waiting",
    "drain_status",
    "group_conflicts",
    "may_yield",
    "merged_queues",
    "reclaimed",
    "turn_began",
    "turn_over",
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


# A busy instance with nothing queued yields only once its busy spell is this old: a burst
# that has just begun may not show in the gateways' reports yet (they report a new queue
# within ~5 ms, but a pass can fall in between), and draining a model as its burst arrives
# sends that whole burst to wait a swap out and back.
SETTLE_S = 0.5


def turn_began(inst: InstanceRecord, act: InstanceActivity | None, queue: Waiting | None) -> float:
    """When a READY instance's current turn began: when it became ready, or when its current
    busy spell began if it sat idle in between (a model loaded earlier that a burst finds
    ready is in its turn from the burst on, not from its load). Requests queued for it with
    none yet in flight (about to be sent: it just became ready, or serves again after a
    cancelled drain) begin its turn when the oldest of them came."""
    ready_at = inst.ready_at if inst.ready_at is not None else inst.updated
    if act is not None and act.in_flight > 0:  # (an older gateway reports no busy spell)
        return ready_at if act.busy_since is None else max(ready_at, act.busy_since)
    if queue is not None and queue.waiting > 0:
        return max(ready_at, queue.since)
    return ready_at


def reclaimed(rec: InstanceRecord, own: Waiting | None, rival_since: float) -> bool:
    """Whether a drain should end because the yielding instance's own model got requests as
    old as the waiting model's: a burst that came as (or just after) an idle model was asked
    to yield. Serving it first costs no swap; swapping first sends the whole burst to wait
    a swap out and back. Requests that came later than SETTLE_S after the rival's wait
    began, or before the drain, do not reclaim it (first come, first served; a turn's cap)."""
    if own is None or own.waiting <= 0 or rec.drain_since is None:
        return False
    return rec.drain_since - SETTLE_S <= own.since <= rival_since + SETTLE_S


def turn_over(
    inst: InstanceRecord,
    act: InstanceActivity | None,
    queue: Waiting | None,
    *,
    now: float,
    min_turn_s: float,
    max_turn_s: float,
    rival_since: float,
) -> bool:
    """Whether a busy READY instance's turn is over, so that it may yield to a model whose
    oldest request has waited since `rival_since`. A turn follows the work (DESIGN.md 7):

    - nothing queued for its model: over at once (past SETTLE_S), whatever min_turn says.
      Its running requests finish in the drain, so yielding idles no GPU.
    - requests queued: it keeps the turn at least `min_turn_s` (the anti-thrash floor; it
      applies only while there is work, so it never holds a GPU idle), then until every
      request that waited for this turn has been admitted (its oldest waiter came after the
      turn began), then only while its oldest waiter is older than the rival's: first come,
      first served across models. `max_turn_s` caps a turn whatever is queued.
    """
    began = turn_began(inst, act, queue)
    served = now - began
    if queue is None or queue.waiting <= 0:
        return served >= SETTLE_S
    if served >= max_turn_s:
        return True
    if served < min_turn_s:
        return False
    return queue.since >= began and rival_since <= queue.since


def may_yield(
    instances: Sequence[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    queues: Mapping[str, Waiting],
    *,
    for_model: str,
    now: float,
    min_turn_s: float,
    keep_loaded: frozenset[str],
    max_turn_s: float = float("inf"),
    rival_since: float = float("-inf"),
    unsettled: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Busy READY instances that may drain to make room for `for_model` (whose oldest request
    has waited since `rival_since`), with their rank (lower yields first).

    Never: a `keep_loaded` model, another copy of `for_model`, or an instance whose turn is
    not over (`turn_over`: a model with nothing queued yields at once; one with requests
    queued serves those that waited for its turn first, so two models cannot thrash).
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
        if inst.model in keep_loaded or inst.instance_id in unsettled:
            continue  # (unsettled: not every gateway has told what it sends there yet)
        q = queues.get(inst.model)
        act = activity.get(inst.instance_id)
        over = turn_over(
            inst,
            act,
            q,
            now=now,
            min_turn_s=min_turn_s,
            max_turn_s=max_turn_s,
            rival_since=rival_since,
        )
        if not over:
            continue
        ready_at = inst.ready_at if inst.ready_at is not None else inst.updated
        pinned = act is not None and act.keep_alive is not None and act.keep_alive < 0
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
