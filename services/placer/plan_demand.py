"""What demand for a model decides, as a pure planner (no I/O, no logging, no clock):
`demand_gate` (the gates before a placement) and `plan_demand` (past them: the exclusive
group makes way, then the placement over the View: refuse, wait, drain for a swap, or
create), with the placements they share with the service (`place_in`, `place_at_rest`).

    demand   demand_gate    unconfigured -> Refuse; live -> nothing; a swap under way, no
                            host yet -> Wait; failed lately -> Refuse until
                            placer.failure_backoff has passed
             plan_demand    past the gates (and the header wait, in the service): its
                            exclusive group runs -> Stop idle / Drain yieldable, Wait;
                            never fits even at rest -> Refuse; no room now -> Wait; a
                            victim not drained for it -> Drain (a swap); else Create
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from proto.messages import LIVE_STATES, InstanceActivity, InstanceRecord, InstanceState
from services.placer.actions import Action, Create, Drain, Refuse, Stop, Wait
from services.placer.activity import ACTIVITY_STALE_S
from services.placer.backoff import NO_SWAP
from services.placer.indexed_placement import place_indexed
from services.placer.placement import Need, NoFit, Placed, at_rest, place
from services.placer.plan_view import View, placement_activity
from services.placer.turns import drain_status, group_conflicts, may_yield

__all__ = [
    "NEVER_FITS_RETRY_S",
    "NO_HOST_GRACE_S",
    "Yielding",
    "demand_gate",
    "never_fits",
    "place_at_rest",
    "place_in",
    "plan_demand",
    "recent_failure",
]


NO_HOST_GRACE_S = 30.0  # after start, demand with no host yet waits rather than fails


NOT_CONFIGURED_RETRY_S = 60.0


NEVER_FITS_RETRY_S = 10.0  # Retry-After for a model that cannot fit even with turns


def recent_failure(
    instances: Iterable[InstanceRecord], model: str, now: float, backoff_s: float
) -> InstanceRecord | None:
    """The model's latest FAILED record within placer.failure_backoff, if any."""
    fails = [
        r
        for r in instances
        if r.model == model and r.state == InstanceState.FAILED and now - r.updated < backoff_s
    ]
    return max(fails, key=lambda r: r.updated) if fails else None


def demand_gate(view: View, model: str, now: float) -> Action | None:
    """The gates demand for `model` passes before anything is placed: None to go on to the
    placement (header, exclusive group, place), else what to do instead."""
    if model not in view.limits.models:
        return Refuse(model, f"model {model!r} is not configured", NOT_CONFIGURED_RETRY_S)
    if view.live(model):
        return Wait(model, "it has a live instance")
    for r in view.draining_for(model):
        status = drain_status(
            r,
            view.reports,
            now=now,
            fresh_after=now - ACTIVITY_STALE_S,
            drain_timeout_s=view.limits.drain_timeout,
            still_wanted=True,
        )
        if status != "drained":
            return Wait(model, f"{r.instance_id} is draining for it")
    backoff = view.limits.failure_backoff
    failed = recent_failure(view.of_model(model), model, now, backoff)
    if failed is not None:
        wait = failed.updated + backoff - now
        return Refuse(
            model,
            f"{model} failed to start {now - failed.updated:.0f} s ago ({failed.reason}); "
            f"not retried for another {wait:.0f} s",
            wait,
        )
    if not view.hosts and now - view.started < NO_HOST_GRACE_S:
        return Wait(model, "no host has reported yet")  # agents may still be starting
    return None


def place_in(
    view: View,
    need: Need,
    now: float,
    *,
    exclude: str | None = None,
    may_drain: Mapping[str, float] | None = None,
    may_evict: bool = True,
) -> Placed | NoFit:
    """The pure placement (`placement.place`) over what the view holds: from its index
    where the view has one and the index can tell (`placement_index.place_indexed`, the
    same answer), else by scanning every instance and GPU."""
    lim = view.limits
    # Memory unknown until the file's header is read: fetch where the most is free, so
    # the re-check after the download most likely fits on that same host.
    strategy = lim.strategy if need.memory_mib else "spread"
    if view.index is not None:
        fast = place_indexed(
            view.index,
            view.hosts,
            need,
            now=now,
            fresh=view.fresh(now),
            queues=view.queues,
            strategy=strategy,
            host_lost_after=lim.host_lost_after,
            heard=view.heard,
            ram_reserve_mib=lim.ram_reserve_mib,
            keep_loaded=view.keep_loaded(),
            may_drain=may_drain,
            unsettled=view.unsettled,
            may_evict=may_evict,
            exclude=exclude,
        )
        if fast is not None:
            return fast
    if isinstance(may_drain, Yielding):
        may_drain = may_drain.full()
    instances = [r for r in view.instances.values() if r.instance_id != exclude]
    return place(
        list(view.hosts.values()),
        instances,
        placement_activity(view, now),
        need,
        now=now,
        strategy=strategy,
        host_lost_after=lim.host_lost_after,
        heard=view.heard,
        ram_reserve_mib=lim.ram_reserve_mib,
        keep_loaded=view.keep_loaded(),
        may_drain=may_drain,
        unsettled=view.unsettled,
        may_evict=may_evict,
    )


def place_at_rest(view: View, need: Need, now: float) -> Placed | NoFit:
    """Where `need` goes once every model that may yield has stopped."""
    keep = view.keep_loaded()
    fixed = [
        r
        for r in view.instances.values()
        if r.state in LIVE_STATES and r.model in keep and r.model != need.model
    ]
    lim = view.limits
    return place(
        at_rest(list(view.hosts.values())),
        fixed,
        {},
        need,
        now=now,
        strategy=lim.strategy,
        host_lost_after=lim.host_lost_after,
        heard=view.heard,
        ram_reserve_mib=lim.ram_reserve_mib,
        keep_loaded=keep,
    )


def never_fits(view: View, need: Need, now: float) -> str | None:
    """Why `need` cannot fit even with every model that may yield stopped, or None when
    it can once others take their turn (then it waits instead of being refused)."""
    decision = place_at_rest(view, need, now)
    if isinstance(decision, NoFit):
        return decision.reason + (
            "; this holds even with every model that can yield stopped, so it never fits"
        )
    return None


def may_drain(view: View, model: str, now: float) -> Mapping[str, float]:
    """Busy READY instances that may yield to `model` now, ranked (pure `turns.may_yield`):
    their turn is over against `model`'s oldest waiting request (or its last demand). Over
    an indexed view, worked out only for the instances asked about (`Yielding`)."""
    if view.index is not None:
        return Yielding(view, model, now)
    return _may_yield(view, list(view.instances.values()), view.activity(now), model, now)


def _may_yield(
    view: View,
    instances: list[InstanceRecord],
    activity: Mapping[str, InstanceActivity],
    model: str,
    now: float,
) -> dict[str, float]:
    q = view.queues.get(model)
    rival = q.since if q is not None else view.last_demand.get(model, now)
    return may_yield(
        instances,
        activity,
        view.queues,
        for_model=model,
        now=now,
        min_turn_s=view.limits.min_turn,
        max_turn_s=view.limits.max_turn,
        rival_since=rival,
        keep_loaded=view.keep_loaded(),
        unsettled=view.unsettled,
    )


class Yielding(Mapping[str, float]):
    """`may_drain` over an indexed view. `ranks_for` asks `turns.may_yield` about a few
    instances only, with each of their models' most recently used READY instance beside
    them (which copies are spare depends on it): their ranks keep the whole ranking's
    order, and that order is all placement compares. Read as a whole mapping, it is the
    whole ranking (`full`, computed once)."""

    def __init__(self, view: View, model: str, now: float) -> None:
        self.view, self.model, self.now = view, model, now
        self._full: dict[str, float] | None = None

    def ranks_for(self, ids: Iterable[str]) -> dict[str, float]:
        index = self.view.indexed(self.now)
        assert index is not None
        wanted = {i for i in ids if i in index.instances}
        keepers = {k for i in wanted if (k := index.keeper(index.instances[i].model))}
        recs = index.records(wanted | keepers)
        ranks = _may_yield(self.view, recs, index.activity, self.model, self.now)
        return {i: r for i, r in ranks.items() if i in wanted}

    def full(self) -> dict[str, float]:
        if self._full is None:
            v = self.view
            self._full = _may_yield(
                v, list(v.instances.values()), v.activity(self.now), self.model, self.now
            )
        return self._full

    def __contains__(self, iid: object) -> bool:
        return isinstance(iid, str) and iid in self.ranks_for([iid])

    def __getitem__(self, iid: str) -> float:
        return self.full()[iid]

    def __iter__(self) -> Iterator[str]:
        return iter(self.full())

    def __len__(self) -> int:
        return len(self.full())


def _yields_now(view: View, iid: str, model: str, now: float) -> bool:
    """Whether an instance in `model`'s way has drained for it and may stop now."""
    rec = view.instances.get(iid)
    return (
        rec is not None
        and rec.state == InstanceState.DRAINING
        and rec.drain_for == model
        and drain_status(
            rec,
            view.reports,
            now=now,
            fresh_after=now - ACTIVITY_STALE_S,
            drain_timeout_s=view.limits.drain_timeout,
            still_wanted=True,
        )
        == "drained"
    )


def make_way_in_group(view: View, model: str, now: float) -> list[Action] | None:
    """None when no other model of `model`'s exclusive group runs; else each READY one is
    stopped if idle, asked to yield if its turn is over, and otherwise waited for (starting,
    stopping or yielding ones too), and `model` waits."""
    groups = view.limits.groups
    conflicts = group_conflicts(model, groups, view.instances.values())
    if not conflicts:
        return None
    activity = view.activity(now)
    yieldable = may_drain(view, model, now)
    group = groups[model]
    out: list[Action] = []
    for rec in conflicts:
        if rec.state != InstanceState.READY:
            continue
        act = activity.get(rec.instance_id)
        if act is None or act.in_flight == 0:
            out.append(Stop(rec.instance_id, f"exclusive group {group}: {model} is wanted"))
        elif rec.instance_id in yieldable:
            why = f"yielding to {model} (exclusive group {group})"
            out.append(Drain(model, (rec.instance_id,), why))
    others = ", ".join(sorted({r.model for r in conflicts}))
    out.append(Wait(model, f"exclusive group {group}: {others} go first"))
    return out


def plan_demand(view: View, model: str, need: Need, now: float) -> list[Action]:
    """Demand for `model` past `demand_gate` (and its header wait, in the service): the
    exclusive group makes way first; then the placement, which may count on busy models
    yielding (no new drain while a NO_SWAP hold stands). Never fits even with every model
    that may yield stopped -> Refuse; no room now -> Wait (the requests' own deadlines bound
    it); an instance in the way not yet drained for it -> Drain (a swap; idle ones drain
    too: only the gateways know for sure that nothing is in flight on it); else Create."""
    group = make_way_in_group(view, model, now)
    if group is not None:
        return group
    yieldable = {} if view.held(NO_SWAP, model, now) else may_drain(view, model, now)
    decision = place_in(view, need, now, may_drain=yieldable)
    if isinstance(decision, NoFit):
        never = never_fits(view, need, now)
        if never is not None:  # (a lost host may come back: retry soon, not never)
            return [Refuse(model, never, NEVER_FITS_RETRY_S)]
        return [Wait(model, decision.reason)]
    if any(not _yields_now(view, iid, model, now) for iid in decision.evict):
        victims = tuple(
            iid
            for iid in decision.evict
            if (v := view.instances.get(iid)) is not None and v.state == InstanceState.READY
        )
        return [Drain(model, victims, f"yielding to {model}, which waits: {decision.reason}")]
    return [Create(model, need, decision, decision.reason)]
