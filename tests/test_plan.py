"""The placer's planner (services/placer/plan.py) with plain values: every gate of the
periodic steps and of demand before a placement, and the per-key Backoff. One test runs the
executor against a real NATS server: an action whose record changed since planning is not
carried out."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest

import proto
from lls.bus import Bus, new_id
from lls.config import parse
from lls.service import ServiceContext
from proto import (
    ActivityReport,
    GpuInfo,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.actions import (
    Create,
    Download,
    Drain,
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
from services.placer.activity import merge_activity
from services.placer.backoff import NO_ROOM, NO_SWAP, Backoff
from services.placer.placement import Need, Placed
from services.placer.plan import (
    END_RECORD_TTL_S,
    START_GRACE_S,
    STOP_GRACE_S,
    advance_gate,
    plan,
    plan_drains,
    plan_hosts,
    plan_retire,
    plan_upkeep,
)
from services.placer.plan_demand import (
    NEVER_FITS_RETRY_S,
    NO_HOST_GRACE_S,
    demand_gate,
    plan_demand,
)
from services.placer.plan_view import Limits, View
from services.placer.turns import Waiting

S = InstanceState
NOW = 100_000.0
LIM = Limits(
    host_lost_after=10.0,
    failure_backoff=30.0,
    drain_timeout=60.0,
    request_timeout=600.0,
    idle_timeout=300.0,
    models=frozenset({"m", "n", "g1", "g2"}),
    groups={"g1": "big", "g2": "big"},
)


def host(hid: str, ts: float = NOW, instances: tuple[str, ...] = ()) -> HostRecord:
    return HostRecord(
        host_id=hid,
        ts=ts,
        started_at=0.0,
        runtime="process",
        gpus=[],
        cpu_count=2,
        ram_total_mib=4096,
        ram_free_mib=4096,
        instances=list(instances),
    )


def inst(
    iid: str,
    state: InstanceState = S.READY,
    *,
    model: str = "m",
    on: str = "h1",
    updated: float = NOW,
    **kw: object,
) -> InstanceRecord:
    return InstanceRecord(
        instance_id=iid, model=model, state=state, created=updated, updated=updated, host=on,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def report(
    ts: float = NOW,
    *,
    busy: dict[str, int] | None = None,
    draining: tuple[str, ...] = (),
    used: dict[str, float] | None = None,
    keep_alive: float | None = None,
) -> ActivityReport:
    acts = {i: InstanceActivity(n, ts) for i, n in (busy or {}).items()}
    for i, at in (used or {}).items():
        acts[i] = InstanceActivity(0, at, keep_alive)
    return ActivityReport(gateway_id=new_id(), ts=ts, instances=acts, draining=list(draining))


def view(*recs: InstanceRecord, **kw: object) -> View:
    hosts = kw.pop("hosts", {"h1": host("h1"), "h2": host("h2")})
    heard = kw.pop("heard", {h: NOW for h in hosts})  # type: ignore[union-attr]
    return View(
        instances={r.instance_id: r for r in recs},
        hosts=hosts,  # type: ignore[arg-type]
        heard=heard,  # type: ignore[arg-type]
        limits=kw.pop("limits", LIM),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- lost hosts


def test_a_host_is_lost_only_past_host_lost_after_on_our_clock() -> None:
    hosts = {"h1": host("h1"), "h2": host("h2", ts=NOW - 3600)}  # h2's own clock is off
    at_limit = view(hosts=hosts, heard={"h1": NOW - 10.0, "h2": NOW})
    assert plan_hosts(at_limit, NOW) == []
    past = view(
        inst("a", on="h1"),
        inst("b", S.STARTING, on="h1"),
        inst("c", S.STOPPING, on="h1"),  # not live: left to its stop (LOST only from live)
        inst("d", S.STOPPED, on="h1"),
        inst("e", on="h2"),
        hosts=hosts,
        heard={"h1": NOW - 10.5, "h2": NOW},
    )
    assert plan_hosts(past, NOW) == [
        HostLost("h1", "no heartbeat for 10 s"),
        MarkLost("a", "host h1 lost"),
        MarkLost("b", "host h1 lost"),
    ]


def test_a_host_already_lost_is_announced_once_and_one_heard_again_is_back() -> None:
    v = view(inst("a", on="h1"), heard={"h1": NOW - 60, "h2": NOW}, lost=frozenset({"h1"}))
    assert plan_hosts(v, NOW) == [MarkLost("a", "host h1 lost")]  # a write that failed: again
    back = view(lost=frozenset({"h1", "gone"}))
    assert plan_hosts(back, NOW) == [
        HostBack("gone", "its record is gone"),
        HostBack("h1", "heard again"),
    ]


def test_a_lost_instance_in_use_is_placed_again_and_an_idle_one_is_not() -> None:
    """Serving when its host was lost (requests in flight, or used within REPLACE_USED_S):
    its model is demanded at once, not when a gateway that missed the loss gives up on it."""
    v = view(
        inst("busy", on="h1"),
        inst("recent", model="n", on="h1"),
        inst("idle", model="o", on="h1"),
        inst("unknown", model="p", on="h1"),
        heard={"h1": NOW - 60, "h2": NOW},
        lost=frozenset({"h1"}),
        reports=[report(busy={"busy": 2}, used={"recent": NOW - 5, "idle": NOW - 120})],
    )
    assert plan_hosts(v, NOW) == [
        MarkLost("busy", "host h1 lost", replace=True),
        MarkLost("recent", "host h1 lost", replace=True),
        MarkLost("idle", "host h1 lost"),
        MarkLost("unknown", "host h1 lost"),
    ]


# ---------------------------------------------------------------- drains for a waiting model


def draining(iid: str = "a", *, model: str = "m", for_: str = "n", since: float = NOW - 5):
    return inst(iid, S.DRAINING, model=model, drain_for=for_, drain_since=since)


def test_a_drain_whose_model_no_longer_waits_or_runs_elsewhere_ends() -> None:
    assert plan_drains(view(draining()), NOW) == [
        EndDrain("a", "cancelled", "swap cancelled: n no longer waits")
    ]
    placed = view(
        draining(), inst("b", S.STARTING, model="n", on="h2"), queues={"n": Waiting(2, NOW)}
    )
    assert plan_drains(placed, NOW) == [
        EndDrain("a", "cancelled", "swap cancelled: n runs elsewhere")
    ]
    unconfigured = view(draining(for_="x"), queues={"x": Waiting(1, NOW)})
    assert [type(a) for a in plan_drains(unconfigured, NOW)] == [EndDrain]


def test_a_drain_is_wanted_while_requests_wait_or_demand_is_fresh() -> None:
    gw = report(draining=(), busy={"a": 1})  # this gateway has not seen the drain yet
    queued = view(draining(), queues={"n": Waiting(1, NOW - 2)}, reports=(gw,))
    assert plan_drains(queued, NOW) == []
    demanded = view(draining(), last_demand={"n": NOW - 4.9}, reports=(gw,))
    assert plan_drains(demanded, NOW) == []
    stale_demand = view(draining(), last_demand={"n": NOW - 5.0}, reports=(gw,))
    assert [a.stage for a in plan_drains(stale_demand, NOW)] == ["cancelled"]  # type: ignore[union-attr]


def test_a_drain_is_reclaimed_by_its_models_burst_as_old_as_the_waiting_ones() -> None:
    """m (idle, so asked to yield to n) gets 42 requests in the same instant as n's: it
    serves them first (no swap out and back); its other ready copy would serve them instead."""
    gw = report(draining=("a",))
    burst = {"n": Waiting(50, NOW - 0.3), "m": Waiting(42, NOW - 0.25)}
    v = view(draining(since=NOW - 0.3), queues=burst, reports=(gw,))
    [act] = plan_drains(v, NOW)
    assert isinstance(act, EndDrain) and act.stage == "cancelled"
    assert "42 request(s) for m came as it began to yield" in act.reason
    later = {"n": Waiting(50, NOW - 9), "m": Waiting(3, NOW - 0.25)}  # n waited far longer
    assert plan_drains(view(draining(since=NOW - 0.3), queues=later, reports=(gw,)), NOW) == []
    copy = inst("c", model="m", ready_at=NOW - 60)
    assert (
        plan_drains(view(draining(since=NOW - 0.3), copy, queues=burst, reports=(gw,)), NOW) == []
    )


def test_a_drain_past_drain_timeout_is_abandoned_refused_and_held() -> None:
    gw = report(busy={"a": 2}, draining=("a",))
    within = view(draining(since=NOW - 59.9), queues={"n": Waiting(1, NOW)}, reports=(gw,))
    assert plan_drains(within, NOW) == []
    past = view(draining(since=NOW - 60), queues={"n": Waiting(1, NOW)}, reports=(gw,))
    why = (
        "m did not finish its 2 running request(s) within placer.drain_timeout (60 s), "
        "so n could not take its turn"
    )
    assert plan_drains(past, NOW) == [
        EndDrain("a", "abandoned", why),
        Hold(NO_SWAP, "n", NOW + 60, why),
        Refuse("n", why, 60.0),
    ]


def test_a_drained_instance_stops_here_only_for_its_exclusive_group() -> None:
    gw = report(draining=("a",))  # seen, nothing in flight: drained
    other = view(draining(), queues={"n": Waiting(1, NOW)}, reports=(gw,))
    assert plan_drains(other, NOW) == []  # the placement of n stops it, as an eviction
    group = view(draining(model="g1", for_="g2"), queues={"g2": Waiting(1, NOW)}, reports=(gw,))
    assert plan_drains(group, NOW) == [Stop("a", "yielded to g2 (exclusive group)")]
    # a gateway gone quiet holds nothing: its report does not keep the drain pending
    quiet = report(ts=NOW - 11, busy={"a": 3})
    late = view(
        draining(model="g1", for_="g2"), queues={"g2": Waiting(1, NOW)}, reports=(gw, quiet)
    )
    assert plan_drains(late, NOW) == [Stop("a", "yielded to g2 (exclusive group)")]


# ---------------------------------------------------------------- retiring


def test_a_retiring_instance_stops_once_drained_or_past_request_timeout() -> None:
    rec = inst("r", S.DRAINING, drain_since=NOW - 10, reason="m's config changed")
    assert plan_retire(view(rec, reports=(report(draining=("r",)),)), NOW) == [
        Stop("r", "m's config changed")
    ]
    busy = report(busy={"r": 1}, draining=("r",))
    assert plan_retire(view(rec, reports=(busy,)), NOW) == []
    old = inst("r", S.DRAINING, drain_since=NOW - 600, reason="replica idle")
    assert plan_retire(view(old, reports=(busy,)), NOW) == [Stop("r", "replica idle")]
    assert plan_retire(view(draining("d")), NOW) == []  # a drain for a model: plan_drains


# ---------------------------------------------------------------- starts and stops resent


def test_a_start_not_taken_up_is_resent_after_start_grace() -> None:
    young = inst("s", S.STARTING, updated=NOW - START_GRACE_S + 0.1)
    assert plan_upkeep(view(young), NOW) == []
    old = inst("s", S.STARTING, updated=NOW - START_GRACE_S)
    resend = ResendStart("s", "start resent: the agent had not taken it up")
    assert plan_upkeep(view(old), NOW) == [resend]
    taken = {"h1": host("h1", instances=("s",))}  # its agent lists it: it has it
    assert plan_upkeep(view(old, hosts=taken), NOW) == []
    assert plan_upkeep(view(old, hosts={}), NOW) == []  # no host record: nobody to ask
    removed = inst("s", S.STARTING, model="x", updated=NOW - 60)
    assert plan_upkeep(view(removed), NOW) == []
    lost = view(old, lost=frozenset({"h1"}))
    assert plan_upkeep(lost, NOW) == [MarkLost("s", "host h1 lost")]


def test_a_stop_not_done_is_resent_every_stop_grace_with_a_new_id() -> None:
    young = inst("t", S.STOPPING, updated=NOW - STOP_GRACE_S + 0.1, reason="idle for 5m")
    assert plan_upkeep(view(young), NOW) == []
    old = inst("t", S.STOPPING, updated=NOW - STOP_GRACE_S, reason="idle for 5m")
    assert plan_upkeep(view(old), NOW) == [
        ResendStop("t", "idle for 5m (stop resent)", "idle for 5m", f"stop-t-{int(NOW)}")
    ]
    again = inst("t", S.STOPPING, updated=NOW - 50, reason="idle for 5m (stop resent)")
    (act,) = plan_upkeep(view(again), NOW)
    assert isinstance(act, ResendStop) and act.reason == "idle for 5m (stop resent)"
    assert plan_upkeep(view(old, lost=frozenset({"h1"})), NOW) == []  # lost: plan_hosts


# ---------------------------------------------------------------- idle stops


def test_idle_stops_follow_the_model_global_and_keep_alive_timeouts() -> None:
    limits = Limits(idle_timeout=300.0, idle_timeouts={"n": 60.0, "k": 0.0}, models=LIM.models)
    recs = (
        inst("g", ready_at=NOW - 300),  # global 300 s: exactly reached
        inst("y", ready_at=NOW - 299),  # not yet
        inst("n", model="n", ready_at=NOW - 1000),  # used 61 s ago, its own 60 s
        inst("k", model="k", ready_at=NOW - 99_999),  # idle_timeout 0: never
        inst("b", ready_at=NOW - 99_999),  # a request in flight: never idle
        inst("s", S.STARTING, ready_at=NOW - 99_999, updated=NOW),  # not READY
    )
    gw = report(used={"n": NOW - 61})
    gw.instances["b"] = InstanceActivity(1, NOW - 9_999)
    acts = plan_upkeep(view(*recs, limits=limits, reports=(gw,)), NOW)
    assert [(a.instance_id, type(a)) for a in acts] == [("g", Stop), ("n", Stop)]
    assert acts[1] == Stop("n", "idle for 61 s (idle_timeout 60 s)")
    keep = report(used={"a": NOW - 3600}, keep_alive=-1)  # Ollama keep_alive < 0: kept
    assert plan_upkeep(view(inst("a", ready_at=NOW - 4000), reports=(keep,)), NOW) == []
    now0 = report(used={"a": NOW - 0.1}, keep_alive=0)  # keep_alive 0: stop after the answer
    (stop,) = plan_upkeep(view(inst("a", ready_at=NOW - 10), reports=(now0,)), NOW)
    assert isinstance(stop, Stop) and "keep_alive 0 s" in stop.reason


def test_idle_stops_spare_pinned_models_but_not_keep_loaded_or_preloaded_ones() -> None:
    """A pin (`lls load --pin`, KV desired) is never idle-stopped; keep_loaded only keeps a
    model from eviction and preload only starts it: both idle-stop like any other (an
    idle_timeout of 0 is how a model is kept for ever). The limits come from a parsed
    config through the service's own `Planning.limits`."""
    from services.placer.service import Placer

    url = "file:///nowhere/x.gguf"
    cfg = parse(
        {
            "idle_timeout": 300,
            "models": {
                "kept": {"url": url, "keep_loaded": True},
                "pre": {"url": url, "preload": True},
                "never": {"url": url, "idle_timeout": 0},
                "pin": {"url": url},
            },
        }
    )
    ctx = SimpleNamespace(cfg=cfg, bus=SimpleNamespace(leases=None), host_id="p")
    limits = Placer(ctx).planning.limits()  # type: ignore[arg-type]
    old = [inst(m, model=m, ready_at=NOW - 301) for m in ("kept", "pre", "never", "pin")]
    acts = plan_upkeep(view(*old, limits=limits, pinned=frozenset({"pin"})), NOW)
    assert acts == [
        Stop("kept", "idle for 5 min (idle_timeout 300 s)"),
        Stop("pre", "idle for 5 min (idle_timeout 300 s)"),
    ]
    unpinned = plan_upkeep(view(*old, limits=limits), NOW)
    assert [a.instance_id for a in unpinned] == ["kept", "pin", "pre"]  # type: ignore[union-attr]


def test_a_model_with_requests_queued_is_never_stopped_as_idle() -> None:
    """Between two of its requests nothing is in flight, but requests wait for it: busy.
    (Ollama's keep_alive 0 says stop after the answer, not with a queue behind it.)"""
    now0 = report(used={"a": NOW - 0.1}, keep_alive=0)
    queued = {"m": Waiting(43, NOW - 2)}
    a = inst("a", ready_at=NOW - 10)
    assert plan_upkeep(view(a, reports=(now0,), queues=queued), NOW) == []
    assert [type(x) for x in plan_upkeep(view(a, reports=(now0,)), NOW)] == [Stop]


def test_no_idle_stop_while_every_gateway_report_is_stale() -> None:
    old = inst("a", ready_at=NOW - 9_999)
    stale = report(ts=NOW - 10.5, used={"a": NOW - 9_999})
    assert plan_upkeep(view(old, reports=(stale,)), NOW) == []  # the bus was away, maybe
    assert [type(a) for a in plan_upkeep(view(old), NOW)] == [Stop]  # no gateway at all


# ---------------------------------------------------------------- purges


def test_ended_records_are_purged_after_the_ttl_plus_failure_backoff() -> None:
    ttl = END_RECORD_TTL_S + LIM.failure_backoff
    recs = (
        inst("s", S.STOPPED, updated=NOW - ttl - 1),
        inst("f", S.FAILED, updated=NOW - ttl),  # not past it yet
        inst("l", S.LOST, updated=NOW - ttl - 1),
        inst("r", updated=NOW - 99_999, ready_at=NOW),  # live: never
    )
    assert plan_upkeep(view(*recs), NOW) == [
        Purge("s", f"stopped for over {ttl:.0f} s"),
        Purge("l", f"lost for over {ttl:.0f} s"),
    ]


# ---------------------------------------------------------------- PENDING/DOWNLOADING


def test_advance_gates_up_to_the_file_being_there() -> None:
    pending = inst("p", S.PENDING)
    v = view(pending, epoch=4)
    assert advance_gate(v, pending, NOW, has_file=True) is None  # re-check the fit, start
    assert advance_gate(v, pending, NOW, has_file=False) == Download("p", "downloading", True)
    gone = inst("p", S.PENDING, model="x")
    removed = Fail("p", "model removed from the config")
    assert advance_gate(view(gone), gone, NOW, has_file=True) == removed
    nowhere = inst("p", S.PENDING, on=None)  # type: ignore[arg-type]
    assert advance_gate(view(nowhere), nowhere, NOW, has_file=True) == removed
    lost = view(pending, lost=frozenset({"h1"}))
    assert advance_gate(lost, pending, NOW, has_file=True) == MarkLost("p", "host h1 lost")


def test_a_download_is_resent_once_per_epoch_and_fails_past_its_timeout() -> None:
    limits = Limits(models=LIM.models, download_timeout=600.0)
    rec = inst("d", S.DOWNLOADING, updated=NOW - 100)
    sent_before = view(rec, limits=limits, epoch=5, download_epochs={"d": 4})
    assert advance_gate(sent_before, rec, NOW, has_file=False) == Download(
        "d", "download resent in epoch 5", False
    )
    never_sent = view(rec, limits=limits, epoch=5)  # this placer started after it was sent
    assert isinstance(advance_gate(never_sent, rec, NOW, has_file=False), Download)
    sent = view(rec, limits=limits, epoch=5, download_epochs={"d": 5})
    assert isinstance(advance_gate(sent, rec, NOW, has_file=False), Wait)
    late = inst("d", S.DOWNLOADING, updated=NOW - 660.1)
    sent_late = view(late, limits=limits, epoch=5, download_epochs={"d": 5})
    assert advance_gate(sent_late, late, NOW, has_file=False) == Fail(
        "d", "download did not finish in time"
    )
    at_limit = inst("d", S.DOWNLOADING, updated=NOW - 660)
    assert isinstance(advance_gate(sent_late, at_limit, NOW, has_file=False), Wait)
    assert advance_gate(sent_late, late, NOW, has_file=True) is None  # it came after all


# ---------------------------------------------------------------- demand's gates


def test_demand_gates_before_a_placement() -> None:
    assert demand_gate(view(), "x", NOW) == Refuse("x", "model 'x' is not configured", 60.0)
    assert demand_gate(view(), "m", NOW) is None  # nothing in the way: place it
    assert isinstance(demand_gate(view(inst("a")), "m", NOW), Wait)
    lost = view(inst("a", on="h1"), lost=frozenset({"h1"}))
    assert demand_gate(lost, "m", NOW) is None  # its instance's host is lost: place again


def test_demand_waits_for_a_swap_under_way_until_the_drain_is_done() -> None:
    pending = view(draining("d", model="n", for_="m"), reports=(report(busy={"d": 1}),))
    assert demand_gate(pending, "m", NOW) == Wait("m", "d is draining for it")
    done = view(draining("d", model="n", for_="m"), reports=(report(draining=("d",)),))
    assert demand_gate(done, "m", NOW) is None  # its placement evicts the drained one


def test_demand_is_refused_within_failure_backoff_of_a_failed_start() -> None:
    failed = inst("f", S.FAILED, updated=NOW - 12, reason="exit 1")
    assert demand_gate(view(failed), "m", NOW) == Refuse(
        "m", "m failed to start 12 s ago (exit 1); not retried for another 18 s", 18.0
    )
    older = inst("f", S.FAILED, updated=NOW - 30, reason="exit 1")
    assert demand_gate(view(older), "m", NOW) is None


def test_demand_with_no_host_waits_only_just_after_start() -> None:
    fresh = view(hosts={}, started=NOW - NO_HOST_GRACE_S + 1)
    assert demand_gate(fresh, "m", NOW) == Wait("m", "no host has reported yet")
    late = view(hosts={}, started=NOW - NO_HOST_GRACE_S)
    assert demand_gate(late, "m", NOW) is None  # placement then says why nothing fits


# ---------------------------------------------------------------- the whole plan, the view


def test_plan_orders_the_steps_as_a_pass_takes_them() -> None:
    v = view(
        inst("a", on="h2"),
        inst("old", S.STOPPED, updated=NOW - 9_999),
        inst("r", S.DRAINING, drain_since=NOW - 1, reason="retired"),
        heard={"h1": NOW, "h2": NOW - 11},
    )
    assert [type(a) for a in plan(v, NOW)] == [HostLost, MarkLost, Stop, Purge]


def test_the_view_is_read_only_and_activity_merges_fresh_reports() -> None:
    v = view(inst("a"))
    with pytest.raises(TypeError):
        v.instances["b"] = inst("b")  # type: ignore[index]
    with pytest.raises(AttributeError):
        v.lost = frozenset({"h1"})  # type: ignore[misc]
    one = report(busy={"a": 1})
    two = report(busy={"a": 2})
    gone = report(ts=NOW - 11, busy={"a": 5})
    merged = merge_activity([one, two, gone], NOW - 10)
    assert merged["a"].in_flight == 3


# ---------------------------------------------------------------- Backoff


def test_backoff_keeps_the_first_time_counts_tries_and_holds_until() -> None:
    b = Backoff()
    assert b.since(NO_ROOM, "i1", 10.0) == 10.0
    assert b.since(NO_ROOM, "i1", 15.0) == 10.0  # still the first time
    t = b.note(NO_SWAP, "m", 20.0, wait=60.0)
    assert (t.since, t.until, t.count) == (20.0, 80.0, 1)
    assert b.holding(NO_SWAP, "m", 79.9) and not b.holding(NO_SWAP, "m", 80.0)
    assert b.note(NO_SWAP, "m", 90.0, wait=60.0).count == 2
    snap = b.view()
    b.clear(NO_ROOM, "i1")
    assert (NO_ROOM, "i1") in snap and b.get(NO_ROOM, "i1") is None  # a snapshot
    b.since(NO_ROOM, "i2", 1.0)
    b.since(NO_ROOM, "i3", 1.0)
    b.prune(NO_ROOM, ["i3"])
    assert b.keys(NO_ROOM) == ["i3"] and b.keys(NO_SWAP) == ["m"]
    v = view(holds=b.view())
    assert v.held(NO_SWAP, "m", 149.0) and not v.held(NO_SWAP, "m", 150.0)


# ---------------------------------------------------------------- the executor (real NATS)


async def test_the_executor_acts_only_on_the_record_an_action_was_planned_from(
    bus: Bus,
) -> None:
    """Two actions on one record: the first changes it, so the second, planned from the
    older record, is left to the next pass (a stale decision never lands)."""
    from services.placer.service import Placer

    cfg = parse({"models": {"m": {"url": "file:///nowhere/m.gguf", "memory_mib": 100}}})
    placer = Placer(ServiceContext(name="placer", cfg=cfg, bus=bus, host_id="p"))
    assert await placer.lease.try_acquire()
    iid = f"m-{new_id()[:8]}"
    t = time.time()
    rec = inst(iid, updated=t, ready_at=t)
    key = proto.instance_key("h1", iid)
    placer.watches.on_instance(key, rec, await bus.instances.create(key, proto.encode(rec)))

    await placer.executor.execute([Stop(iid, "idle"), MarkLost(iid, "host h1 lost", True)], t)
    assert "m" not in placer.watches.demanded  # (the MarkLost, planned before the stop, not done)
    entry = await bus.instances.get(key)
    got = proto.decode(entry.value, InstanceRecord)
    assert (got.state, got.reason) == (S.STOPPING, "idle")
    sent = await bus.js.get_last_msg(proto.CMDS_STREAM, proto.cmd_agent("h1"))
    cmd = proto.decode(sent.data, proto.AgentCommand)
    assert isinstance(cmd, proto.StopInstance) and cmd.instance_id == iid
    assert cmd.epoch == placer.lease.epoch >= 1

    # a lost instance that served: LOST, and its model demanded for this pass's demand step
    lid = f"m-{new_id()[:8]}"
    lkey = proto.instance_key("h1", lid)
    lrec = inst(lid, updated=t, ready_at=t)
    placer.watches.on_instance(lkey, lrec, await bus.instances.create(lkey, proto.encode(lrec)))
    await placer.executor.execute([MarkLost(lid, "host h1 lost", replace=True)], t)
    assert proto.decode((await bus.instances.get(lkey)).value, InstanceRecord).state == S.LOST
    assert placer.watches.demanded == {"m": t}

    # a Hold lands in the Backoff the demand path reads
    await placer.executor.execute([Hold(NO_SWAP, "m", t + 60, "abandoned")], t)
    assert placer.backoff.holding(NO_SWAP, "m", t + 59)

    # a Drain (a swap's first step) marks its victims DRAINING for the waiting model
    vid = f"m-{new_id()[:8]}"
    vic = inst(vid, updated=t, ready_at=t)
    vkey = proto.instance_key("h1", vid)
    placer.watches.on_instance(vkey, vic, await bus.instances.create(vkey, proto.encode(vic)))
    await placer.executor.execute([Drain("x", (vid, "gone"), "yielding to x")], t)
    got = proto.decode((await bus.instances.get(vkey)).value, InstanceRecord)
    assert (got.state, got.drain_for, got.drain_since, got.reason) == (
        S.DRAINING,
        "x",
        t,
        "yielding to x",
    )


# ---------------------------------------------------------------- demand after its gates

GiB = 1024
NEED = Need(model="m", memory_mib=10 * GiB)


def gpu_host(used_gib: int = 0) -> dict[str, HostRecord]:
    """One host "g" with one 24 GiB GPU (and too little RAM to run a 10 GiB model on CPU)."""
    gpu = GpuInfo(0, "GPU-0", "sim", 24 * GiB, used_gib * GiB)
    return {
        "g": HostRecord(
            host_id="g",
            ts=NOW,
            started_at=0.0,
            runtime="process",
            gpus=[gpu],
            cpu_count=2,
            ram_total_mib=4096,
            ram_free_mib=4096,
        )
    }


def on_gpu(
    iid: str, state: InstanceState = S.READY, *, model: str = "n", gib: int = 20, **kw: object
) -> InstanceRecord:
    """An instance holding `gib` of g's GPU, ready for ten minutes (its turn is long over)."""
    kw.setdefault("ready_at", NOW - 600)
    return inst(iid, state, model=model, on="g", gpus=[0], memory_mib=gib * GiB, **kw)


def test_demand_with_room_creates_on_the_chosen_gpu() -> None:
    [act] = plan_demand(view(hosts=gpu_host()), "m", NEED, NOW)
    assert isinstance(act, Create) and act.model == "m" and act.need == NEED
    assert (act.decision.host, act.decision.gpus, act.decision.evict) == ("g", (0,), ())
    assert (
        act.reason
        == act.decision.reason
        == ("best fit on g GPU 0: 24.0 GiB free, model needs 10.0 GiB")
    )


def test_an_idle_instance_in_the_way_drains_first() -> None:
    # Idle ones drain too: only the gateways know for sure that nothing is in flight on it.
    v = view(on_gpu("a"), hosts=gpu_host(20))
    [act] = plan_demand(v, "m", NEED, NOW)
    assert isinstance(act, Drain) and (act.model, act.victims) == ("m", ("a",))
    assert act.reason.startswith("yielding to m, which waits: best fit on g GPU 0")
    assert "after stopping least recently used idle a, which frees 20.0 GiB" in act.reason


def test_a_busy_instance_past_its_turn_is_asked_to_yield() -> None:
    v = view(on_gpu("a"), hosts=gpu_host(20), reports=[report(busy={"a": 1})])
    [act] = plan_demand(v, "m", NEED, NOW)
    assert isinstance(act, Drain) and act.victims == ("a",)
    assert "once a yield (drain, then stop)" in act.reason


def test_a_busy_instance_in_its_turn_is_waited_for() -> None:
    # Its requests queued before its turn began: the turn is theirs (placer.min_turn 5 s).
    young = on_gpu("a", ready_at=NOW - 1)
    queued = {"n": Waiting(9, NOW - 3), "m": Waiting(1, NOW - 10)}
    v = view(young, hosts=gpu_host(20), reports=[report(busy={"a": 1})], queues=queued)
    [act] = plan_demand(v, "m", NEED, NOW)
    assert isinstance(act, Wait) and act.model == "m"
    assert "1 busy with requests in flight" in act.reason


def test_a_busy_instance_with_nothing_queued_yields_at_once() -> None:
    young = on_gpu("a", ready_at=NOW - 1)  # in its first second, but nothing waits for it
    v = view(young, hosts=gpu_host(20), reports=[report(busy={"a": 1})])
    [act] = plan_demand(v, "m", NEED, NOW)
    assert isinstance(act, Drain) and act.victims == ("a",)


def test_no_new_drain_while_the_last_swap_is_held_no_swap() -> None:
    held = {(NO_SWAP, "m"): Backoff().note(NO_SWAP, "m", NOW, wait=60.0)}
    v = view(on_gpu("a"), hosts=gpu_host(20), reports=[report(busy={"a": 1})], holds=held)
    [act] = plan_demand(v, "m", NEED, NOW)
    assert isinstance(act, Wait) and "1 busy with requests in flight" in act.reason
    expired = {(NO_SWAP, "m"): Backoff().note(NO_SWAP, "m", NOW - 61, wait=60.0)}
    v = view(on_gpu("a"), hosts=gpu_host(20), reports=[report(busy={"a": 1})], holds=expired)
    assert [type(a) for a in plan_demand(v, "m", NEED, NOW)] == [Drain]


def test_an_instance_drained_for_it_is_evicted_by_the_new_instance() -> None:
    drained = on_gpu("a", S.DRAINING, drain_for="m", drain_since=NOW - 5)
    v = view(drained, hosts=gpu_host(20), reports=[report(draining=("a",))])
    [act] = plan_demand(v, "m", NEED, NOW)
    assert isinstance(act, Create) and isinstance(act.decision, Placed)
    assert act.decision.evict == ("a",)  # _create stops it and announces the swap done
    # one still running requests is not evicted, and not drained again: m waits
    v = view(drained, hosts=gpu_host(20), reports=[report(draining=("a",), busy={"a": 1})])
    assert [type(a) for a in plan_demand(v, "m", NEED, NOW)] == [Wait]


def test_a_model_that_never_fits_is_refused_with_a_retry() -> None:
    huge = Need(model="m", memory_mib=30 * GiB)  # more than the whole GPU
    [act] = plan_demand(view(on_gpu("a"), hosts=gpu_host(20)), "m", huge, NOW)
    assert isinstance(act, Refuse) and act.model == "m"
    assert act.retry_after == NEVER_FITS_RETRY_S
    assert act.reason.endswith(
        "; this holds even with every model that can yield stopped, so it never fits"
    )


def test_keep_loaded_and_pinned_models_are_never_evicted_so_it_never_fits() -> None:
    kept = dataclasses.replace(LIM, keep_loaded=frozenset({"n"}))
    for v in (
        view(on_gpu("a"), hosts=gpu_host(20), limits=kept),
        view(on_gpu("a"), hosts=gpu_host(20), pinned=frozenset({"n"})),
        view(
            on_gpu("a"),
            hosts=gpu_host(20),
            pinned=frozenset({"n"}),
            reports=[report(busy={"a": 1})],
        ),
    ):
        [act] = plan_demand(v, "m", NEED, NOW)
        assert isinstance(act, Refuse), act  # 4 GiB is all there is beside the kept one
        assert "marked keep_loaded" in act.reason


def test_an_unsettled_instance_is_not_evicted_without_a_drain() -> None:
    # A gateway may be about to send it the requests that waited for it: it counts busy,
    # so it is not stopped outright (the same instance settled is drained: see above).
    v = view(on_gpu("a"), hosts=gpu_host(20), unsettled=frozenset({"a"}))
    [act] = plan_demand(v, "m", NEED, NOW)
    assert isinstance(act, Wait) and "1 busy with requests in flight" in act.reason


def test_its_exclusive_group_makes_way_first() -> None:
    idle = inst("i", model="g2", ready_at=NOW - 600)
    busy = inst("b", model="g2", ready_at=NOW - 600)
    young = inst("y", model="g2", ready_at=NOW - 1)  # in its turn: its requests wait
    starting = inst("s", S.STARTING, model="g2")
    reports = [report(busy={"b": 1, "y": 1})]
    queued = {"g2": Waiting(3, NOW - 2)}  # (b's turn is long over: it yields all the same)
    v = view(idle, busy, young, starting, reports=reports, queues=queued)
    acts = plan_demand(v, "g1", Need(model="g1", memory_mib=100), NOW)
    assert acts == [
        Stop("i", "exclusive group big: g1 is wanted"),
        Drain("g1", ("b",), "yielding to g1 (exclusive group big)"),
        Wait("g1", "exclusive group big: g2 go first"),
    ]
    # nothing of the group left running: placed like any other
    assert [type(a) for a in plan_demand(view(), "g1", Need(model="g1", memory_mib=100), NOW)] == [
        Create
    ]


def test_the_config_reaches_the_demand_planner_through_limits() -> None:
    from services.placer.service import Placer

    url = "file:///nowhere/x.gguf"
    cfg = parse(
        {
            "placer": {"strategy": "spread", "min_turn": 7},
            "agent": {"ram_reserve_mib": 512},
            "models": {"m": {"url": url}, "n": {"url": url, "keep_loaded": True}},
        }
    )
    ctx = SimpleNamespace(cfg=cfg, bus=SimpleNamespace(leases=None), host_id="p")
    limits = Placer(ctx).planning.limits()  # type: ignore[arg-type]
    assert (limits.keep_loaded, limits.strategy, limits.min_turn, limits.ram_reserve_mib) == (
        frozenset({"n"}),
        "spread",
        7.0,
        512,
    )
    [act] = plan_demand(view(on_gpu("a"), hosts=gpu_host(20), limits=limits), "m", NEED, NOW)
    assert isinstance(act, Refuse) and "marked keep_loaded" in act.reason


async def test_the_placers_upkeep_sees_the_gateways_queues(bus: Bus) -> None:
    """The idle stop is planned from a View the service builds: it must carry the gateways'
    queues, or a model whose requests wait (nothing in flight between two of them, keep_alive
    0) is stopped as idle with its queue behind it."""
    from services.placer.service import Placer

    cfg = parse({"models": {"m": {"url": "file:///nowhere/m.gguf", "memory_mib": 100}}})
    placer = Placer(ServiceContext(name="placer", cfg=cfg, bus=bus, host_id="p"))
    assert await placer.lease.try_acquire()
    t = time.time()
    iid = f"m-{new_id()[:8]}"
    rec = inst(iid, updated=t - 60, ready_at=t - 60)
    key = proto.instance_key("h1", iid)
    placer.watches.on_instance(key, rec, await bus.instances.create(key, proto.encode(rec)))
    done = InstanceActivity(0, t - 1, keep_alive=0)  # "stop after the answer"
    queued = {"m": proto.ModelQueue(43, t - 2)}
    placer.watches.activity["gw"] = ActivityReport(
        gateway_id="gw", ts=t, instances={iid: done}, queues=queued
    )
    await placer._upkeep(t)
    assert placer.watches.instances[iid].state == S.READY  # 43 wait: busy, not idle
    placer.watches.activity["gw"] = ActivityReport(gateway_id="gw", ts=t, instances={iid: done})
    await placer._upkeep(t)
    got = proto.decode((await bus.instances.get(key)).value, InstanceRecord)
    assert got.state == S.STOPPING and "keep_alive 0 s" in got.reason
