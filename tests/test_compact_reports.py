"""Gateways report only the instances used lately (services/gateway/report.py); the placer
rebuilds what a whole list would say (services/placer/activity.py, ReportedUse). Checked
against whole lists on random histories (seeded): the same in-flight counts, keep_alives and
last uses, except uses from before the placer's first report, which it takes as later than
they were (an idle stop put off, never brought forward), also when the placer missed
reports; and the placement index, told only what changed, merges the same as a merge from
scratch."""

from __future__ import annotations

import random

import msgspec
import pytest

import proto
from lls.config import parse
from proto import ActivityReport, InstanceActivity, InstanceRecord, InstanceState
from services.gateway.report import REPORT_HORIZON_S, activity_report
from services.gateway.router import Router
from services.placer.activity import ReportedUse, merge_activity
from services.placer.placement_eviction import _last_use
from services.placer.placement_index import PlacementIndex

CFG = parse({"models": {"m": {"url": "file:///m.gguf"}}})
T0 = 1_000_000.0


def record(iid: str, ready_at: float) -> InstanceRecord:
    return InstanceRecord(
        instance_id=iid,
        model="m",
        state=InstanceState.READY,
        created=ready_at,
        updated=ready_at,
        host="h1",
        gpus=[0],
        ready_at=ready_at,
    )


class Gateway:
    """A gateway's per-instance state (the real Router's dicts), changed at random."""

    def __init__(self, rng: random.Random, n: int) -> None:
        self.rng = rng
        self.r = Router(None, CFG, "gw1")  # type: ignore[arg-type]  # reports only
        self.recs = {f"i{k:03d}": record(f"i{k:03d}", T0 - rng.uniform(0, 600)) for k in range(n)}

    def step(self, now: float) -> None:
        r, rng = self.r, self.rng
        for iid in rng.sample(list(self.recs), 3):
            roll = rng.random()
            if roll < 0.4:  # a request begins
                r.in_flight[iid] = r.in_flight.get(iid, 0) + 1
                r.last_used[iid] = now
                r.busy_since.setdefault(iid, now)
                if rng.random() < 0.3:
                    r.keep_alive[iid] = rng.choice([-1.0, 0.0, 300.0])
                elif rng.random() < 0.5:
                    r.keep_alive.pop(iid, None)
            elif roll < 0.8 and r.in_flight.get(iid):  # one ends
                r.in_flight[iid] -= 1
                r.last_used[iid] = now

    def whole(self, now: float) -> ActivityReport:
        """What a gateway that lists everything would send."""
        r = self.r
        acts = {
            iid: InstanceActivity(
                r.in_flight.get(iid, 0), used, r.keep_alive.get(iid), r.busy_since.get(iid)
            )
            for iid, used in r.last_used.items()
        }
        return ActivityReport(gateway_id="gw1", ts=now, instances=acts)


def effective(recs: dict[str, InstanceRecord], acts: dict[str, InstanceActivity]) -> dict:
    """What the placer decides from, per instance: in flight, keep_alive, last use."""
    out = {}
    for iid, rec in recs.items():
        a = acts.get(iid)
        out[iid] = (a.in_flight if a else 0, a.keep_alive if a else None, _last_use(rec, a))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_compact_reports_rebuilt_say_what_whole_lists_say(seed: int) -> None:
    rng = random.Random(seed)
    gw = Gateway(rng, rng.choice([5, 20, 60]))
    used = ReportedUse()
    index = PlacementIndex()
    for rec in gw.recs.values():
        index.put_instance(rec)
    start = rng.choice([0, 0, 30, 200])  # the placer hears from the gateway from this step on
    now = T0
    missed_until = 0  # a placer that lags sees only a bucket's latest value: reports missed
    for step in range(300):
        now += rng.choice([0.5, 1.0, 1.0, 5.0])
        gw.step(now)
        if step < start or step < missed_until:
            continue
        if rng.random() < 0.02:
            missed_until = step + rng.randint(5, 80)
        compact = activity_report(gw.r, now)
        assert compact.horizon == REPORT_HORIZON_S
        assert all(
            a.last_used >= now - compact.horizon or a.in_flight or a.keep_alive is not None
            for a in compact.instances.values()
        )
        made, changed = used.take(compact, gw.recs.values())
        floor = used.floor("gw1")
        assert floor is not None
        got = effective(gw.recs, merge_activity([made], 0))
        want = effective(gw.recs, merge_activity([gw.whole(now)], 0))
        for iid, (flight, keep, last) in want.items():
            g_flight, g_keep, g_last = got[iid]
            assert (g_flight, g_keep) == (flight, keep), iid
            if last >= floor:
                assert g_last == last, iid  # seen since: exactly
            else:
                assert last <= g_last <= floor, iid  # before: never earlier than it was
        index.set_reports([made], {"gw1": changed} if changed is not None else None)
        assert index.activity == merge_activity([made], 0)


def test_a_compact_report_lists_only_what_was_used_lately_and_stays_small() -> None:
    gw = Gateway(random.Random(1), 0)
    r, now = gw.r, T0
    for k in range(40_000):
        r.last_used[f"m-{k:08x}-{k:08x}"] = now - 2000 + k * 0.05 + 0.025  # the last 60 s: 1,200
    r.in_flight["m-00000000-00000000"] = 1  # in flight (its request began an hour ago)
    r.keep_alive["m-00000001-00000001"] = -1.0  # kept loaded by an Ollama client
    rep = activity_report(r, now)
    assert len(rep.instances) == 1_200 + 2
    assert len(proto.encode(rep)) < 200_000  # a whole list: ~4 MB, over NATS's 1 MiB
    assert len(proto.encode(gw.whole(now))) > 1 << 20


def test_an_instance_its_record_brings_late_gets_the_floor_and_one_ready_since_does_not() -> None:
    """The placer's first report from a gateway may come before the instance records: one
    live from before the report's horizon gets the floor then, one started since does not."""
    used = ReportedUse()
    rep = ActivityReport(gateway_id="gw1", ts=T0, instances={}, horizon=60.0)
    made, changed = used.take(rep, [])
    assert changed is None and made.instances == {}
    old = record("old", T0 - 3600)
    seeded = used.seed(old)
    assert seeded["gw1"].instances == {"old": InstanceActivity(0, T0 - 60.0)}
    assert used.seed(old) == {}  # once
    assert used.seed(record("new", T0 - 10)) == {}  # it became ready after the floor
    starting = msgspec.structs.replace(record("s", T0 - 3600), state=InstanceState.STARTING)
    assert "s" in used.seed(starting)["gw1"].instances  # live: it may be used once READY
    used.forget("old")
    assert "old" not in used.seed(record("x", T0 - 3600))["gw1"].instances


def test_a_whole_list_from_an_older_gateway_is_taken_as_it_is() -> None:
    used = ReportedUse()
    acts = {"a": InstanceActivity(1, T0)}
    rep = ActivityReport(gateway_id="gw1", ts=T0, instances=acts)
    assert used.take(rep, [record("b", T0 - 3600)]) == (rep, None)


def test_lls_ps_says_an_instance_no_gateway_lists_is_idle_over_the_horizon() -> None:
    from lls.cli_views import idle_text

    rec = record("a", T0 - 3600)
    assert idle_text(rec, T0 - 5, 60.0, T0) == "5s"  # listed: exactly
    assert idle_text(rec, None, 60.0, T0) == "over 60s"  # listed by none: at least
    assert idle_text(rec, None, 0.0, T0) == "60m"  # whole lists (older gateways): since ready
    assert idle_text(record("b", T0 - 20), None, 60.0, T0) == "20s"  # ready since: exactly
    starting = msgspec.structs.replace(rec, state=InstanceState.STARTING)
    assert idle_text(starting, None, 60.0, T0) == "-"


async def test_a_gateway_gone_for_ten_minutes_is_forgotten_by_the_placer() -> None:
    """A gateway's record ends by its TTL, which no watch hears: a restarted gateway (a new
    id) must not leave its rebuilt list, an entry per instance, in the placer for good."""
    import asyncio
    from types import SimpleNamespace

    from services.placer.watches import GATEWAY_GONE_S, Watches

    bus = SimpleNamespace(refuse_record=lambda *a: None)
    w = Watches(CFG, bus, asyncio.Event(), PlacementIndex())  # type: ignore[arg-type]
    w.on_instance("k", record("a", T0 - 3600), 1)
    for gw, ts in (("old", T0), ("new", T0 + GATEWAY_GONE_S - 1)):
        w.on_activity(gw, ActivityReport(gateway_id=gw, ts=ts, horizon=60.0), 2)
    assert set(w.activity) == {"old", "new"}
    w.on_activity(
        "new", ActivityReport(gateway_id="new", ts=T0 + GATEWAY_GONE_S + 1, horizon=60.0), 3
    )
    assert set(w.activity) == {"new"} and w.reported.floor("old") is None
