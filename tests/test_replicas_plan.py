"""Replicas that follow load: the pure decisions (replicas.plan, and where place() puts a
copy, what it stops for one, who yields), with plain values."""

from __future__ import annotations

from test_placement import NOW, GiB, gpu, host, inst, nofit, placed, used

from lls.config import Replicas
from proto.messages import InstanceActivity, InstanceRecord, InstanceState
from services.placer.placement import Need, place
from services.placer.placement_eviction import spare_copies
from services.placer.replicas import AddReplica, StopReplica, plan
from services.placer.turns import Waiting, may_yield

S = InstanceState
M = "chat"
R = Replicas(min=1, max=2, target_wait=2.0, idle_after=60.0)


def rep(iid: str, state: InstanceState = S.READY, ready_at: float = NOW - 100) -> InstanceRecord:
    return inst(iid, "h", [0], 1, state=state, model=M, ready_at=ready_at)


def busy(*iids: str) -> dict[str, InstanceActivity]:
    return {i: used(NOW, in_flight=1) for i in iids}


def add(result: AddReplica | StopReplica | None) -> str:
    assert isinstance(result, AddReplica), result
    return result.reason


def stop(result: AddReplica | StopReplica | None) -> StopReplica:
    assert isinstance(result, StopReplica), result
    return result


# ---------------------------------------------------------------- adding for load


def test_adds_one_when_requests_wait_past_target_with_every_instance_busy() -> None:
    queue = Waiting(3, NOW - 2.4)
    why = add(plan(M, [rep("a")], busy("a"), queue, R, now=NOW))
    assert why.startswith("3 requests have waited 2.4 s with its instance busy")
    cfg = Replicas(min=1, max=3, target_wait=2.0)
    two = [rep("a"), rep("b")]
    why = add(plan(M, two, busy("a", "b"), queue, cfg, now=NOW))
    assert "3 requests have waited 2.4 s with both instances busy" in why


def test_no_add_before_target_wait() -> None:
    assert plan(M, [rep("a")], busy("a"), Waiting(9, NOW - 1.9), R, now=NOW) is None


def test_no_add_at_max() -> None:
    two = [rep("a"), rep("b")]
    assert plan(M, two, busy("a", "b"), Waiting(9, NOW - 30), R, now=NOW) is None
    draining = [rep("a"), rep("b", state=S.DRAINING)]  # live until stopped: counts for max
    assert plan(M, draining, busy("a", "b"), Waiting(9, NOW - 30), R, now=NOW) is None


def test_one_at_a_time_no_add_while_one_is_on_its_way() -> None:
    cfg = Replicas(min=1, max=4, target_wait=1.0)
    q = Waiting(9, NOW - 30)
    for state in (S.PENDING, S.DOWNLOADING, S.STARTING):
        assert plan(M, [rep("a"), rep("b", state=state)], busy("a"), q, cfg, now=NOW) is None


def test_no_add_without_a_ready_instance() -> None:
    q = Waiting(9, NOW - 30)
    retiring = [rep("a", state=S.DRAINING)]  # a queue here waits for the drain, not for room
    assert plan(M, retiring, busy("a"), q, R, now=NOW) is None


def test_no_add_while_an_instance_is_idle() -> None:
    cfg = Replicas(min=1, max=3, target_wait=1.0)
    two = [rep("a"), rep("b")]
    activity = {"a": used(NOW, in_flight=1), "b": used(NOW - 5)}
    assert plan(M, two, activity, Waiting(4, NOW - 10), cfg, now=NOW) is None
    # a gateway that has not reported on `b` yet: not known busy either
    assert plan(M, two, busy("a"), Waiting(4, NOW - 10), cfg, now=NOW) is None


def test_no_add_while_another_model_waits_for_room() -> None:
    q = Waiting(9, NOW - 30)
    assert plan(M, [rep("a")], busy("a"), q, R, now=NOW, others_waiting={"other"}) is None
    # its own name among the waiting models (it is placed already) holds nothing back
    assert isinstance(plan(M, [rep("a")], busy("a"), q, R, now=NOW, others_waiting={M}), AddReplica)


def test_nothing_without_a_live_instance_the_demand_path_places_the_first() -> None:
    q = Waiting(9, NOW - 30)
    gone = [rep("a", state=S.STOPPED), inst("x", "h", [0], 1, model="other")]
    assert plan(M, gone, {}, q, Replicas(min=2, max=2), now=NOW, demanded=True) is None


# ---------------------------------------------------------------- min on demand


def test_demand_fills_up_to_min_several_at_once() -> None:
    cfg = Replicas(min=3, max=3)
    first = [rep("a", state=S.PENDING)]  # just placed by the demand path
    why = add(plan(M, first, {}, None, cfg, now=NOW, demanded=True))
    assert why == f"{M} is wanted and runs at least 3 instances (replicas.min); 1 live"
    two = [rep("a", state=S.PENDING), rep("b", state=S.PENDING)]
    assert isinstance(plan(M, two, {}, None, cfg, now=NOW, demanded=True), AddReplica)
    three = two + [rep("c", state=S.STARTING)]
    assert plan(M, three, {}, None, cfg, now=NOW, demanded=True) is None


def test_min_is_filled_only_on_demand_and_not_while_another_model_waits() -> None:
    cfg = Replicas(min=2, max=2)
    one = [rep("a")]  # its sibling idled out: no demand, no refill (the idle stop would undo it)
    assert plan(M, one, {}, None, cfg, now=NOW, demanded=False) is None
    assert plan(M, one, {}, None, cfg, now=NOW, demanded=True, others_waiting={"b"}) is None


# ---------------------------------------------------------------- stopping idle ones


def test_stops_the_longest_idle_replica_above_min() -> None:
    cfg = Replicas(min=1, max=3, idle_after=60)
    three = [rep(i, ready_at=NOW - 1000) for i in "abc"]
    activity = {"a": used(NOW - 61), "b": used(NOW - 300), "c": used(NOW - 5)}
    s = stop(plan(M, three, activity, None, cfg, now=NOW))
    assert s.instance_id == "b"
    assert s.reason == (
        "idle for 300.0 s (replicas.idle_after 60 s) with 3 instances ready, "
        "more than replicas.min 1"
    )


def test_idle_counts_from_ready_at_when_never_used() -> None:
    cfg = Replicas(min=1, max=2, idle_after=60)
    two = [rep("a", ready_at=NOW - 10), rep("b", ready_at=NOW - 70)]
    assert stop(plan(M, two, {}, None, cfg, now=NOW)).instance_id == "b"
    fresh = [rep("a", ready_at=NOW - 10), rep("b", ready_at=NOW - 59)]
    assert plan(M, fresh, {}, None, cfg, now=NOW) is None


def test_never_stops_a_busy_one_nor_below_min_nor_while_requests_wait() -> None:
    cfg = Replicas(min=1, max=2, idle_after=60)
    two = [rep("a"), rep("b")]
    old = NOW - 600
    assert plan(M, two, {"a": used(old, 1), "b": used(old, 2)}, None, cfg, now=NOW) is None
    assert plan(M, [rep("a")], {"a": used(old)}, None, cfg, now=NOW) is None  # min 1
    min2 = Replicas(min=2, max=3, idle_after=60)
    assert plan(M, two, {"a": used(old), "b": used(old)}, None, min2, now=NOW) is None
    idle = {"a": used(old), "b": used(old)}
    assert plan(M, two, idle, Waiting(1, NOW - 0.1), cfg, now=NOW) is None


def test_only_ready_instances_count_for_min_when_stopping() -> None:
    cfg = Replicas(min=1, max=2, idle_after=60)
    # the other one is still starting: stopping the idle ready one would leave none serving
    two = [rep("a"), rep("b", state=S.STARTING)]
    assert plan(M, two, {"a": used(NOW - 600)}, None, cfg, now=NOW) is None


# ---------------------------------------------------------------- where a copy goes


def copy_of(iid: str, host_id: str, gpus: list[int], state: InstanceState = S.READY):  # noqa: ANN201
    return inst(iid, host_id, gpus, 2, state=state, model="new")


def need2(**kw: object) -> Need:
    return Need(model="new", memory_mib=2 * GiB, **kw)  # type: ignore[arg-type]


def test_a_copy_goes_to_another_host_first() -> None:
    hosts = [host("a", gpu(0, 24), gpu(1, 24)), host("b", gpu(0, 80))]
    p = placed(place(hosts, [copy_of("x", "a", [0])], {}, need2(), now=NOW))
    assert (p.host, p.gpus) == ("b", (0,))
    assert "apart from its other instance(s)" in p.reason


def test_then_another_gpu_of_the_same_host_then_the_same_gpu() -> None:
    hosts = [host("a", gpu(0, 24), gpu(1, 24)), host("b", gpu(0, 80, used_gib=79))]
    p = placed(place(hosts, [copy_of("x", "a", [0])], {}, need2(), now=NOW))
    assert (p.host, p.gpus) == ("a", (1,))
    assert "on the same host as its other instance(s)" in p.reason
    p = placed(place([host("a", gpu(0, 24))], [copy_of("x", "a", [0])], {}, need2(), now=NOW))
    assert (p.host, p.gpus) == ("a", (0,))
    assert "sharing a device with its other instance(s)" in p.reason


def test_cpu_copies_spread_over_cpu_hosts() -> None:
    hosts = [host("a"), host("b", ram_free_gib=30)]
    # binpack would take b (least free that fits); the copy on b sends it to a
    p = placed(place(hosts, [copy_of("x", "b", [])], {}, need2(), now=NOW))
    assert (p.host, p.gpus) == ("a", ())


def test_a_replica_takes_free_room_only() -> None:
    hosts = [host("a", gpu(0, 4))]
    instances = [inst("idle", "a", [0], 3, model="other"), copy_of("x", "b", [0])]
    idle = {"idle": used(NOW - 500)}
    assert placed(place(hosts, instances, idle, need2(), now=NOW)).evict == ("idle",)
    why = nofit(place(hosts, instances, idle, need2(), now=NOW, may_evict=False))
    assert why.endswith("nothing is stopped to make room for it")


def test_a_copy_is_never_evicted_for_its_own_model() -> None:
    hosts = [host("a", gpu(0, 4))]
    big = inst("x", "a", [0], 3, model="new")
    why = nofit(place(hosts, [big], {"x": used(NOW - 900)}, need2(), now=NOW))
    assert "no idle instance could be stopped" in why


# ---------------------------------------------------------------- replicas and turns


def test_an_idle_spare_replica_is_evicted_before_another_models_last_instance() -> None:
    hosts = [host("a", gpu(0, 4), gpu(1, 4))]
    instances = [
        inst("y", "a", [0], 3, model="y"),
        inst("x1", "a", [1], 2, model="x"),
        inst("x2", "a", [1], 2, model="x"),
    ]
    # y's only instance is the least recently used, but x2 is a spare copy of x
    activity = {"y": used(NOW - 900), "x1": used(NOW - 1), "x2": used(NOW - 60)}
    assert spare_copies(instances, activity) == frozenset({"x2"})
    p = placed(place(hosts, instances, activity, need2(), now=NOW))
    assert (p.evict, p.gpus) == (("x2",), (1,))


def test_a_busy_spare_replica_yields_before_any_models_last_instance() -> None:
    instances = [
        inst("x1", "h", [0], 1, ready_at=NOW - 90, model="x"),
        inst("x2", "h", [0], 1, ready_at=NOW - 20, model="x"),
        inst("z", "h", [0], 1, ready_at=NOW - 90, model="z"),
    ]
    activity = {"x1": used(NOW, 1), "x2": used(NOW - 1, 1), "z": used(NOW, 1)}
    queues = {"x": Waiting(5, NOW - 1)}  # x loses more by its count, but keeps x1 serving
    ranks = may_yield(
        instances,
        activity,
        queues,
        for_model="new",
        now=NOW,
        min_turn_s=5,
        keep_loaded=frozenset(),
    )
    assert min(ranks, key=ranks.__getitem__) == "x2"
    assert ranks["z"] < ranks["x1"]
