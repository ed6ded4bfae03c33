"""Taking turns when more models are wanted than fit: the pure decisions, with plain values."""

from __future__ import annotations

import dataclasses

import msgspec
from test_placement import NOW, GiB, gpu, host, inst, need, nofit, placed, used

from proto.messages import ActivityReport, InstanceActivity, InstanceState, ModelQueue
from services.placer.idle_stops import idle_to_stop
from services.placer.placement import at_rest, place
from services.placer.turns import (
    Waiting,
    drain_status,
    group_conflicts,
    may_yield,
    merged_queues,
    reclaimed,
    waiting_order,
)

S = InstanceState


def report(ts: float = NOW, **kw: object) -> ActivityReport:
    return ActivityReport(gateway_id=str(kw.pop("gw", "g1")), ts=ts, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- who waits first


def test_queues_from_several_gateways_add_up_and_keep_the_oldest_wait() -> None:
    reports = [
        report(queues={"a": ModelQueue(3, NOW - 5), "b": ModelQueue(1, NOW - 1)}),
        report(gw="g2", queues={"a": ModelQueue(2, NOW - 9), "c": ModelQueue(0, NOW)}),
        report(gw="gone", ts=NOW - 60, queues={"d": ModelQueue(5, NOW - 90)}),
    ]
    q = merged_queues(reports, fresh_after=NOW - 10)
    assert q == {"a": Waiting(5, NOW - 9), "b": Waiting(1, NOW - 1)}


def test_the_model_whose_oldest_request_waited_longest_goes_first() -> None:
    queues = {"late": Waiting(50, NOW - 1), "early": Waiting(1, NOW - 8)}
    demanded = {"cli": NOW - 3}  # `lls load`: no queue, ordered by when it was asked
    assert waiting_order(demanded, queues) == ["early", "cli", "late"]


# ---------------------------------------------------------------- who yields


def yielders(instances, queues, *, rival_since=NOW - 1, activity=None, **kw):  # type: ignore[no-untyped-def]
    """may_yield with the defaults of these tests: min_turn 5 s, max_turn 30 s, and every
    instance busy since it became ready unless `activity` says otherwise."""
    if activity is None:
        activity = {
            i.instance_id: InstanceActivity(2, NOW, busy_since=i.ready_at) for i in instances
        }
    return may_yield(
        instances,
        activity,
        queues,
        for_model=kw.pop("for_model", "new"),
        now=NOW,
        min_turn_s=5,
        max_turn_s=30,
        rival_since=rival_since,
        keep_loaded=kw.pop("keep_loaded", frozenset()),
    )


def test_a_model_with_nothing_queued_yields_at_once_even_in_its_first_turn() -> None:
    instances = [
        inst("fresh", "h", [0], 1, ready_at=NOW - 0.5),
        inst("kept", "h", [0], 1, ready_at=NOW - 100, model="pinned"),
        inst("self", "h", [0], 1, ready_at=NOW - 100, model="new"),
        inst("starting", "h", [0], 1, state=S.STARTING),
    ]
    # Its running requests finish in the drain: yielding idles no GPU.
    assert yielders(instances, {}, keep_loaded=frozenset({"pinned"})) == {"fresh": 0.0}


def test_a_model_with_requests_queued_keeps_its_turn_for_min_turn() -> None:
    young = inst("young", "h", [0], 1, ready_at=NOW - 2, model="m")
    # Its waiters came before its turn: they are what the turn is for.
    assert yielders([young], {"m": Waiting(40, NOW - 10)}, rival_since=NOW - 60) == {}


def test_a_model_keeps_its_turn_until_those_who_waited_for_it_are_admitted() -> None:
    turn = inst("turn", "h", [0], 1, ready_at=NOW - 8, model="m")
    backlog = {"m": Waiting(40, NOW - 10)}  # queued before the turn began at NOW - 8
    assert yielders([turn], backlog, rival_since=NOW - 60) == {}
    # Once they are served, newer waiters go first come, first served against the rival:
    newer = {"m": Waiting(5, NOW - 3)}
    assert yielders([turn], newer, rival_since=NOW - 4) == {"turn": 0.0}
    assert yielders([turn], newer, rival_since=NOW - 2) == {}  # its own waited longer


def test_a_burst_that_finds_a_model_loaded_begins_its_turn() -> None:
    # Loaded long ago and idle since; a burst began 2 s ago: min_turn counts from the burst.
    loaded = inst("loaded", "h", [0], 1, ready_at=NOW - 600, model="m")
    burst = {"loaded": InstanceActivity(8, NOW, busy_since=NOW - 2)}
    queued = {"m": Waiting(42, NOW - 2)}
    assert yielders([loaded], queued, activity=burst, rival_since=NOW - 2) == {}
    # Its requests about to be sent (none in flight yet): the turn begins with the oldest.
    about = {"loaded": InstanceActivity(0, NOW - 600)}
    assert yielders([loaded], queued, activity=about, rival_since=NOW - 9) == {}


def test_a_burst_just_beginning_is_not_taken_for_an_empty_queue() -> None:
    # 8 requests sent 0.1 s ago, the gateway's next report (with its queue) not in yet.
    loaded = inst("loaded", "h", [0], 1, ready_at=NOW - 600, model="m")
    starting = {"loaded": InstanceActivity(8, NOW, busy_since=NOW - 0.1)}
    assert yielders([loaded], {}, activity=starting) == {}
    settled = {"loaded": InstanceActivity(8, NOW, busy_since=NOW - 0.6)}
    assert yielders([loaded], {}, activity=settled) == {"loaded": 0.0}


def test_an_instance_not_yet_reported_on_by_every_gateway_is_not_asked_to_yield() -> None:
    back = inst("back", "h", [0], 1, ready_at=NOW - 600, model="m")
    assert yielders([back], {}) == {"back": 0.0}
    ranks = may_yield(
        [back],
        {},
        {},
        for_model="new",
        now=NOW,
        min_turn_s=5,
        keep_loaded=frozenset(),
        unsettled=frozenset({"back"}),
    )
    assert ranks == {}


def test_a_drain_is_reclaimed_by_a_burst_as_old_as_the_waiting_models_wait() -> None:
    draining = inst("d", "h", [0], 1, state=S.DRAINING, model="m")
    draining = msgspec.structs.replace(draining, drain_for="w", drain_since=NOW - 0.05)
    # Asked to yield as it sat idle; its own burst came with the rival's: it serves it first.
    assert reclaimed(draining, Waiting(42, NOW - 0.04), rival_since=NOW - 0.1)
    # Requests that came well after the rival's: first come, first served.
    assert not reclaimed(draining, Waiting(3, NOW - 0.04), rival_since=NOW - 9)
    # Requests that waited before the drain began (a turn over by max_turn): no reclaiming.
    assert not reclaimed(draining, Waiting(90, NOW - 40), rival_since=NOW - 45)
    assert not reclaimed(draining, None, rival_since=NOW - 0.1)


def test_max_turn_caps_a_turn_whatever_is_queued() -> None:
    long = inst("long", "h", [0], 1, ready_at=NOW - 31, model="m")
    assert yielders([long], {"m": Waiting(400, NOW - 40)}, rival_since=NOW - 1) == {"long": 0.0}


def test_a_kept_model_and_the_waiting_models_own_copies_never_yield() -> None:
    instances = [
        inst("kept", "h", [0], 1, ready_at=NOW - 100, model="pinned"),
        inst("self", "h", [0], 1, ready_at=NOW - 100, model="new"),
    ]
    assert yielders(instances, {}, keep_loaded=frozenset({"pinned"})) == {}


def test_fewest_waiting_then_longest_turn_yield_first_and_keep_alive_last() -> None:
    instances = [
        inst("busy-queue", "h", [0], 1, ready_at=NOW - 50, model="q"),
        inst("long-turn", "h", [0], 1, ready_at=NOW - 90, model="l"),
        inst("short-turn", "h", [0], 1, ready_at=NOW - 20, model="s"),
        inst("pinned", "h", [0], 1, ready_at=NOW - 99, model="p"),
    ]
    activity = {i.instance_id: InstanceActivity(1, NOW) for i in instances}
    activity["pinned"] = InstanceActivity(1, NOW, keep_alive=-1)
    queues = {"q": Waiting(7, NOW - 3)}
    ranks = may_yield(
        instances,
        activity,
        queues,
        for_model="new",
        now=NOW,
        min_turn_s=5,
        keep_loaded=frozenset(),
    )
    assert sorted(ranks, key=ranks.__getitem__) == [
        "long-turn",
        "short-turn",
        "busy-queue",
        "pinned",
    ]


def test_busy_models_that_may_yield_make_room_by_draining_idle_ones_first() -> None:
    hosts = [host("h", gpu(0, 3))]
    instances = [
        inst("a", "h", [0], 1.2, ready_at=NOW - 30),
        inst("b", "h", [0], 1.2, ready_at=NOW - 30),
    ]
    busy = {"a": used(NOW, in_flight=3), "b": used(NOW, in_flight=1)}
    # Without permission to drain, a busy cluster is a NoFit that says why.
    assert "busy" in nofit(place(hosts, instances, busy, need(1.2), now=NOW))
    # With it, the first-ranked busy instance drains.
    p = placed(place(hosts, instances, busy, need(1.2), now=NOW, may_drain={"b": 0, "a": 1}))
    assert p.evict == ("b",) and p.drain == ("b",)
    assert "yield" in p.reason
    # An idle instance is always preferred to draining a busy one.
    idle = {"a": used(NOW - 50), "b": used(NOW, in_flight=1)}
    p = placed(place(hosts, instances, idle, need(1.2), now=NOW, may_drain={"b": 0}))
    assert p.evict == ("a",) and p.drain == ()


def test_room_promised_to_a_waiting_model_is_not_taken_by_another() -> None:
    hosts = [host("h", gpu(0, 3))]
    draining = msgspec.structs.replace(
        inst("a", "h", [0], 1.2, ready_at=NOW - 30), state=S.DRAINING, drain_for="first"
    )
    instances = [draining, inst("b", "h", [0], 1.2, ready_at=NOW - 30)]
    idle = {"a": used(NOW - 60), "b": used(NOW, in_flight=2)}
    assert "busy" in nofit(place(hosts, instances, idle, need(1.2), now=NOW))
    first = dataclasses.replace(need(1.2), model="first")
    assert placed(place(hosts, instances, idle, first, now=NOW)).evict == ("a",)


def test_an_instance_no_gateway_has_reported_on_since_it_was_ready_is_not_evicted() -> None:
    hosts = [host("h", gpu(0, 3))]
    instances = [inst("a", "h", [0], 1.2, ready_at=NOW - 1), inst("b", "h", [0], 1.2)]
    activity = {"b": used(NOW, in_flight=1)}
    # The gateways have not yet reported since `a` became ready: its waiting requests may
    # not show in what they said.
    unsettled = frozenset({"a"})
    reason = nofit(place(hosts, instances, activity, need(1.2), now=NOW, unsettled=unsettled))
    assert "2 busy" in reason
    p = placed(place(hosts, instances, activity, need(1.2), now=NOW))
    assert p.evict == ("a",)


def test_an_instance_stopped_since_the_heartbeat_frees_its_memory_at_once() -> None:
    h = host("h", gpu(0, 3, used_gib=2.4), ts=NOW - 0.5)
    h.instances = ["gone", "stays"]
    stopped = msgspec.structs.replace(
        inst("gone", "h", [0], 1.2), state=S.STOPPED, updated=NOW - 0.1
    )
    instances = [stopped, inst("stays", "h", [0], 1.2)]
    p = placed(place([h], instances, {"stays": used(NOW, 1)}, need(1.2), now=NOW))
    assert p.evict == ()


def test_whether_a_model_can_ever_fit_ignores_what_runs_now_but_not_other_processes() -> None:
    hosts = [host("h", gpu(0, 3, used_gib=2.9, foreign_gib=1))]
    rest = at_rest(hosts)
    assert rest[0].gpus[0].memory_used_mib == 1 * GiB
    assert placed(place(rest, [], {}, need(1.9), now=NOW)).gpus == (0,)
    assert "no host can run" in nofit(place(rest, [], {}, need(2.5), now=NOW))


# ---------------------------------------------------------------- when a drain is over


def draining(since: float = NOW - 1) -> object:
    return msgspec.structs.replace(
        inst("a", "h", [0], 1), state=S.DRAINING, drain_for="w", drain_since=since
    )


def test_a_drain_is_done_only_when_every_gateway_saw_it_and_nothing_runs() -> None:
    rec = draining()
    kw = {"now": NOW, "fresh_after": NOW - 10, "drain_timeout_s": 60, "still_wanted": True}
    unseen = [report(instances={"a": InstanceActivity(0, NOW)})]
    assert drain_status(rec, unseen, **kw) == "draining"  # might still send it a request
    running = [report(draining=["a"], instances={"a": InstanceActivity(2, NOW)})]
    assert drain_status(rec, running, **kw) == "draining"
    done = [
        report(draining=["a"], instances={"a": InstanceActivity(0, NOW)}),
        report(gw="g2", draining=["a"]),
        report(gw="dead", ts=NOW - 30, instances={"a": InstanceActivity(5, NOW - 30)}),
    ]
    assert drain_status(rec, done, **kw) == "drained"


def test_a_drain_past_its_deadline_is_abandoned_and_a_moot_one_cancelled() -> None:
    kw = {"now": NOW, "fresh_after": NOW - 10, "drain_timeout_s": 60}
    running = [report(draining=["a"], instances={"a": InstanceActivity(1, NOW)})]
    assert drain_status(draining(NOW - 61), running, **kw, still_wanted=True) == "expired"
    assert drain_status(draining(NOW - 61), running, **kw, still_wanted=False) == "moot"


# ---------------------------------------------------------------- groups and keep_alive


def test_exclusive_group_conflicts_are_the_other_live_models_of_the_group() -> None:
    groups = {"a": "g", "b": "g", "c": "h"}
    instances = [
        inst("1", "h", [0], 1, model="b"),
        inst("2", "h", [0], 1, model="c"),
        inst("3", "h", [0], 1, state=S.STOPPED, model="b"),
        inst("4", "h", [0], 1, model="a"),
    ]
    assert [r.instance_id for r in group_conflicts("a", groups, instances)] == ["1"]
    assert group_conflicts("free", groups, instances) == []


def test_ollama_keep_alive_overrides_the_idle_timeout() -> None:
    instances = [
        inst("zero", "h", [0], 1),
        inst("forever", "h", [0], 1),
        inst("plain", "h", [0], 1),
    ]
    activity = {
        "zero": InstanceActivity(0, NOW - 0.5, keep_alive=0),
        "forever": InstanceActivity(0, NOW - 10_000, keep_alive=-1),
        "plain": InstanceActivity(0, NOW - 10_000),
    }
    stops = dict(idle_to_stop(instances, activity, {}, 300, NOW))
    assert set(stops) == {"zero", "plain"}
    assert "keep_alive" in stops["zero"]
