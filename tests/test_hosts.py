"""Faults across real network hosts (issue 13): network namespaces on a bridge, a three-node
NATS cluster with streams and buckets on 3 replicas, an agent and a downloader per host,
placers and gateways on h1 and h2 (lab/hosts.py). The faults themselves, with their
measurements, are lab/faults.py's (bench/bench_hosts.py drives the same ones); these
tests assert on what they measure. Each fault runs under a bounded steady
load of small completions through a gateway that stays up; every request has a deadline and
ends served, refused clearly (an OpenAI error body) or hung (the deadline passed: a failure).

One lab serves the whole module; each test leaves it whole (links up, every service and
NATS node running). Run with `-s` to see the figures each fault prints.

The hosts: h1 and h2 have a 2048 MiB (simulated) GPU, h3 a 1024 MiB one. Model "m" (500 MiB)
and model "wide" (1500 MiB) have their files on h3 only, so "m" goes to h3 (it fits: the
file is there) and "wide" to h1 or h2 (it does not fit on h3: downloaded there).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from conftest import require
from lab.faults import STALLED, fault_lab, healed, host_lost, leader_cut, nats_kill, short_drop
from lab.load import REFUSALS
from lab.observe import ask, ready_one, until
from lls.config import ModelConfig, store_filename_of
from proto import InstanceState

HOST_LOST_AFTER = 4.0


def report(capsys: pytest.CaptureFixture[str], fault: str, lines: list[str]) -> None:
    with capsys.disabled():
        print(f"\n[hosts] {fault}: " + "; ".join(lines))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, tiny_gguf) -> Iterator:  # noqa: ANN001
    from lab.hosts import HostLab
    from lab.network import unavailable

    why = unavailable()
    require("network namespaces and nats-server", why is None, why or "")
    spec = fault_lab(tiny_gguf, HOST_LOST_AFTER)
    with HostLab(workdir=tmp_path_factory.mktemp("hostlab"), **spec) as lab:
        yield lab
        # Every test leaves the lab whole: links up, every process running.
        lab.check_alive()


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed test on a lab prints the end of every service's log (CI keeps nothing else)."""
    failed = request.session.testsfailed
    yield
    if "lab" in request.fixturenames and request.session.testsfailed > failed:
        print(request.getfixturevalue("lab").logs_tail(2500))


# ------------------------------------------------------------------ the harness's own choices


def test_a_lab_picks_a_subnet_no_address_here_uses_starting_from_its_pid() -> None:
    from lab.network import pick_subnet

    assert pick_subnet(set(), 4242) == 20 + 4242 % 200
    assert pick_subnet({62, 63}, 4242) == 64  # 4242 % 200 = 42: from 62 on
    assert pick_subnet(set(range(62, 250)), 4242) == 20  # wraps around
    assert pick_subnet(set(range(0, 256)), 4242) is None


def test_only_a_labs_own_names_are_taken_for_leftovers() -> None:
    from lab.network import stale_owner

    for name in ("ll5ce8gbr", "ll5ce8gv1", "ll5ce8gp12", "ll5ce8g-h3", "ll5ce8g-p_ehxp15"):
        assert stale_owner(name) == 0x5CE8, name
    for name in ("llama0", "lltestbr", "docker0", "ll5ce8g", "ll5ce8gbr0", "eth0"):
        assert stale_owner(name) is None, name


def stored(lab, host: str, model: str) -> bool:  # noqa: ANN001
    m = msgspec.convert(lab.models[model], ModelConfig)
    return (lab.host(host).store / store_filename_of(model, m)).exists()


# ------------------------------------------------------------------ 5. a file on one host


async def test_the_host_holding_a_models_file_is_preferred_and_else_it_is_downloaded(lab, capsys):  # noqa: ANN001
    bus = await lab.bus()
    try:
        r = await ask(lab.gateway_url("h1"), "m")
        assert r.status_code == 200, r.text
        m = await until(lambda: ready_one(bus, "m"), 30, "m ready")
        assert m.host == "h3", m.placement  # the only host with m's file, and m fits there
        assert m.endpoint.startswith(f"http://{lab.host('h3').addr}:"), m.endpoint

        r = await ask(lab.gateway_url("h2"), "wide")
        assert r.status_code == 200, r.text
        wide = await until(lambda: ready_one(bus, "wide"), 30, "wide ready")
        # 1500 MiB does not fit h3's 1024 MiB GPU: placed on h1 or h2 and its file fetched there.
        assert wide.host in ("h1", "h2"), wide.placement
        assert stored(lab, wide.host, "wide")
        other = "h2" if wide.host == "h1" else "h1"
        assert not stored(lab, other, "wide") and not stored(lab, other, "m")
        assert not stored(lab, "h1", "m") and not stored(lab, "h2", "m")
        # Two hosts, the same port range: the two instances may share a port number.
        report(capsys, "file on one host", [f"m on {m.host} ({m.endpoint})",
                                            f"wide on {wide.host} ({wide.endpoint})"])  # fmt: skip
    finally:
        await bus.close()


# ------------------------------------------------------------------ 2. a short drop


async def test_a_drop_shorter_than_host_lost_after_reschedules_nothing(lab, capsys):  # noqa: ANN001
    bus = await lab.bus(avoid=("h3",))
    try:
        got = await short_drop(lab, bus, "m", "h2", HOST_LOST_AFTER / 4)
        assert got.after.instance_id == got.before.instance_id, (got.before, got.after)
        assert not got.host_lost, got.host_lost
        got.load.check()
        report(capsys, "short drop", [f"{got.seconds:.1f} s cut of {got.cut}",
                                      got.load.summary(), "rescheduled 0"])  # fmt: skip
    finally:
        await bus.close()


# ------------------------------------------------------------------ 1. a host lost


async def test_a_lost_host_s_model_is_placed_elsewhere_and_its_stale_copy_stopped_on_heal(
    lab, capsys
):  # noqa: ANN001
    bus = await lab.bus(avoid=("h3",))
    try:
        got = await host_lost(lab, bus, "m", "h2")
        cut = got.cut
        assert cut == "h3", got.before  # no gateway nor placer there: they are other faults
        if got.moved is None:
            report(capsys, "host lost", [f"m not ready elsewhere in 35 s; clients of "
                                         f"{cut}'s node: {got.stalls}", got.load.summary()])  # fmt: skip
            pytest.fail(f"m not ready elsewhere within 35 s of cutting {cut} ({STALLED})")
        assert got.old is not None and got.old.state == InstanceState.LOST, got.old
        # The stale copy on the healed host was stopped (or adopted): one per model.
        assert [r.instance_id for r in got.final] == [got.moved.instance_id], got.final
        assert not got.duplicates, got.duplicates  # no model twice
        assert got.moved.host != cut and stored(lab, got.moved.host, "m")  # downloaded there
        got.load.check()
        report(capsys, "host lost", [
            f"{cut} cut; m ready on {got.moved.host} {got.t_moved:.1f} s after the cut "
            f"(host_lost_after {HOST_LOST_AFTER:g} s)",
            f"{got.load.summary()} ({got.served_by_move} served by the time it moved)",
            f"stale copy stopped {got.t_stale:.1f} s after heal", "duplicates after heal 0",
            f"clients of {cut}'s node from other hosts: {len(got.stalls)}",
        ])  # fmt: skip
    finally:
        try:
            await healed(lab, bus)
        finally:
            await bus.close()


# ------------------------------------------------------------------ 4. the leader cut off


async def test_when_the_leading_placer_s_host_is_cut_off_another_takes_over_and_the_old_is_fenced(
    lab, capsys
):  # noqa: ANN001
    # h3's node only: it stays with the majority whichever coordinator is cut.
    bus = await lab.bus(avoid=lab.coordinators)
    try:
        got = await leader_cut(lab, bus, "m")
        cut, other = got.cut, got.other
        if got.after is None:
            report(capsys, "leader cut off", [f"no take-over in 35 s; clients of {cut}'s "
                                              f"node: {got.stalls}", got.load.summary()])  # fmt: skip
            pytest.fail(f"no placer took over within 35 s of cutting {cut} ({STALLED})")
        assert got.after.holder.startswith(f"placer-{other}-"), got.after
        assert got.refusal is not None and got.target is not None
        assert got.refusal.reason.startswith(f"stale leader epoch {got.before.epoch} <"), (
            got.refusal
        )
        assert got.still is not None and got.still.instance_id == got.target.instance_id, got.still
        assert got.final is not None
        assert (got.final.holder, got.final.epoch) == (got.after.holder, got.after.epoch), got.final
        assert "lost the lease" in got.old_log or "stops acting" in got.old_log, got.old_log[-2000:]
        assert not got.duplicates, got.duplicates
        got.load.check()
        report(capsys, "leader cut off", [
            f"{cut}'s placer (epoch {got.before.epoch}) cut; {other}'s took over (epoch "
            f"{got.after.epoch}) {got.t_over:.1f} s after the cut (lease TTL 3 s)",
            got.load.summary(), f"old epoch's stop refused: {got.refusal.reason!r}",
            f"clients of {cut}'s node from other hosts: {len(got.stalls)}",
        ])  # fmt: skip
    finally:
        try:
            await healed(lab, bus)
        finally:
            await bus.close()


# ------------------------------------------------------------------ 3. a NATS node killed

LOST_WRITE = (
    "KV's instance records and the event log disagree after the faults: a write whose "
    "InstanceChanged event is missing (KV revision above the event's), or an event for a "
    "write KV no longer has (below); see the report"
)


async def test_a_killed_nats_node_loses_nothing_and_everyone_reconnects(lab, capsys):  # noqa: ANN001
    killed = "h1"
    bus = await lab.bus(avoid=(killed,))
    try:
        got = await nats_kill(lab, bus, killed, "m", "n")
        assert not got.cold_before, got.cold_before  # n was cold when the node went down
        # Work that needed commands and records while the node was down: the cold model n,
        # refused only clearly (with Retry-After) until served.
        *refusals, (status, _, body) = got.cold
        assert status == 200, got.cold
        for code, retry_after, text in refusals:
            assert code in REFUSALS and retry_after, text
        # Nothing lost: every event the stream holds reached a consumer, in order, no gap;
        # no command is left unconsumed (nats_kill waited for that); 3 replicas, current.
        assert got.tap.seqs and not got.tap.gaps, got.tap.describe_gaps()
        assert got.tap.feed is not None and not got.tap.feed.holes, got.tap.describe_gaps()
        assert got.tap.seqs[-1] >= got.last
        assert all(n == 3 for n in got.replicas.values()), got.replicas
        assert len(got.cold_live) == 1, got.cold_live  # placed once, whatever the outage did
        got.load.check()
        seq0 = got.tap.seq0
        report(capsys, "NATS node killed", [
            f"{killed}'s node down {got.t_down:.1f} s; cold model n served in "
            f"{got.t_cold:.1f} s meanwhile ({len(refusals)} refusals first)",
            f"{killed} serving again {got.t_again:.1f} s after restart",
            got.load.summary(), f"events {len(got.tap.seqs)} delivered of {got.last - seq0}, lost 0 "
            f"({got.tap.heals} resubscriptions)",
        ])  # fmt: skip
        if got.problems:  # the last check, so that every other one above still ran
            report(capsys, "NATS node killed", ["instance records: KV and the event log differ",
                                                *got.problems])  # fmt: skip
            pytest.fail(f"{LOST_WRITE}: {got.problems}")
    finally:
        try:
            lab.start_nats(killed)
            await healed(lab, bus)
        finally:
            await bus.close()


# ------------------------------------------------------------------ TLS between hosts


async def test_a_cluster_over_tls_serves_and_refuses_plain_connections(
    tmp_path: Path, llama_server_bin: Path, tiny_gguf
) -> None:  # noqa: ANN001
    """The secure recipe: identities, TLS from clients to nodes and between nodes, several
    seed URLs (README "Several hosts")."""
    from lab.hosts import HostLab
    from lab.network import unavailable
    from lls.bus import connect

    why = unavailable()
    require("network namespaces and nats-server", why is None, why or "")
    models = {"m": {"url": f"file://{tiny_gguf(44)}", "ctx_size": 256, "memory_mib": 500}}
    with HostLab(models, 3, workdir=tmp_path / "lab", tls=True) as tls_lab:
        assert tls_lab.nats_url.startswith("tls://")
        r = await ask(tls_lab.gateway_url("h1"), "m")
        assert r.status_code == 200, r.text
        plain = tls_lab.nats_url.replace("tls://", "nats://")
        with pytest.raises((PermissionError, TimeoutError, OSError)):
            bus = await connect(plain, "test", creds=tls_lab.cli_creds, deadline_s=5)
            await bus.close()
