"""Faults across real network hosts (issue 13's "Numbers to report"), from one run.

A HostLab (lab/hosts.py: three network namespaces on a bridge, a three-node NATS cluster
with 3 replicas, agent + downloader per host, placer + gateway on h1 and h2; tiny GGUFs,
the process runtime, simulated GPUs) is started once; then, as tests/test_hosts.py does
and with the same code (lab/faults.py), under a bounded steady load of small
completions (3 clients, each request with a 30 s deadline):

  baseline   cold starts of "m" (its file on the last host only: no download) and "wide"
             (downloaded to h1/h2) = the models' own load time, demand to READY; served/s
             with no fault
  short drop the last host's link down for host_lost_after/4: nothing may be rescheduled
  host lost  the last host's link down until "m" is READY elsewhere, then healed: the
             stale copy goes
  leader cut the leading placer's host cut off until another holds the lease
  NATS kill  h1's node SIGKILLed, a cold model asked meanwhile, the node restarted

and prints each figure next to its goal, the goals computed from figures of this run.
With --hosts 3 (the default) the lost host is h3, which runs a NATS node; with --hosts 4
it is h4, which runs none: the difference is what the NATS cluster's own fail-over costs.
Needs root (network namespaces), nats-server and the cached llama-server. Not a test.

    sudo .venv/bin/python bench/bench_hosts.py [--hosts 3] [--host-lost-after 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]

import make_tiny_gguf  # noqa: E402
import proto  # noqa: E402
from conftest import cached_llama_server  # noqa: E402
from lab import faults, observe  # noqa: E402
from lab.hosts import NATS_NODES, HostLab  # noqa: E402
from lab.load import Load  # noqa: E402
from lab.network import unavailable  # noqa: E402
from lls.bus import Bus  # noqa: E402
from services.placer.lease import LEASE_TTL_S  # noqa: E402

BASELINE_S = 8.0  # load with no fault, for the served/s each fault is compared against
SLACK_S = 2.0  # the "+ under 2 s" on top of host_lost_after + load time


class Report:
    """Figures as rows: what, measured, goal, verdict."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.loads: list[tuple[str, str, Load | None, tuple[int, int, int] | None]] = []
        self.failed: list[str] = []
        self.leaders: dict[str, str] = {}  # stream -> its leader node, before the last fault

    def led_by(self, host: str) -> str:
        """The streams whose leader was `host`'s node before the fault."""
        return ", ".join(sorted(s for s, n in self.leaders.items() if n == f"n-{host}")) or "none"

    def figure(self, what: str, got: str, goal: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("ok" if ok else "MISSED")
        self.rows.append((what, got, goal, verdict))

    def load(
        self, fault: str, window: str, load: Load | None, during: tuple[int, int, int] | None
    ) -> None:
        self.loads.append((fault, window, load, during))

    def print(self, base_rate: float) -> None:
        w = max(len(r[0]) for r in self.rows)
        g = max(len(r[1]) for r in self.rows)
        print(f"\n{'figure':<{w}}  {'measured':<{g}}  goal")
        for what, got, goal, verdict in self.rows:
            print(f"{what:<{w}}  {got:<{g}}  {goal}{'  ' + verdict if verdict else ''}")
        print("\nrequests (3 clients, 30 s deadline each): whole fault run | the fault's window")
        print(f"{'fault':<12} {'served':>6} {'refused':>7} {'hung':>4} {'served/s':>8} {'vs base':>7}"
              f" {'max wait':>8} | {'window':<24} {'served':>6} {'refused':>7} {'hung':>4}")  # fmt: skip
        for fault, window, load, during in self.loads:
            if load is None:
                print(f"{fault:<12} (did not run)")
                continue
            rate = served_rate(load)
            ratio = rate / base_rate if base_rate else float("nan")
            s, r, h = during if during is not None else ("-", "-", "-")
            print(f"{fault:<12} {load.served:>6} {len(load.refused):>7} {len(load.hung):>4} "
                  f"{rate:>8.2f} {ratio:>6.2f}x {longest(load):>7.2f}s | {window:<24} {s:>6} {r:>7} {h:>4}")  # fmt: skip
        reasons = sorted(
            {f"{o.status} {o.error[:100]}" for _, _, ld, _ in self.loads if ld for o in ld.refused}
        )
        for why in reasons:
            print(f"  refusal: {why}")
        for f in self.failed:
            print(f"FAILED: {f}")


def longest(load: Load) -> float:
    """The longest any request took (served, refused or hung)."""
    return max((o.seconds for o in load.outcomes), default=0.0)


def served_rate(load: Load) -> float:
    ends = [o.at for o in load.outcomes]
    span = max(ends) - min(o.at - o.seconds for o in load.outcomes) if ends else 0.0
    return load.served / span if span > 0 else 0.0


async def on(
    lab: HostLab,
    avoid: tuple[str, ...],
    body: Callable[[Bus], Awaitable[Any]],
    rep: Report | None = None,
    name: str = "",
) -> Any:
    """Run a fault on a bus that avoids the nodes it cuts; leave the lab whole after it."""
    bus = await lab.bus(avoid=avoid)
    try:
        if rep is not None:
            rep.leaders = await observe.stream_leaders(bus)
        before = await observe.lease(bus)
        got = await body(bus)
        after = await observe.until(lambda: observe.lease(bus), 20, "the lease readable")
        if rep is not None and (after.holder, after.epoch) != (before.holder, before.epoch):
            rep.figure(f"  {name}: the lease changed hands", f"{holder(before)} -> {holder(after)}")
        return got
    finally:
        try:
            for h in lab.hosts[:NATS_NODES]:
                lab.start_nats(h.name)
            await faults.healed(lab, bus)
        finally:
            await bus.close()


async def scenario(lab: HostLab, host_lost_after: float, rep: Report) -> float:
    """Every fault in turn; returns the baseline served/s."""
    coordinators = lab.coordinators
    last = lab.hosts[-1].name  # holds m's file: m runs there, and it is the host cut
    nodes = [h.name for h in lab.hosts[:NATS_NODES]]

    async def baseline(bus: Bus) -> tuple[float, float, str, float, Load]:
        t_m, m = await faults.cold_start(bus, lab.gateway_url("h1"), "m")
        t_wide, wide = await faults.cold_start(bus, lab.gateway_url("h2"), "wide")
        async with Load(lab.gateway_url("h2"), "m") as load:
            await asyncio.sleep(BASELINE_S)
        rep.figure(f"cold start m on {m.host} (file there), demand to READY", f"{t_m:.2f} s")
        rep.figure(f"cold start wide on {wide.host} (downloaded), demand to READY", f"{t_wide:.2f} s")  # fmt: skip
        return t_m, t_wide, wide.host, served_rate(load), load

    t_m, t_wide, _, base_rate, base_load = await on(lab, (), baseline)
    rep.load("baseline", "", base_load, None)

    # 2. a short drop: nothing rescheduled
    async def drop(bus: Bus) -> faults.ShortDrop:
        async with observe.EventTap(bus) as tap:
            got = await faults.short_drop(lab, bus, "m", "h2", host_lost_after / 4)
            last = await tap.settle()
        events(rep, "short drop", tap, last)
        return got

    try:
        sd = await on(lab, (last,), drop, rep, "short drop")
        moved = sd.after.instance_id != sd.before.instance_id
        rep.figure(f"short drop ({sd.seconds:.1f} s of {sd.cut}): rescheduled",
                   f"{int(moved)} (host.lost events {len(sd.host_lost)})", "0",
                   not moved and not sd.host_lost)  # fmt: skip
        rep.load("short drop", "", sd.load, None)
    except Exception:  # noqa: BLE001 - report it, go on with the next fault
        fail(rep, "short drop")
        rep.load("short drop", "", None, None)

    # 1. a host lost
    async def lose(bus: Bus) -> faults.HostLost:
        async with observe.EventTap(bus) as tap:
            got = await faults.host_lost(lab, bus, "m", "h2")
            last = await tap.settle()
        events(rep, "host lost", tap, last)
        return got

    try:
        hl = await on(lab, (last,), lose, rep, "host lost")
        goal = host_lost_after + t_m + SLACK_S
        goal_dl = host_lost_after + t_wide + SLACK_S
        if hl.moved is None:
            rep.figure(f"host lost ({hl.cut}): m READY elsewhere", f"not in {faults.MOVE_WITHIN_S:g} s",
                       f"< {goal:.2f} s", False)  # fmt: skip
        else:
            node = "a NATS node's host" if hl.cut in nodes else "no NATS node"
            rep.figure(f"host lost ({hl.cut}, {node}): m READY on {hl.moved.host} after the cut",
                       f"{hl.t_moved:.2f} s",
                       f"< {goal:.2f} s = host_lost_after {host_lost_after:g} + m's load "
                       f"{t_m:.2f} + {SLACK_S:g}", hl.t_moved < goal)  # fmt: skip
            rep.figure("  same, goal with a download in the load time", f"{hl.t_moved:.2f} s",
                       f"< {goal_dl:.2f} s = {host_lost_after:g} + wide's load {t_wide:.2f} "
                       f"+ {SLACK_S:g}", hl.t_moved < goal_dl)  # fmt: skip
            rep.figure("  stale copy stopped after heal", f"{hl.t_stale:.2f} s")
            rep.figure("  duplicate instances after heal", str(len(hl.duplicates)), "0",
                       not hl.duplicates and len(hl.final) == 1)  # fmt: skip
        rep.figure(f"  clients of {hl.cut}'s node from other hosts (fail over on pings)",
                   ", ".join(hl.stalls) or "none")  # fmt: skip
        rep.figure(f"  streams led by {hl.cut}'s node (a new leader elected)", rep.led_by(hl.cut))
        rep.load("host lost", "cut to READY elsewhere", hl.load, hl.during)
    except Exception:  # noqa: BLE001
        fail(rep, "host lost")
        rep.load("host lost", "", None, None)

    # 4. the leader placer's host cut off
    async def leader(bus: Bus) -> faults.LeaderCut:
        async with observe.EventTap(bus) as tap:
            got = await faults.leader_cut(lab, bus, "m")
            last = await tap.settle()
        events(rep, "leader cut", tap, last)
        return got

    try:
        lc = await on(lab, coordinators, leader, rep, "leader cut")
        if lc.after is None:
            rep.figure(f"leader cut ({lc.cut}): take-over", f"not in {faults.MOVE_WITHIN_S:g} s",
                       f"within the lease TTL {LEASE_TTL_S:g} s + renewal", False)  # fmt: skip
        else:
            rep.figure(f"leader cut ({lc.cut}): {lc.other}'s placer took over",
                       f"{lc.t_over:.2f} s (epoch {lc.before.epoch}->{lc.after.epoch})",
                       f"lease TTL {LEASE_TTL_S:g} s ({lc.t_over / LEASE_TTL_S:.2f}x)")  # fmt: skip
            fenced = lc.refusal is not None and lc.still is not None
            rep.figure("  deposed leader's stop acted on", "no (refused)" if fenced else "yes",
                       "no", fenced)  # fmt: skip
            rep.figure("  duplicate instances after heal", str(len(lc.duplicates)), "0",
                       not lc.duplicates)  # fmt: skip
        rep.figure(f"  clients of {lc.cut}'s node from other hosts (fail over on pings)",
                   ", ".join(lc.stalls) or "none")  # fmt: skip
        rep.figure(f"  streams led by {lc.cut}'s node (a new leader elected)", rep.led_by(lc.cut))
        rep.load("leader cut", "cut to take-over", lc.load, lc.during)
    except Exception:  # noqa: BLE001
        fail(rep, "leader cut")
        rep.load("leader cut", "", None, None)

    # 3. a NATS node killed
    try:
        nk = await on(
            lab, ("h1",), lambda bus: faults.nats_kill(lab, bus, "h1", "m", "n"), rep, "NATS kill"
        )
        events(rep, "NATS kill", nk.tap, nk.last)
        if not nk.t_down:
            rep.figure("NATS kill (h1): cold model n", f"not served: {nk.cold[-1]}", "served", False)  # fmt: skip
        else:
            rep.figure("NATS kill (h1): node down", f"{nk.t_down:.2f} s")
            s, r, h = nk.during
            rep.figure("  requests while it was down", f"served {s}, refused {r}, hung {h}",
                       "kept flowing, 0 hung", s > 0 and h == 0)  # fmt: skip
            rep.figure("  longest time with nothing served meanwhile", f"{nk.longest_gap:.2f} s")
            was = f"; it was live before: {len(nk.cold_before)}" if nk.cold_before else ""
            rep.figure("  cold model n served (commands, records) after the kill",
                       f"{nk.t_cold:.2f} s ({len(nk.cold) - 1} clear refusals first{was})")  # fmt: skip
            rep.figure("  h1's gateway serving again after restart", f"{nk.t_again:.2f} s")
            rep.figure("  streams led by h1's node (a new leader elected)", rep.led_by("h1"))
            rep.figure("  hosts declared lost meanwhile (none was cut)",
                       ", ".join(nk.host_lost) or "none", "none", not nk.host_lost)  # fmt: skip
            moved = len(set(nk.served_by)) > 1
            rep.figure("  m's instance replaced meanwhile", " -> ".join(nk.served_by),
                       "no", not moved)  # fmt: skip
            rep.figure("  replicas of events, commands, instances",
                       "/".join(str(n) for n in nk.replicas.values()), "3/3/3",
                       all(n == 3 for n in nk.replicas.values()))  # fmt: skip
        rep.load("NATS kill", "node down", nk.load, nk.during if nk.t_down else None)
    except Exception:  # noqa: BLE001
        fail(rep, "NATS kill")
        rep.load("NATS kill", "", None, None)

    # The whole run: KV's records against the event log; duplicates; commands left.
    async def final(bus: Bus) -> None:
        problems = await observe.settled_disagreements(bus)
        rep.figure("whole run: instance records KV vs rebuilt from events",
                   f"{len(problems)} differ", "0", not problems)  # fmt: skip
        for p in problems:
            rep.figure("  differs", p)
        cmds = await bus.js.stream_info(proto.CMDS_STREAM)
        rep.figure("whole run: commands left unconsumed", str(cmds.state.messages), "0",
                   cmds.state.messages == 0)  # fmt: skip
        dup = await observe.duplicates(bus)
        rep.figure("whole run: duplicate instances at the end", str(len(dup)), "0", not dup)

    try:
        await on(lab, (), final)
    except Exception:  # noqa: BLE001
        fail(rep, "final checks")
    return base_rate


def events(rep: Report, fault: str, tap: observe.EventTap, last: int) -> None:
    """Events the stream numbered during the fault vs those an ordered consumer saw."""
    published = last - tap.seq0
    lost = len(set(range(tap.seq0 + 1, last + 1)) - set(tap.seqs))
    rep.figure(f"{fault}: events lost (stream seq vs seen)",
               f"{lost} ({len(tap.seqs)} seen of {published})", "0", lost == 0)  # fmt: skip


def holder(rec: proto.LeaseRecord) -> str:
    return f"{rec.holder.rsplit('-', 1)[0]} (epoch {rec.epoch})"


def fail(rep: Report, fault: str) -> None:
    rep.failed.append(f"{fault}: {traceback.format_exc(limit=-6)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host-lost-after", type=float, default=4.0, help="placer.host_lost_after")
    ap.add_argument("--hosts", type=int, default=3, help="3: m's host runs a NATS node; 4: not")
    ap.add_argument("--keep", default="", help="keep the lab's logs and files in this folder")
    args = ap.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"error: {why}")
    if cached_llama_server() is None:
        raise SystemExit("error: no llama-server (run scripts/build-llama-server.sh)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(args.keep) if args.keep else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)

        def gguf(seed: int) -> Path:
            path = tmp / f"tiny-{seed}.gguf"
            if not path.exists():
                make_tiny_gguf.write(path, seed)
            return path

        rep = Report()
        t0 = time.monotonic()
        spec = faults.fault_lab(gguf, args.host_lost_after, args.hosts)
        with HostLab(workdir=tmp / "lab", **spec) as lab:
            started = time.monotonic() - t0
            print(f"lab: {args.hosts} hosts, NATS cluster {lab.nats_url}, started in {started:.1f} s; "
                  f"host_lost_after {args.host_lost_after:g} s, lease TTL {LEASE_TTL_S:g} s",
                  flush=True)  # fmt: skip
            base_rate = asyncio.run(scenario(lab, args.host_lost_after, rep))
            if rep.failed:
                print(lab.logs_tail(1500))
        rep.print(base_rate)
        print(f"\none run, {time.monotonic() - t0:.0f} s in all")
        if rep.failed:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
