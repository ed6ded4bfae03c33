"""The placer's decisions as a pure planner: a frozen `View` in, `Action`s out, each with its
reason (no I/O, no logging, no clock: `now` is an argument).

`service.py` builds a View from its KV views right before each step of a pass, asks the
planner, and carries out what comes back (the executor, `Placer._execute`): record writes,
commands and events, each checked against the lease there. The planner never sees the bus,
so every gate is tested with plain values (tests/test_plan.py), the way llama-swap tests its
scheduler against fake effects.

What is planned here (DESIGN.md section 9):

    hosts    plan_hosts     heartbeat older than host_lost_after -> HostLost, MarkLost
    drains   plan_drains    DRAINING for a model: moot -> EndDrain; past drain_timeout ->
                            EndDrain + Refuse + Hold(no new swap); drained in a group -> Stop
    retire   plan_retire    DRAINING with no model (reload, replica) drained or expired -> Stop
    advance  advance_gate   PENDING/DOWNLOADING: model removed -> Fail; host lost -> MarkLost;
                            no file -> Download (again under a new leader's epoch); past
                            downloader.timeout + 60 s -> Fail; file there -> None (the fit
                            re-check and the start stay in the service)
    upkeep   plan_upkeep    STARTING not taken up in START_GRACE_S -> ResendStart;
                            STOPPING not done in STOP_GRACE_S -> ResendStop; READY idle past
                            its timeout, not pinned -> Stop; ended for END_RECORD_TTL_S ->
                            Purge
    demand   demand_gate    the gates before a placement: unconfigured -> Refuse; live ->
                            nothing; a swap under way, no host yet -> Wait; failed lately ->
                            Refuse until placer.failure_backoff has passed
             plan_demand    past the gates (and the header wait, in the service): its
                            exclusive group runs -> Stop idle / Drain yieldable, Wait;
                            never fits even at rest -> Refuse; no room now -> Wait; a
                            victim not drained for it -> Drain (a swap); else Create

Timing state kept between passes lives in one `Backoff`, keyed by (kind, key); the
planner reads it through the View (`View.holds`), the executor updates it from outcomes.
Timing that must survive a change of leader is not kept there but read from the records
(`updated`, `drain_since`), which any leader sees.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proto.messages import (
    END_STATES,
    LIVE_STATES,
    ActivityReport,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.placement import (
    Need,
    NoFit,
    Placed,
    at_rest,
    idle_to_stop,
    lost_hosts,
    place,
)
from services.placer.placement_index import PlacementIndex, fold_activity, place_indexed
from services.placer.turns import (
    Waiting,
    drain_status,
    group_conflicts,
    may_yield,
    reclaimed,
)

__all__ = [
    "Action",
    "Backoff",
    "Create",
    "Download",
    "Drain",
    "EndDrain",
    "Fail",
    "Hold",
    "HostBack",
    "HostLost",
    "Limits",
    "MarkLost",
    "Purge",
    "Refuse",
    "ResendStart",
    "ResendStop",
    "Stop",
    "Try",
    "View",
    "Wait",
    "Yielding",
    "advance_gate",
    "check_start",
    "check_stop",
    "demand_gate",
    "merge_activity",
    "never_fits",
    "place_at_rest",
    "place_in",
    "plan",
    "plan_demand",
    "plan_drains",
    "plan_hosts",
    "plan_retire",
    "plan_upkeep",
    "recent_failure",
]

START_GRACE_S = 15.0  # a start not acknowledged by the agent this long is resent
# A stop not reported done this long is resent: the agent's own stop takes at most its slot
# save (10 s) and the server's grace (20 s).
STOP_GRACE_S = 45.0
RESENT = " (stop resent)"
END_RECORD_TTL_S = 600.0  # stopped/lost/failed records are purged after this (failed: + backoff)
DEMAND_FRESH_S = 5.0  # a demand event counts this long (gateways resend every 2 s)
NO_HOST_GRACE_S = 30.0  # after start, demand with no host yet waits rather than fails
ACTIVITY_STALE_S = 10.0  # a gateway report older than this is ignored (gateway gone)
NOT_CONFIGURED_RETRY_S = 60.0
DOWNLOAD_SLACK_S = 60.0  # a download gets downloader.timeout plus this before it fails
NEVER_FITS_RETRY_S = 10.0  # Retry-After for a model that cannot fit even with turns

# Backoff kinds
NO_SWAP = "no_swap"  # model -> no new drain for it before `until` (its last one was abandoned)
NO_ROOM = "no_room"  # instance -> first found without room after its file came (BUSY_WAIT_S)
INSPECT = "inspect"  # model -> its header was last asked for (INSPECT_RETRY_S)
HEADER_WAIT = "header_wait"  # model -> its demand has been held for its header since


# ---------------------------------------------------------------- per-key timing


@dataclass(frozen=True)
class Try:
    """The timing of one key: since when it has waited, how often, and until when not again."""

    since: float  # the first time (kept over later notes until the key is cleared)
    last: float  # the latest time
    until: float  # nothing of this kind for this key before this
    count: int = 1


Key = tuple[str, str]  # (kind, key)


class Backoff:
    """Per-key retry and backoff state, (kind, key) -> Try: the one place the placer keeps
    timing between passes. The executor notes outcomes; the planner reads `view()`."""

    def __init__(self) -> None:
        self._tries: dict[Key, Try] = {}

    def get(self, kind: str, key: str) -> Try | None:
        return self._tries.get((kind, key))

    def note(self, kind: str, key: str, now: float, wait: float = 0.0) -> Try:
        """Another try (or wait) for `key` at `now`, not again for `wait` seconds."""
        cur = self._tries.get((kind, key))
        t = Try(
            since=cur.since if cur is not None else now,
            last=now,
            until=now + wait,
            count=cur.count + 1 if cur is not None else 1,
        )
        self._tries[(kind, key)] = t
        return t

    def since(self, kind: str, key: str, now: float) -> float:
        """When `key` first waited: noted now if it was not waiting yet."""
        cur = self._tries.get((kind, key))
        return cur.since if cur is not None else self.note(kind, key, now).since

    def clear(self, kind: str, key: str) -> None:
        self._tries.pop((kind, key), None)

    def keys(self, kind: str) -> list[str]:
        return [k for (c, k) in self._tries if c == kind]

    def holding(self, kind: str, key: str, now: float) -> bool:
        t = self._tries.get((kind, key))
        return t is not None and now < t.until

    def prune(self, kind: str, keep: Iterable[str]) -> None:
        """Forget the keys of `kind` that are not in `keep` (instances purged, say)."""
        alive = set(keep)
        for k in [k for (c, k) in self._tries if c == kind and k not in alive]:
            del self._tries[(kind, k)]

    def view(self) -> Mapping[Key, Try]:
        return MappingProxyType(dict(self._tries))


# ---------------------------------------------------------------- what the planner sees


@dataclass(frozen=True)
class Limits:
    """The config knobs the planner reads (lls/config.py)."""

    host_lost_after: float = 10.0
    failure_backoff: float = 30.0
    drain_timeout: float = 60.0
    request_timeout: float = 600.0  # a retiring instance's requests get this long
    idle_timeout: float = 300.0  # the global one; 0 = never
    idle_timeouts: Mapping[str, float] = field(default_factory=dict)  # per model, where set
    download_timeout: float = 3600.0  # downloader.timeout
    models: frozenset[str] = frozenset()  # configured models
    groups: Mapping[str, str] = field(default_factory=dict)  # model -> exclusive group
    keep_loaded: frozenset[str] = frozenset()  # the config's keep_loaded models
    strategy: str = "binpack"  # placer.strategy
    min_turn: float = 5.0  # placer.min_turn
    max_turn: float = 30.0  # placer.max_turn
    ram_reserve_mib: int = 1024  # agent.ram_reserve_mib


def _frozen(m: Mapping) -> Mapping:  # type: ignore[type-arg]
    return m if isinstance(m, MappingProxyType) else MappingProxyType(m)


@dataclass(frozen=True)
class View:
    """What the placer knows at one moment: the KV views, the gateways' reports, the config
    and the per-key timing. Mappings are read-only proxies (and `reports` a values view)
    over the service's own dicts, where copying them would cost each step O(instances):
    planning is synchronous (no await),
    so nothing changes them while the planner reads, and the executor checks each action's
    record against its revision at planning time before acting on it."""

    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)
    hosts: Mapping[str, HostRecord] = field(default_factory=dict)
    heard: Mapping[str, float] = field(default_factory=dict)  # host -> received, our clock
    lost: frozenset[str] = frozenset()  # hosts found lost by the last plan_hosts
    reports: Collection[ActivityReport] = ()  # every gateway's last report, stale ones too
    queues: Mapping[str, Waiting] = field(default_factory=dict)  # model -> what waits (fresh)
    last_demand: Mapping[str, float] = field(default_factory=dict)  # model -> last demand
    limits: Limits = field(default_factory=Limits)
    holds: Mapping[Key, Try] = field(default_factory=dict)  # Backoff.view()
    started: float = 0.0  # when this placer started
    pinned: frozenset[str] = frozenset()  # models pinned in KV desired (`lls load --pin`)
    epoch: int = 0  # this leader's lease epoch
    download_epochs: Mapping[str, int] = field(default_factory=dict)  # DOWNLOADING -> sent in
    # READY instances some live gateway has not reported on since it saw them ready (its
    # waiting requests may be about to start there): never evicted without a drain
    unsettled: frozenset[str] = frozenset()
    # The same instances and hosts, indexed (the service keeps it): placements, and the
    # lookups by model, read it instead of scanning every instance and GPU
    index: PlacementIndex | None = None

    def __post_init__(self) -> None:
        names = ("instances", "hosts", "heard", "queues", "last_demand", "holds", "download_epochs")
        for name in names:
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def activity(self, now: float) -> dict[str, InstanceActivity]:
        return merge_activity(self.reports, now - ACTIVITY_STALE_S)

    def activity_known(self, now: float) -> bool:
        """Whether the reports tell what is in use: some are fresh, or there are none. All
        gone stale means the bus was away, not that nothing is used."""
        return not self.reports or any(r.ts >= now - ACTIVITY_STALE_S for r in self.reports)

    def live(self, model: str) -> list[InstanceRecord]:
        return [
            r for r in self.of_model(model) if r.state in LIVE_STATES and r.host not in self.lost
        ]

    def of_model(self, model: str) -> list[InstanceRecord]:
        """The model's instance records, in the view's order."""
        if self.index is not None:
            return self.index.of_model(model)
        return [r for r in self.instances.values() if r.model == model]

    def draining_for(self, model: str) -> list[InstanceRecord]:
        """Instances DRAINING to make room for `model`, in the view's order."""
        if self.index is not None:
            return self.index.draining_for(model)
        return [
            r
            for r in self.instances.values()
            if r.state == InstanceState.DRAINING and r.drain_for == model
        ]

    def fresh(self, now: float) -> list[ActivityReport]:
        """The gateways' reports that count at `now`, in the view's order."""
        return [r for r in self.reports if r.ts >= now - ACTIVITY_STALE_S]

    def indexed(self, now: float) -> PlacementIndex | None:
        """The index, brought up to the reports that count at `now` and the config."""
        if self.index is not None:
            self.index.sync(
                self.fresh(now),
                keep_loaded=self.keep_loaded(),
                ram_reserve_mib=self.limits.ram_reserve_mib,
            )
        return self.index

    def held(self, kind: str, key: str, now: float) -> bool:
        t = self.holds.get((kind, key))
        return t is not None and now < t.until

    def keep_loaded(self) -> frozenset[str]:
        """Never evicted: the config's keep_loaded models and the pinned ones."""
        return self.limits.keep_loaded | self.pinned


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


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class HostLost:
    """Newly lost: announce it (HostLost event) and count it lost from now on."""

    host: str
    reason: str


@dataclass(frozen=True)
class HostBack:
    """Heard again (or its record is gone): no longer counted lost."""

    host: str
    reason: str


@dataclass(frozen=True)
class MarkLost:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Fail:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class ResendStart:
    """Rewrite the STARTING record's reason and send its (idempotent) start again."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class ResendStop:
    """Rewrite the STOPPING record's reason and send its stop again, with a new id."""

    instance_id: str
    reason: str  # the record's new reason
    stop_reason: str  # what the StopInstance says (the reason it is stopping)
    cmd_id: str


@dataclass(frozen=True)
class Download:
    """Send the instance's DownloadFile to its host's downloader; `first`: record the
    PENDING instance DOWNLOADING first."""

    instance_id: str
    reason: str
    first: bool


@dataclass(frozen=True)
class EndDrain:
    """The instance serves again; `stage` is the swap event's ("cancelled", "abandoned")."""

    instance_id: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Refuse:
    """Tell the model's waiting requests it cannot be served now (PlacementFailed)."""

    model: str
    reason: str
    retry_after: float


@dataclass(frozen=True)
class Hold:
    """Note a backoff: nothing of `kind` for `key` before `until`."""

    kind: str
    key: str
    until: float
    reason: str


@dataclass(frozen=True)
class Purge:
    """Delete an ended record from KV (its history stays in the event stream)."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class Wait:
    """Nothing to do for the model this pass; the reason says what it waits for."""

    model: str
    reason: str


@dataclass(frozen=True)
class Drain:
    """The first step of a swap: `victims` stop taking requests for `model`'s sake
    (DRAINING, drain_for=model), and a SwapChanged("draining") tells why."""

    model: str
    victims: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Create:
    """Record a new instance of `model` PENDING where `decision` placed it, stop what it
    evicts (each drained for it already), and take its first step."""

    model: str
    need: Need
    decision: Placed
    reason: str


Action = (
    HostLost
    | HostBack
    | MarkLost
    | Stop
    | Fail
    | ResendStart
    | ResendStop
    | Download
    | EndDrain
    | Refuse
    | Hold
    | Purge
    | Wait
    | Drain
    | Create
)


# ---------------------------------------------------------------- planners


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
    out += [
        MarkLost(r.instance_id, f"host {r.host} lost")
        for r in view.instances.values()
        if r.host in lost and r.state in LIVE_STATES
    ]
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


def placement_activity(view: View, now: float) -> dict[str, InstanceActivity]:
    """The gateways' activity, where a READY instance of a model with requests queued
    counts busy even between two of them."""
    activity = view.activity(now)
    if view.queues:
        for r in view.instances.values():
            if r.state == InstanceState.READY and r.model in view.queues:
                act = activity.get(r.instance_id)
                if act is None or act.in_flight == 0:
                    activity[r.instance_id] = InstanceActivity(1, now)
    return activity


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
