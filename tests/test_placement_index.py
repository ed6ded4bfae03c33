"""The indexed placement (services/placer/indexed_placement.py) against the straightforward
one, on random clusters: the same decision and the same sentence, always (seeded generator)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from msgspec.structs import replace as replace_struct

from proto.messages import (
    ActivityReport,
    FileInfo,
    GpuInfo,
    GpuProcess,
    HostRecord,
    InstanceActivity,
    InstanceRecord,
    InstanceState,
    ModelQueue,
)
from services.placer import indexed_eviction, indexed_placement
from services.placer.activity import merge_activity
from services.placer.placement import Need, NoFit, Placed
from services.placer.placement_eviction import spare_copies
from services.placer.placement_index import PlacementIndex
from services.placer.plan_demand import demand_gate, place_in, plan_demand
from services.placer.plan_view import Limits, View
from services.placer.turns import merged_queues

S = InstanceState
NOW = 10_000.0
STATES = [S.PENDING, S.DOWNLOADING, S.STARTING, S.READY, S.READY, S.READY, S.READY, S.DRAINING]
STATES += [S.STOPPING, S.STOPPED, S.FAILED, S.LOST]


def t(rng: random.Random, span: int = 40) -> float:
    """A time in the last `span` seconds, whole seconds: ties happen, as they must be tested."""
    return NOW - rng.randint(0, span)


class Cluster:
    """A random cluster, and the changes a placer's watches would see."""

    def __init__(self, rng: random.Random, n_hosts: int, n_models: int) -> None:
        self.rng = rng
        self.models = [f"m{i}" for i in range(n_models)]
        self.hosts: dict[str, HostRecord] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self.reports: dict[str, ActivityReport] = {}
        self.n = 0
        self.full = rng.random() < 0.6  # most GPUs nearly full: decisions evict
        for h in range(n_hosts):
            self.hosts[f"h{h:02d}"] = self.host(f"h{h:02d}")
        for _ in range(n_hosts * rng.randint(1, 5)):
            rec = self.instance()
            self.instances[rec.instance_id] = rec
        for g in range(rng.randint(0, 3)):
            self.reports[f"gw{g}"] = self.report(f"gw{g}")

    def host(self, hid: str) -> HostRecord:
        rng = self.rng
        gpus = []
        if rng.random() < 0.8:
            mixed = rng.random() < 0.2
            for i in range(rng.choice([1, 2, 2, 4, 4, 8])):
                total = rng.choice([8, 16, 24]) * 1024
                procs = [GpuProcess(1, rng.choice([300, 2048]))] if rng.random() < 0.2 else []
                name = rng.choice(["a", "b"]) if mixed else "a"
                used = total - rng.randint(0, 1500) if self.full else rng.randint(0, total)
                gpus.append(GpuInfo(i, f"{hid}-{i}", name, total, used, processes=procs))
        ram = rng.choice([8, 32, 64]) * 1024
        return HostRecord(
            host_id=hid,
            ts=t(rng, 30),
            started_at=0.0,
            runtime="process",
            gpus=gpus,
            cpu_count=8,
            ram_total_mib=ram,
            ram_free_mib=rng.randint(0, 2048 if self.full else ram),
            ram_reserve_mib=rng.choice([None, None, 512]),
            files=[FileInfo(m, f"{m}.gguf", 1) for m in self.models if rng.random() < 0.2],
            instances=[i for i in self.instances if rng.random() < 0.5],
        )

    def instance(self) -> InstanceRecord:
        rng = self.rng
        self.n += 1
        host = rng.choice(
            [*self.hosts, None] if rng.random() < 0.05 or not self.hosts else list(self.hosts)
        )
        gpus: list[int] = []
        h = self.hosts.get(host or "")
        if h is not None and h.gpus and rng.random() < 0.9:
            k = rng.choice([1, 1, 1, 2]) if len(h.gpus) > 1 else 1
            gpus = sorted(rng.sample([g.index for g in h.gpus], k))
        state = rng.choice(STATES)
        ready = t(rng) if state in (S.READY, S.DRAINING) and rng.random() < 0.9 else None
        drain_for = rng.choice(["", *self.models]) if state == S.DRAINING else ""
        return InstanceRecord(
            instance_id=f"i{self.n:03d}",
            model=rng.choice(self.models),
            state=state,
            created=0.0,
            updated=t(rng),
            host=host,
            gpus=gpus,
            memory_mib=rng.choice([1000, 2000, 3000, 5000, 9000]),
            ready_at=ready,
            drain_for=drain_for,
            drain_since=t(rng) if drain_for else None,
        )

    def report(self, gw: str) -> ActivityReport:
        rng = self.rng
        acts = {}
        for iid in self.instances:
            if rng.random() < 0.6:
                acts[iid] = InstanceActivity(
                    rng.choice([0, 0, 0, 1, 2]),
                    t(rng),
                    rng.choice([None, None, None, -1.0, 0.0, 30.0]),
                    rng.choice([None, t(rng)]),
                )
        queues = {
            m: ModelQueue(rng.randint(1, 3), t(rng)) for m in self.models if rng.random() < 0.15
        }
        draining = [
            i for i, r in self.instances.items() if r.state == S.DRAINING and rng.random() < 0.7
        ]
        return ActivityReport(
            gateway_id=gw,
            ts=NOW - rng.choice([0, 0, 0, 1, 30]),  # some gone stale
            instances=acts,
            queues=queues,
            draining=draining,
        )

    def change(self, index: PlacementIndex) -> None:
        """One thing changing, seen by the index as the service's watches would show it."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.45 and self.instances:
            iid = rng.choice(list(self.instances))
            if rng.random() < 0.15:
                del self.instances[iid]
                index.delete_instance(iid)
                return
            new = self.instance()
            rec = replace_rec(new, instance_id=iid, created=self.instances[iid].created)
            if rng.random() < 0.5:  # the same host and GPUs, in another state
                old = self.instances[iid]
                rec = replace_rec(rec, host=old.host, gpus=old.gpus, model=old.model)
            self.instances[iid] = rec
            index.put_instance(rec)
        elif roll < 0.55:
            rec = self.instance()
            self.instances[rec.instance_id] = rec
            index.put_instance(rec)
        elif roll < 0.8 and self.hosts:
            hid = rng.choice(list(self.hosts))
            if rng.random() < 0.05:
                del self.hosts[hid]
                index.delete_host(hid)
                return
            self.hosts[hid] = self.host(hid)
            index.put_host(self.hosts[hid])
        else:
            gw = f"gw{rng.randint(0, 3)}"
            if gw in self.reports and rng.random() < 0.2:
                del self.reports[gw]
            else:
                self.reports[gw] = self.report(gw)

    def limits(self) -> Limits:
        rng = self.rng
        return Limits(
            models=frozenset(self.models),
            keep_loaded=frozenset(m for m in self.models if rng.random() < 0.1),
            strategy=rng.choice(["binpack", "binpack", "spread"]),
            min_turn=rng.choice([0.0, 5.0]),
            max_turn=rng.choice([10.0, 30.0]),
            ram_reserve_mib=rng.choice([1024, 1024, 0]),
            groups={m: "g" for m in self.models if rng.random() < 0.1},
        )

    def view(self, limits: Limits, index: PlacementIndex | None) -> View:
        rng = self.rng
        ready = [i for i, r in self.instances.items() if r.state == S.READY]
        return View(
            instances=self.instances,
            hosts=self.hosts,
            heard={h: t(rng, 15) for h in self.hosts if rng.random() < 0.95},
            reports=list(self.reports.values()),
            queues=merged_queues(self.reports.values(), NOW - 10),
            last_demand={m: t(rng) for m in self.models if rng.random() < 0.3},
            limits=limits,
            pinned=frozenset(m for m in self.models if rng.random() < 0.05),
            unsettled=frozenset(i for i in ready if rng.random() < 0.1),
            index=index,
        )

    def need(self) -> Need:
        rng = self.rng
        model = rng.choice([*self.models, "new"])
        memory = rng.choice([0, 1000, 2500, 4000, 6000, 9000, 14000, 20000, 40000])
        return Need(
            model,
            memory,
            n_layers=rng.choice([0, 0, 1, 2, 32]),
            pin_host=rng.choice(list(self.hosts)) if self.hosts and rng.random() < 0.1 else None,
            pin_gpus=(0,) if rng.random() < 0.05 else (),
            file_hosts=frozenset(h for h in self.hosts if rng.random() < 0.15),
            cpu_memory_mib=rng.choice([0, memory // 2]),
            gpu_memory_mib={"b": memory + 700} if rng.random() < 0.2 else {},
        )


def replace_rec(rec: InstanceRecord, **kw: object) -> InstanceRecord:
    return replace_struct(rec, **kw)  # type: ignore[no-any-return]


def indexed(c: Cluster) -> PlacementIndex:
    """An index fed the way the service feeds it: one record at a time."""
    idx = PlacementIndex()
    for h in c.hosts.values():
        idx.put_host(h)
    for r in c.instances.values():
        idx.put_instance(r)
    return idx


def same(c: Cluster, idx: PlacementIndex, stats: dict[str, int]) -> None:
    """Every decision the index can take matches the straightforward one."""
    rng = c.rng
    limits = c.limits()
    plain = c.view(limits, None)
    fast = replace(plain, index=idx)
    for _ in range(6):
        need = c.need()
        exclude = rng.choice([None, None, *c.instances]) if c.instances else None
        may_evict = rng.random() < 0.8
        may_drain = {i: float(n) for n, i in enumerate(c.instances) if rng.random() < 0.3}
        for drains in (None, may_drain):
            want = place_in(
                plain, need, NOW, exclude=exclude, may_drain=drains, may_evict=may_evict
            )
            got = place_in(fast, need, NOW, exclude=exclude, may_drain=drains, may_evict=may_evict)
            assert got == want, (need, exclude, may_evict, drains)
            quick = indexed_placement.place_indexed(
                idx,
                fast.hosts,
                need,
                now=NOW,
                fresh=fast.fresh(NOW),
                queues=fast.queues,
                strategy=limits.strategy if need.memory_mib else "spread",
                host_lost_after=limits.host_lost_after,
                heard=fast.heard,
                ram_reserve_mib=limits.ram_reserve_mib,
                keep_loaded=fast.keep_loaded(),
                may_drain=drains,
                unsettled=fast.unsettled,
                may_evict=may_evict,
                exclude=exclude,
            )
            stats["asked"] += 1
            if quick is not None:
                stats["fast"] += 1
                assert quick == want
                if isinstance(quick, Placed) and quick.evict:
                    stats["evicting"] += 1
                if isinstance(quick, NoFit):
                    stats["nofit"] += 1
        model = need.model
        assert demand_gate(fast, model, NOW) == demand_gate(plain, model, NOW)
        assert plan_demand(fast, model, need, NOW) == plan_demand(plain, model, need, NOW)


def derived_state_matches(c: Cluster, idx: PlacementIndex) -> None:
    """What the index keeps equals what the view says, worked out from scratch."""
    fresh = [r for r in c.reports.values() if r.ts >= NOW - 10]
    idx.sync(fresh, keep_loaded=idx.keep_loaded, ram_reserve_mib=idx.ram_reserve_mib)
    assert idx.activity == merge_activity(c.reports.values(), NOW - 10)
    spares = spare_copies(c.instances.values(), idx.activity)
    assert {i for i in c.instances if idx.is_spare(i)} == spares
    assert list(idx.instances) == list(c.instances)
    fresh_idx = indexed(c)
    fresh_idx.sync(fresh, keep_loaded=idx.keep_loaded, ram_reserve_mib=idx.ram_reserve_mib)
    assert fresh_idx.gpu_free == idx.gpu_free and fresh_idx.ram_free == idx.ram_free
    assert fresh_idx._entries == idx._entries


@pytest.mark.parametrize("suffix_max", [64, 0], ids=["rank-few", "walk-stalest"])
def test_the_indexed_placement_decides_as_the_straightforward_one(
    suffix_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indexed_eviction, "SUFFIX_MAX", suffix_max)
    stats = {"asked": 0, "fast": 0, "evicting": 0, "nofit": 0}
    for seed in range(60):
        rng = random.Random(seed)
        c = Cluster(rng, n_hosts=rng.randint(1, 14), n_models=rng.randint(2, 8))
        same(c, indexed(c), stats)
    # The index answered most of them itself, evictions and refusals included.
    assert stats["fast"] > stats["asked"] * 0.3, stats
    assert stats["evicting"] > 0 and stats["nofit"] > 0, stats


def test_the_index_follows_records_heartbeats_and_reports_as_they_change() -> None:
    stats = {"asked": 0, "fast": 0, "evicting": 0, "nofit": 0}
    for seed in range(25):
        rng = random.Random(1000 + seed)
        c = Cluster(rng, n_hosts=rng.randint(2, 10), n_models=rng.randint(2, 6))
        idx = indexed(c)
        for _ in range(12):
            for _ in range(rng.randint(1, 6)):
                c.change(idx)
            derived_state_matches(c, idx)
            same(c, idx, stats)
    assert stats["fast"] > stats["asked"] * 0.3, stats


def test_a_big_full_cluster_evicts_from_the_index_as_the_scan_would() -> None:
    """Enough GPUs that the eviction search walks its stalest-first lists."""
    stats = {"asked": 0, "fast": 0, "evicting": 0, "nofit": 0}
    rng = random.Random(7)
    c = Cluster(rng, n_hosts=60, n_models=12)
    idx = indexed(c)
    same(c, idx, stats)
    for _ in range(5):
        c.change(idx)
        same(c, idx, stats)
    assert stats["fast"] > stats["asked"] * 0.3, stats


def gpu(index: int, used: int, total: int = 24 * 1024) -> GpuInfo:
    return GpuInfo(index, f"g{index}", "a", total, used)


def ready(iid: str, model: str, g: int, mib: int, ready_at: float) -> InstanceRecord:
    return InstanceRecord(
        instance_id=iid, model=model, state=S.READY, created=0.0, updated=0.0, host="h",
        gpus=[g], memory_mib=mib, ready_at=ready_at,
    )  # fmt: skip


def test_a_busy_instance_that_frees_a_gpu_alone_beats_two_idle_ones_on_its_host() -> None:
    """On one host, GPU 0 needs two idle instances stopped and GPU 1 one busy one drained
    (its other instance is kept loaded, so not a victim): the host's best is the drain
    (fewer stopped), so the index must not take the idle pair without asking who yields;
    and another host's idle pair then wins, as in the straightforward scan."""
    host = HostRecord("h", NOW, 0.0, "process", [gpu(0, 24 * 1024), gpu(1, 24 * 1024)], 8, 1, 0)
    other = replace_rec(host, host_id="o", gpus=[gpu(0, 24 * 1024)])
    recs = [
        ready("a1", "a", 0, 12 * 1024, NOW - 900),
        ready("a2", "b", 0, 12 * 1024, NOW - 800),
        ready("k", "kept", 1, 4 * 1024, NOW - 990),  # idle, but keep_loaded
        ready("busy", "c", 1, 20 * 1024, NOW - 600),
        ready("o1", "d", 0, 12 * 1024, NOW - 700),
        ready("o2", "e", 0, 12 * 1024, NOW - 500),
    ]
    recs = [replace_rec(r, host="o") if r.instance_id.startswith("o") else r for r in recs]
    rep = ActivityReport("gw", NOW, instances={"busy": InstanceActivity(1, NOW)})
    idx = PlacementIndex()
    for h in (host, other):
        idx.put_host(h)
    for r in recs:
        idx.put_instance(r)
    plain = View(
        instances={r.instance_id: r for r in recs},
        hosts={"h": host, "o": other},
        heard={"h": NOW, "o": NOW},
        reports=[rep],
        limits=Limits(models=frozenset({"new"}), keep_loaded=frozenset({"kept"})),
    )
    need = Need("new", 20 * 1024)
    drains = {"busy": 0.0}
    want = place_in(plain, need, NOW, may_drain=drains)
    assert isinstance(want, Placed) and want.host == "o" and want.evict == ("o1", "o2")
    assert place_in(replace(plain, index=idx), need, NOW, may_drain=drains) == want
