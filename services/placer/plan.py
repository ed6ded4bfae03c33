"""The placer's periodic decisions as a pure planner: a frozen `View` (plan_view.py) in,
`Action`s (actions.py) out, each with its reason (no I/O, no logging, no clock: `now` is an
argument).

`service.py` builds a View from its KV views right before each step of a pass, asks the
planner, and the executor (`executor.Executor.execute`) carries out what comes back: record
writes, commands and events, each checked against the lease there. The planner never sees
the bus, so every gate is tested with plain values (tests/test_plan.py), the way llama-swap
tests its scheduler against fake effects.

What is planned here (DESIGN.md section 9):

    hosts    plan_hosts     heartbeat older than host_lost_after -> HostLost, MarkLost
                            (one in use: its model counts as demanded, placed again now)
    drains   plan_drains    DRAINING for a model: moot -> EndDrain; past drain_timeout ->
                            EndDrain + Refuse + Hold(no new swap); drained in a group -> Stop
    retire   plan_retire    DRAINING with no model (reload, replica) drained or expired -> Stop
    advance  advance_gate   PENDING/DOWNLOADING: model removed -> Fail; host lost -> MarkLost;
                            no file -> Download (again under a new leader's epoch); past
                            downloader.timeout + 60 s -> Fail; file there -> None (the fit
                            re-check and the start stay in the executor)
    upkeep   plan_upkeep    STARTING not taken up in START_GRACE_S -> ResendStart;
                            STOPPING not done in STOP_GRACE_S -> ResendStop; READY idle past
                            its timeout, not pinned -> Stop; ended for END_RECORD_TTL_S ->
                            Purge

Demand's gates and decision are planned in `plan_demand.py`.

Timing state kept between passes lives in one `Backoff` (backoff.py), keyed by (kind, key);
the planner reads it through the View (`View.holds`), the executor updates it from outcomes.
Timing that must survive a change of leader is not kept there but read from the records
(`updated`, `drain_since`), which any leader sees.
"""

from __future__ import annotations

from proto.messages import END_STATES, LIVE_STATES, InstanceActivity, InstanceRecord, InstanceState
from services.placer.actions import (
    Action,
    Download,
    EndDrain,
    Fail,
    Hold,
    HostBack,
    HostLost,
    MarkLost,
    Purge,
    Refuse,
    ResendStart,
    ResendStop,
    Stop,
    Wait,
)
from services.placer.activity import ACTIVITY_STALE_S
from services.placer.backoff import NO_SWAP
from services.placer.idle_stops import idle_to_stop
from services.placer.placement import lost_hosts
from services.placer.plan_view import DEMAND_FRESH_S, Limits, View, placement_activity
from services.placer.turns import drain_status, reclaimed

__all__ = [
    "END_RECORD_TTL_S",
    "RESENT",
    "START_GRACE_S",
    "STOP_GRACE_S",
    "advance_gate",
    "check_start",
    "check_stop",
    "plan",
    "plan_drains",
    "plan_hosts",
    "plan_retire",
    "plan_upkeep",
]


START_GRACE_S = 15.0  # a start not acknowledged by the agent this long is resent
# A stop not reported done this long is resent: the agent's own stop takes at most its slot
# save (10 s) and the server's grace (20 s).
STOP_GRACE_S = 45.0
RESENT = " (stop resent)"
END_RECORD_TTL_S = 600.0  # stopped/lost/failed records are purged after this (failed: + backoff)
# A lost instance used this recently is placed again at once (MarkLost.replace): its clients
# are likely to ask again soon, and a gateway that has not yet seen the loss would not ask
# for a new place until its requests to the lost host had timed out.
REPLACE_USED_S = 30.0


DOWNLOAD_SLACK_S = 60.0  # a download gets downloader.timeout plus this before it fails


def plan_hosts(view: View, now: float) -> list[Action]:
    """Hosts not heard from for host_lost_after are lost, and so is every live instance on
    them. "Heard" is `view.heard` (our clock), never the heartbeat's own ts."""
    after = view.limits.host_lost_after
    lost = set(lost_hosts(list(view.hosts.values()), now, after, view.heard))
    out: list[Action] = [
        HostLost(h, f"no heartbeat for {after:.0f} s") for h in view.hosts if h in lost - view.lost
    ]
    out += [
        HostBack(h, "heard again" if h in view.hosts else "its record is gone")
        for h in sorted(view.lost - lost)
    ]
    doomed = [r for r in view.instances.values() if r.host in lost and r.state in LIVE_STATES]
    if not doomed:
        return out
    activity = view.activity(now)

    def in_use(iid: str) -> bool:
        a = activity.get(iid)
        return a is not None and (a.in_flight > 0 or now - a.last_used < REPLACE_USED_S)

    out += [MarkLost(r.instance_id, f"host {r.host} lost", in_use(r.instance_id)) for r in doomed]
    return out


def _live_models(view: View) -> set[str]:
    return {
        r.model
        for r in view.instances.values()
        if r.state in LIVE_STATES and r.host not in view.lost
    }


def _drain_wanted(view: View, target: str, now: float, live: set[str]) -> bool:
    """Whether the model a drain is for still needs the room: configured, not running
    anywhere, and with requests waiting or demand lately."""
    return (
        target in view.limits.models
        and target not in live
        and (
            target in view.queues
            or now - view.last_demand.get(target, -DEMAND_FRESH_S) < DEMAND_FRESH_S
        )
    )


def _serves_elsewhere(view: View, rec: InstanceRecord) -> bool:
    """Whether another READY instance of `rec`'s model serves its requests."""
    return any(
        r.model == rec.model and r.state == InstanceState.READY and r.instance_id != rec.instance_id
        for r in view.instances.values()
    )


def _same_group(limits: Limits, a: str, b: str) -> bool:
    ga = limits.groups.get(a, "")
    return bool(ga) and ga == limits.groups.get(b, "")


def plan_drains(view: View, now: float) -> list[Action]:
    """Drains for a waiting model: moot ones end (the instance serves again), ones past
    placer.drain_timeout are abandoned (the waiting model is refused and gets no new drain
    for another drain_timeout), drained ones of the same exclusive group just stop (a swap
    for another model stops them when it is placed)."""
    timeout = view.limits.drain_timeout
    out: list[Action] = []
    activity: dict[str, InstanceActivity] | None = None
    live = _live_models(view)  # once, not per drain: O(instances), not O(drains x instances)
    for rec in view.instances.values():
        if rec.state != InstanceState.DRAINING or not rec.drain_for:
            continue  # (no drain_for: retiring, see plan_retire)
        target = rec.drain_for
        q = view.queues.get(target)  # (none: moot, or the target's demand came by event)
        own = view.queues.get(rec.model)
        if q is not None and own is not None and reclaimed(rec, own, q.since):
            if _serves_elsewhere(view, rec):
                continue  # its other instance serves them; the drain goes on
            why = (
                f"swap cancelled: {own.waiting} request(s) for {rec.model} came as it "
                f"began to yield, as early as {target}'s; it serves them first"
            )
            out.append(EndDrain(rec.instance_id, "cancelled", why))
            continue
        status = drain_status(
            rec,
            view.reports,
            now=now,
            fresh_after=now - ACTIVITY_STALE_S,
            drain_timeout_s=timeout,
            still_wanted=_drain_wanted(view, target, now, live),
        )
        if status == "moot":
            why = (
                f"swap cancelled: {target} runs elsewhere"
                if target in live
                else f"swap cancelled: {target} no longer waits"
            )
            out.append(EndDrain(rec.instance_id, "cancelled", why))
        elif status == "expired":
            activity = view.activity(now) if activity is None else activity
            act = activity.get(rec.instance_id)
            running = act.in_flight if act is not None else 0
            why = (
                f"{rec.model} did not finish its {running} running request(s) within "
                f"placer.drain_timeout ({timeout:g} s), so {target} could not take its turn"
            )
            out.append(EndDrain(rec.instance_id, "abandoned", why))
            out.append(Hold(NO_SWAP, target, now + timeout, why))
            out.append(Refuse(target, why, timeout))
        elif status == "drained" and _same_group(view.limits, target, rec.model):
            out.append(Stop(rec.instance_id, f"yielded to {target} (exclusive group)"))
    return out


def plan_retire(view: View, now: float) -> list[Action]:
    """Retiring instances (DRAINING for no model: a reload's stale one, a replica above
    replicas.min) stop once drained, or once gateway.request_timeout has passed: their
    requests finish first, and none outlives that timeout anyway."""
    return [
        Stop(rec.instance_id, rec.reason)
        for rec in view.instances.values()
        if rec.state == InstanceState.DRAINING
        and not rec.drain_for
        and drain_status(
            rec,
            view.reports,
            now=now,
            fresh_after=now - ACTIVITY_STALE_S,
            drain_timeout_s=view.limits.request_timeout,
            still_wanted=True,
        )
        in ("drained", "expired")
    ]


def check_start(view: View, rec: InstanceRecord, now: float) -> Action | None:
    """A STARTING instance its agent never took up (lost command, placer crash): resend the
    start once START_GRACE_S has passed since the record was last written. The host's
    heartbeat listing the instance means the agent has it."""
    if rec.host in view.lost:
        return MarkLost(rec.instance_id, f"host {rec.host} lost")
    host = view.hosts.get(rec.host or "")
    if host is None or rec.instance_id in host.instances or now - rec.updated < START_GRACE_S:
        return None
    if rec.model not in view.limits.models:
        return None  # removed by a reload: plan via reload.plan, not a resend
    return ResendStart(rec.instance_id, "start resent: the agent had not taken it up")


def check_stop(view: View, rec: InstanceRecord, now: float) -> Action | None:
    """A STOPPING instance its agent never reported stopped (the command lost, or refused as
    a deposed leader's): its stop again, with a new id, every STOP_GRACE_S."""
    if rec.host in view.lost or now - rec.updated < STOP_GRACE_S:
        return None
    why = rec.reason if rec.reason.endswith(RESENT) else f"{rec.reason}{RESENT}"
    return ResendStop(rec.instance_id, why, rec.reason, f"stop-{rec.instance_id}-{int(now)}")


def plan_upkeep(view: View, now: float) -> list[Action]:
    """The end of each pass: resends of starts and stops nobody took up, idle stops, and
    the purge of records ended long ago."""
    out: list[Action] = []
    for rec in view.instances.values():
        if rec.state == InstanceState.STARTING:
            act = check_start(view, rec, now)
        elif rec.state == InstanceState.STOPPING:
            act = check_stop(view, rec, now)
        else:
            continue
        if act is not None:
            out.append(act)
    if view.activity_known(now):  # else wait until the gateways report again
        limits = view.limits
        stops = idle_to_stop(
            [r for r in view.instances.values() if r.model not in view.pinned],
            placement_activity(view, now),  # a model with requests queued is not idle
            limits.idle_timeouts,
            limits.idle_timeout,
            now,
        )
        out += [Stop(iid, why) for iid, why in stops]
    ttl = END_RECORD_TTL_S + view.limits.failure_backoff
    out += [
        Purge(r.instance_id, f"{r.state.value} for over {ttl:.0f} s")
        for r in view.instances.values()
        if r.state in END_STATES and now - r.updated > ttl
    ]
    return out


def advance_gate(view: View, rec: InstanceRecord, now: float, *, has_file: bool) -> Action | None:
    """A PENDING or DOWNLOADING instance before its start: what to do, or None when its
    file is on its host (`has_file`, from the heartbeats and the downloads just completed):
    then the service re-checks the fit with the file's header and starts it.

    A DownloadFile sent under an earlier leader's epoch is refused by the downloader as
    stale when redelivered, so a new leader sends it once more in its own epoch (a running
    download of the same file is joined, not repeated)."""
    if rec.model not in view.limits.models or rec.host is None:
        return Fail(rec.instance_id, "model removed from the config")
    if rec.host in view.lost:
        return MarkLost(rec.instance_id, f"host {rec.host} lost")
    if has_file:
        return None
    if rec.state == InstanceState.PENDING:
        return Download(rec.instance_id, "downloading", first=True)
    if view.download_epochs.get(rec.instance_id) != view.epoch:
        return Download(rec.instance_id, f"download resent in epoch {view.epoch}", first=False)
    if now - rec.updated > view.limits.download_timeout + DOWNLOAD_SLACK_S:
        return Fail(rec.instance_id, "download did not finish in time")
    return Wait(rec.model, f"{rec.instance_id} downloading on {rec.host}")


def plan(view: View, now: float) -> list[Action]:
    """Every periodic decision from one view, in the order a pass takes them. The service
    plans each step from a fresh view instead, so that a step sees what the one before it
    wrote (a host found lost makes its instances LOST before the drains are looked at)."""
    return (
        plan_hosts(view, now)
        + plan_drains(view, now)
        + plan_retire(view, now)
        + plan_upkeep(view, now)
    )
