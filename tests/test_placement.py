"""Placement, eviction and idle decisions, tested with plain values."""

from __future__ import annotations

import random

import pytest

from proto.messages import (
    GpuInfo,
    GpuProcess,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
)
from services.placer.idle_stops import idle_to_stop
from services.placer.placement import Need, NoFit, Placed, lost_hosts, place

GiB = 1024
NOW = 1000.0
S = InstanceState


def gpu(index: int, total_gib: float, used_gib: float = 0, foreign_gib: float = 0) -> GpuInfo:
    procs = [GpuProcess(pid=4242, used_mib=int(foreign_gib * GiB))] if foreign_gib else []
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="sim",
        memory_total_mib=int(total_gib * GiB),
        memory_used_mib=int(used_gib * GiB),
        processes=procs,
    )


def host(
    host_id: str, *gpus: GpuInfo, ts: float = NOW, ram_gib: float = 64, ram_free_gib: float = 60
) -> HostRecord:
    return HostRecord(
        host_id=host_id,
        ts=ts,
        started_at=0.0,
        runtime="process",
        gpus=list(gpus),
        cpu_count=8,
        ram_total_mib=int(ram_gib * GiB),
        ram_free_mib=int(ram_free_gib * GiB),
    )


def inst(
    iid: str,
    host_id: str,
    gpus: list[int],
    mem_gib: float,
    state: InstanceState = S.READY,
    model: str | None = None,
    ready_at: float = 100.0,
) -> InstanceRecord:
    return InstanceRecord(
        instance_id=iid,
        model=model or f"model-{iid}",
        state=state,
        created=0.0,
        updated=ready_at,
        host=host_id,
        gpus=gpus,
        memory_mib=int(mem_gib * GiB),
        ready_at=ready_at if state == S.READY else None,
    )


def used(last_used: float, in_flight: int = 0) -> InstanceActivity:
    return InstanceActivity(in_flight=in_flight, last_used=last_used)


def need(gib: float, **kw: object) -> Need:
    return Need(model="new", memory_mib=int(gib * GiB), **kw)  # type: ignore[arg-type]


def placed(result: Placed | NoFit) -> Placed:
    assert isinstance(result, Placed), result
    return result


def nofit(result: Placed | NoFit) -> str:
    assert isinstance(result, NoFit), result
    return result.reason


# ---------------------------------------------------------------- choosing a GPU


def test_best_fit_takes_the_smallest_gpu_that_fits() -> None:
    hosts = [host("a", gpu(0, 80), gpu(1, 24)), host("b", gpu(0, 16), gpu(1, 12))]
    p = placed(place(hosts, [], {}, need(14), now=NOW))
    assert (p.host, p.gpus, p.n_gpu_layers, p.evict) == ("b", (0,), 999, ())
    assert p.reason.startswith("best fit on b GPU 0: 16.0 GiB free, model needs 14.0 GiB")


def test_spread_takes_the_gpu_with_most_free_memory() -> None:
    hosts = [host("a", gpu(0, 80), gpu(1, 24)), host("b", gpu(0, 16))]
    p = placed(place(hosts, [], {}, need(14), now=NOW, strategy="spread"))
    assert (p.host, p.gpus) == ("a", (0,))
    assert p.reason.startswith("most free memory on a GPU 0")


def test_memory_used_by_processes_that_are_not_ours_is_respected() -> None:
    # GPU 1 looks empty by claims, but NVML sees 20 GiB held by someone else
    hosts = [host("a", gpu(0, 48), gpu(1, 24, used_gib=20, foreign_gib=20))]
    p = placed(place(hosts, [], {}, need(10), now=NOW))
    assert p.gpus == (0,)


def test_claims_of_instances_not_yet_loaded_count() -> None:
    hosts = [host("a", gpu(0, 24, used_gib=2, foreign_gib=2), gpu(1, 40))]
    for state in (S.PENDING, S.DOWNLOADING, S.STARTING):
        starting = [inst("s", "a", [0], 16, state)]
        # NVML sees only the foreign 2 GiB; claim 16 + foreign 2 leaves 6 GiB on GPU 0
        p = placed(place(hosts, starting, {}, need(8), now=NOW))
        assert p.gpus == (1,), state


def test_ended_instances_release_their_claims() -> None:
    hosts = [host("a", gpu(0, 24), gpu(1, 40))]
    gone = [inst(f"x{i}", "a", [0], 20, st) for i, st in enumerate((S.STOPPED, S.FAILED, S.LOST))]
    assert placed(place(hosts, gone, {}, need(16), now=NOW)).gpus == (0,)


def test_prefers_a_host_that_already_holds_the_file() -> None:
    hosts = [host("a", gpu(0, 16)), host("b", gpu(0, 80))]
    p = placed(place(hosts, [], {}, need(10, file_hosts=frozenset({"b"})), now=NOW))
    assert p.host == "b"
    assert "the file is already on b" in p.reason


def test_pin_to_host_and_gpu() -> None:
    hosts = [host("a", gpu(0, 16)), host("b", gpu(0, 80), gpu(1, 80), gpu(2, 24))]
    p = placed(place(hosts, [], {}, need(10, pin_host="b", pin_gpus=(1,)), now=NOW))
    assert (p.host, p.gpus) == ("b", (1,))
    assert "1 of 2 hosts excluded: model is pinned to b" in p.reason


def test_pinned_host_that_is_gone_says_so() -> None:
    hosts = [host("a", gpu(0, 80)), host("b", gpu(0, 80), ts=NOW - 60)]
    assert "pinned to host b, which has no heartbeat" in nofit(
        place(hosts, [], {}, need(10, pin_host="b"), now=NOW)
    )
    assert "pinned to host zz, which is not a known host" in nofit(
        place(hosts, [], {}, need(10, pin_host="zz"), now=NOW)
    )


def test_pinned_gpu_that_is_full_is_not_swapped_for_another() -> None:
    hosts = [host("a", gpu(0, 8), gpu(1, 80))]
    reason = nofit(place(hosts, [], {}, need(10, pin_gpus=(0,)), now=NOW))
    assert "largest free 8.0 GiB (a GPU 0)" in reason


# ---------------------------------------------------------------- split and CPU


def test_splits_across_the_fewest_gpus_of_one_host_when_no_single_gpu_fits() -> None:
    hosts = [host("a", gpu(0, 16), gpu(1, 24), gpu(2, 24), gpu(3, 8))]
    p = placed(place(hosts, [], {}, need(30), now=NOW, split_overhead_mib=512))
    assert p.gpus == (1, 2)  # the two largest
    assert p.memory_mib == 30 * GiB + 512  # the second GPU carries its own CUDA context
    assert p.reason.startswith("no single GPU has 30.0 GiB free; split across a GPUs 1,2")


def test_split_uses_three_gpus_when_two_are_not_enough() -> None:
    hosts = [host("a", gpu(0, 16), gpu(1, 16), gpu(2, 16))]
    p = placed(place(hosts, [], {}, need(40), now=NOW, split_overhead_mib=0))
    assert p.gpus == (0, 1, 2)


def test_never_splits_across_hosts() -> None:
    hosts = [host("a", gpu(0, 16)), host("b", gpu(0, 16))]
    reason = nofit(place(hosts, [], {}, need(24), now=NOW))
    assert "2 of 2 hosts excluded: not enough free memory on any GPU" in reason


def test_cpu_only_host_runs_the_model_in_ram() -> None:
    hosts = [host("gpu", gpu(0, 8)), host("cpu", ram_gib=64, ram_free_gib=40)]
    p = placed(place(hosts, [], {}, need(20), now=NOW))
    assert (p.host, p.gpus, p.n_gpu_layers) == ("cpu", (), 0)
    assert "CPU on cpu" in p.reason


def test_gpu_is_preferred_over_cpu() -> None:
    hosts = [host("cpu", ram_gib=512, ram_free_gib=500), host("gpu", gpu(0, 24))]
    assert placed(place(hosts, [], {}, need(20), now=NOW)).host == "gpu"


def test_cpu_host_keeps_the_ram_reserve_and_counts_claims() -> None:
    hosts = [host("cpu", ram_gib=32, ram_free_gib=30)]
    # used 2, claims 12 (a starting instance not yet in RAM): free = 32 - 1 - 12 = 19 GiB
    starting = [inst("s", "cpu", [], 12, S.STARTING)]
    assert placed(place(hosts, starting, {}, need(19), now=NOW, ram_reserve_mib=1024))
    reason = nofit(place(hosts, starting, {}, need(19.5), now=NOW, ram_reserve_mib=1024))
    assert "CPU-only with at most 19.0 GiB RAM free after the reserve" in reason


def test_a_cpu_host_is_asked_only_for_the_cpu_need() -> None:
    # the tiny model: 664 MiB on a GPU (with the CUDA overhead), 136 MiB as a CPU process
    hosts = [host("cpu", ram_gib=2, ram_free_gib=2)]  # 2048 - 1024 reserve - 0 used = 1024
    tiny = Need(model="new", memory_mib=664, cpu_memory_mib=136)
    p = placed(place(hosts, [], {}, tiny, now=NOW, ram_reserve_mib=1900))  # 148 MiB free
    assert (p.host, p.gpus, p.memory_mib) == ("cpu", (), 136)  # claimed: the CPU figure
    assert "model needs 0.1 GiB" in p.reason
    reason = nofit(place(hosts, [], {}, tiny, now=NOW, ram_reserve_mib=1950))  # 98 MiB free
    assert "RAM free after the reserve, model needs 0.1 GiB" in reason
    # a GPU host is still asked for the GPU figure
    gpu_hosts = [host("g", GpuInfo(0, "GPU-0", "sim", 700, 100))]  # 600 MiB free
    assert nofit(place(gpu_hosts, [], {}, tiny, now=NOW))


def test_a_cpu_host_frees_ram_for_the_cpu_need_only() -> None:
    hosts = [host("cpu", ram_gib=2, ram_free_gib=2)]
    idle = [inst("old", "cpu", [], 0.1)]  # 102 MiB claimed
    tiny = Need(model="new", memory_mib=664, cpu_memory_mib=136)
    p = placed(place(hosts, idle, {}, tiny, now=NOW, ram_reserve_mib=1850))  # 198 - 102 free
    assert p.evict == ("old",) and p.memory_mib == 136


def test_measured_memory_raises_the_need_on_that_gpu_kind_only() -> None:
    h200 = GpuInfo(0, "GPU-0", "NVIDIA H200", 2500, 0)
    l4 = GpuInfo(1, "GPU-1", "NVIDIA L4", 2500, 0)
    hosts = [host("a", h200, l4)]
    # estimated 2488, measured 2600 on H200s (more than the estimate) and 2300 on L4s
    n = Need(model="new", memory_mib=2488, gpu_memory_mib={"NVIDIA H200": 2600})
    p = placed(place(hosts, [], {}, n, now=NOW))
    assert (p.gpus, p.memory_mib) == ((1,), 2488)  # the H200 has 2500 free, not enough
    assert placed(place([host("a", l4)], [], {}, n, now=NOW)).memory_mib == 2488
    roomy = GpuInfo(0, "GPU-0", "NVIDIA H200", 3000, 0)
    p = placed(place([host("b", roomy)], [], {}, n, now=NOW))
    assert p.memory_mib == 2600 and "model needs 2.5 GiB" in p.reason  # claims what it holds
    assert nofit(place([host("c", h200)], [], {}, n, now=NOW))


def test_measured_memory_counts_when_evicting_and_splitting() -> None:
    h200 = GpuInfo(0, "GPU-0", "NVIDIA H200", 3000, 0)
    n = Need(model="new", memory_mib=2000, gpu_memory_mib={"NVIDIA H200": 2600})
    idle = [inst("old", "a", [0], 1000 / GiB)]  # leaves 2000 free: the estimate, not the need
    p = placed(place([host("a", h200)], idle, {}, n, now=NOW))
    assert p.evict == ("old",) and p.memory_mib == 2600
    # split over two H200s: each holds half + its own context, and the measured excess
    two = [GpuInfo(i, f"GPU-{i}", "NVIDIA H200", 2000, 0) for i in (0, 1)]
    p = placed(place([host("s", *two)], [], {}, n, now=NOW, split_overhead_mib=600))
    # (2000 + 600) / 2 = 1300 per GPU, + 600 measured above the estimate on each
    assert p.gpus == (0, 1) and p.memory_mib == 2000 + 600 + 2 * 600


# ---------------------------------------------------------------- lost hosts


def test_lost_hosts_are_excluded_and_named() -> None:
    hosts = [host("a", gpu(0, 80), ts=NOW - 11), host("b", gpu(0, 24), ts=NOW - 9)]
    assert lost_hosts(hosts, NOW, 10) == ["a"]
    p = placed(place(hosts, [], {}, need(10), now=NOW, host_lost_after=10, strategy="spread"))
    assert p.host == "b"
    assert "1 of 2 hosts excluded: no heartbeat for over 10 s (a)" in p.reason


def test_no_hosts_at_all() -> None:
    assert "no hosts have joined yet" in nofit(place([], [], {}, need(1), now=NOW))


# ---------------------------------------------------------------- eviction


def full_gpu_cluster() -> tuple[list[HostRecord], list[InstanceRecord]]:
    hosts = [host("a", gpu(0, 24, used_gib=22), gpu(1, 24, used_gib=23))]
    running = [
        inst("old", "a", [0], 10, ready_at=100),
        inst("recent", "a", [0], 12, ready_at=200),
        inst("other", "a", [1], 23, ready_at=50),
    ]
    return hosts, running


def test_least_recently_used_idle_instance_is_evicted() -> None:
    hosts, running = full_gpu_cluster()
    activity = {"old": used(300), "recent": used(900), "other": used(950)}
    p = placed(place(hosts, running, activity, need(11), now=NOW))
    assert (p.gpus, p.evict) == ((0,), ("old",))
    assert "after stopping least recently used idle old, which frees 10.0 GiB" in p.reason


def test_never_used_instance_is_idle_since_it_became_ready() -> None:
    hosts, running = full_gpu_cluster()
    activity = {"old": used(900), "other": used(950)}  # "recent" never used: idle since 200
    assert placed(place(hosts, running, activity, need(11), now=NOW)).evict == ("recent",)


def test_busy_instance_is_never_evicted() -> None:
    hosts, running = full_gpu_cluster()
    activity = {"old": used(10, in_flight=1), "recent": used(20, in_flight=2), "other": used(5, 1)}
    reason = nofit(place(hosts, running, activity, need(11), now=NOW))
    assert "no idle instance could be stopped to make room (3 busy with requests in flight)" in (
        reason
    )


def test_keep_loaded_models_are_never_evicted() -> None:
    hosts, running = full_gpu_cluster()
    keep = frozenset({"model-old", "model-recent", "model-other"})
    reason = nofit(place(hosts, running, {}, need(11), now=NOW, keep_loaded=keep))
    assert "(3 marked keep_loaded)" in reason


def test_eviction_stops_as_few_as_possible_and_only_on_the_chosen_gpu() -> None:
    hosts, running = full_gpu_cluster()
    # evicting "other" (23 GiB, stalest) would free GPU 1 with one stop, like "recent" on GPU 0
    activity = {"old": used(400), "recent": used(300), "other": used(100)}
    p = placed(place(hosts, running, activity, need(20), now=NOW))
    assert (p.gpus, p.evict) == ((1,), ("other",))


def test_eviction_takes_several_idle_instances_when_one_is_not_enough() -> None:
    hosts, running = full_gpu_cluster()
    p = placed(place(hosts, running, {"other": used(999, 1)}, need(23), now=NOW))
    assert (p.gpus, set(p.evict)) == ((0,), {"old", "recent"})


def test_eviction_that_cannot_free_enough_says_how_much_it_could() -> None:
    hosts, running = full_gpu_cluster()
    reason = nofit(place(hosts, running, {"other": used(999, 1)}, need(30), now=NOW))
    assert "stopping idle instances would leave at most 24.0 GiB free on one GPU or host" in reason
    assert "(1 busy with requests in flight)" in reason


def test_another_instance_of_the_same_model_is_not_evicted_for_it() -> None:
    hosts = [host("a", gpu(0, 24, used_gib=20))]
    running = [inst("twin", "a", [0], 20, model="new")]
    assert isinstance(place(hosts, running, {}, need(10), now=NOW), NoFit)


# ---------------------------------------------------------------- the NoFit sentence


def test_nofit_reason_names_every_narrowing_step_with_sizes() -> None:
    hosts = [
        host("a", gpu(0, 8, used_gib=2.9)),
        host("b", gpu(0, 6)),
        host("c", gpu(0, 80), ts=NOW - 30),
    ]
    reason = nofit(place(hosts, [], {}, need(9.3), now=NOW))
    assert reason == (
        "no host can run new (needs 9.3 GiB): "
        "1 of 3 hosts excluded: no heartbeat for over 10 s (c); "
        "2 of 3 hosts excluded: not enough free memory on any GPU,"
        " largest free 6.0 GiB (b GPU 0), model needs 9.3 GiB; "
        "no idle instance could be stopped to make room"
    )


def test_unknown_strategy_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown placement strategy 'pack'"):
        place([host("a", gpu(0, 8))], [], {}, need(1), now=NOW, strategy="pack")


# ---------------------------------------------------------------- idle stop


def test_idle_is_measured_from_the_end_of_the_last_request() -> None:
    running = [inst("i", "a", [0], 1, ready_at=0)]
    assert idle_to_stop(running, {"i": used(NOW - 299)}, {}, 300, NOW) == []
    [(iid, why)] = idle_to_stop(running, {"i": used(NOW - 301)}, {}, 300, NOW)
    assert iid == "i" and why == "idle for 5 min (idle_timeout 300 s)"


def test_never_used_instance_is_idle_from_ready_at() -> None:
    running = [inst("i", "a", [0], 1, ready_at=NOW - 400)]
    assert [i for i, _ in idle_to_stop(running, {}, {}, 300, NOW)] == ["i"]


def test_per_model_timeout_overrides_and_zero_means_never() -> None:
    running = [
        inst("fast", "a", [0], 1, model="fast", ready_at=NOW - 100),
        inst("never", "a", [0], 1, model="never", ready_at=0),
        inst("default", "a", [0], 1, model="default", ready_at=NOW - 100),
    ]
    timeouts = {"fast": 60.0, "never": 0.0}
    assert [i for i, _ in idle_to_stop(running, {}, timeouts, 300, NOW)] == ["fast"]
    assert idle_to_stop(running, {}, {}, 0, NOW) == []  # global 0 = never


def test_instance_with_requests_in_flight_is_never_idle() -> None:
    running = [inst("i", "a", [0], 1, ready_at=0)]
    assert idle_to_stop(running, {"i": used(0, in_flight=1)}, {}, 1, NOW) == []


def test_only_ready_instances_are_stopped_longest_idle_first() -> None:
    running = [
        inst("b", "a", [0], 1, ready_at=500),
        inst("a", "a", [0], 1, ready_at=100),
        inst("s", "a", [0], 1, S.STARTING, ready_at=0),
    ]
    assert [i for i, _ in idle_to_stop(running, {}, {}, 10, NOW)] == ["a", "b"]


# ---------------------------------------------------------------- properties over random clusters


def random_cluster(
    rng: random.Random,
) -> tuple[list[HostRecord], list[InstanceRecord], dict[str, InstanceActivity]]:
    """Busy clusters: GPUs carry our instances (any state) plus foreign usage."""
    hosts, instances, activity = [], [], {}
    for h in range(rng.randint(1, 6)):
        hid = f"h{h}"
        gpus = []
        for g in range(rng.choice([0, 1, 2, 4])):
            total = rng.choice([8, 16, 24, 48, 80])
            loaded = 0.0
            for k in range(rng.randint(0, 4)):
                iid = f"{hid}-{g}-{k}"
                mem = rng.uniform(1, total / 3)
                state = rng.choice(list(S))
                loaded += mem if state in (S.READY, S.DRAINING, S.STOPPING) else 0
                instances.append(inst(iid, hid, [g], mem, state, ready_at=rng.uniform(0, NOW)))
                activity[iid] = used(rng.uniform(0, NOW), in_flight=rng.choice([0, 0, 1]))
            foreign = rng.choice([0, 0, 2, 6])
            gpus.append(gpu(g, total, used_gib=min(total, loaded + foreign), foreign_gib=foreign))
        ts = NOW - rng.choice([0, 1, 5, 30])
        hosts.append(host(hid, *gpus, ts=ts, ram_gib=64, ram_free_gib=rng.uniform(0, 64)))
    return hosts, instances, activity


def independent_free(h: HostRecord, g: int, instances: list[InstanceRecord]) -> float:
    """Free MiB on one GPU, computed the slow obvious way."""
    info = next(x for x in h.gpus if x.index == g)
    live = {S.PENDING, S.DOWNLOADING, S.STARTING, S.READY, S.DRAINING}
    claims = sum(
        i.memory_mib / len(i.gpus)
        for i in instances
        if i.host == h.host_id and g in i.gpus and i.state in live
    )
    foreign = sum(p.used_mib for p in info.processes if not p.ours)
    return info.memory_total_mib - max(info.memory_used_mib, claims + foreign)


@pytest.mark.parametrize("seed", range(300))
def test_random_clusters_obey_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    hosts, instances, activity = random_cluster(rng)
    keep = frozenset(i.model for i in instances if rng.random() < 0.2)
    n = need(rng.uniform(1, 40))
    strategy = rng.choice(["binpack", "spread"])
    result = place(hosts, instances, activity, n, now=NOW, strategy=strategy, keep_loaded=keep)
    alive = {h.host_id: h for h in hosts if NOW - h.ts <= 10}
    fits_now = [
        (independent_free(h, g.index, instances), h.host_id, g.index)
        for h in alive.values()
        for g in h.gpus
        if independent_free(h, g.index, instances) >= n.memory_mib
    ]
    if fits_now:  # a single GPU fits: take it, stop nothing, and pick the best by strategy
        p = placed(result)
        assert len(p.gpus) == 1 and p.evict == ()
        free = independent_free(alive[p.host], p.gpus[0], instances)
        best = (
            min(f for f, _, _ in fits_now)
            if strategy == "binpack"
            else max(f for f, _, _ in fits_now)
        )
        assert int(free) == int(best)
    if isinstance(result, NoFit):  # then not even stopping every idle instance frees a GPU
        assert result.reason.startswith("no host can run new")
        for h in alive.values():
            for g in h.gpus:
                idle = sum(
                    i.memory_mib
                    for i in instances
                    if i.host == h.host_id
                    and i.gpus == [g.index]
                    and i.state == S.READY
                    and i.model not in keep
                    and activity[i.instance_id].in_flight == 0
                )
                assert independent_free(h, g.index, instances) + idle < n.memory_mib
        return
    assert result.host in alive
    by_id = {i.instance_id: i for i in instances}
    for iid in result.evict:  # only idle, unpinned, READY instances on that host
        e = by_id[iid]
        assert e.state == S.READY and e.host == result.host and e.model not in keep
        assert activity[iid].in_flight == 0
    if result.gpus:
        freed = {g: 0.0 for g in result.gpus}
        for iid in result.evict:
            for g in by_id[iid].gpus:
                if g in freed:
                    freed[g] += by_id[iid].memory_mib / len(by_id[iid].gpus)
        share = result.memory_mib / len(result.gpus)
        for g in result.gpus:
            assert independent_free(alive[result.host], g, instances) + freed[g] >= share - 1


def test_a_cpu_hosts_own_ram_reserve_wins_over_the_placers_default():
    import msgspec

    h = msgspec.structs.replace(host("c", ram_gib=16, ram_free_gib=16), ram_reserve_mib=8 * GiB)
    assert isinstance(place([h], [], {}, need(10), now=NOW, ram_reserve_mib=1024), NoFit)
    loose = msgspec.structs.replace(h, ram_reserve_mib=None)
    assert placed(place([loose], [], {}, need(10), now=NOW, ram_reserve_mib=1024)).gpus == ()
