"""Stored intent (KV desired): `lls load`/`lls stop` and preload outlive a placer that is
down or frozen when they are asked, and report what actually happened.

The decision (services/placer/desired.py) is tested with plain values; the rest on the real
stack (real NATS, real placer, agent and llama-server with the tiny GGUF).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import proto
from conftest import ROOT
from lls.bus import connect, kv_snapshot
from proto import DesiredModel, InstanceRecord, InstanceState
from services.placer.desired import DemandIt, Done, StopThese, next_step, pinned, preload_due
from stack import Cluster, Stack, llama_server_pids

S = InstanceState


# ------------------------------------------------------------------ the pure step


def want(wanted: str, since: float = 100.0, model: str = "m", **kw: object) -> DesiredModel:
    return DesiredModel(model=model, wanted=wanted, since=since, by="cli", **kw)  # type: ignore[arg-type]


def inst(iid: str, state: InstanceState, updated: float = 150.0, model: str = "m", reason=""):  # noqa: ANN001, ANN201
    return InstanceRecord(
        instance_id=iid,
        model=model,
        state=state,
        created=50.0,
        updated=updated,
        host="h1",
        reason=reason,
    )


def step(w: DesiredModel, insts: list[InstanceRecord], refused=None, now=200.0, configured=True):  # noqa: ANN001, ANN201
    return next_step(w, insts, configured=configured, refused=refused, now=now)


def test_run_is_demand_until_an_instance_is_ready():
    assert step(want("run"), []) == DemandIt()
    assert step(want("run"), [inst("a", S.STARTING)]) == DemandIt()
    assert step(want("run"), [inst("x", S.READY, model="other")]) == DemandIt()
    done = step(want("run"), [inst("a", S.STARTING), inst("b", S.READY)])
    assert done == Done("ready: b on h1")


def test_run_fails_on_a_failure_or_refusal_after_it_was_asked_only():
    failed = inst("a", S.FAILED, updated=150.0, reason="exit 1")
    assert step(want("run", since=100.0), [failed]) == Done("failed: a exit 1")
    assert step(want("run", since=160.0), [failed]) == DemandIt()  # an older failure
    assert step(want("run"), [], refused=(120.0, "no room")) == Done("failed: no room")
    assert step(want("run"), [], refused=(90.0, "no room")) == DemandIt()


def test_stop_stops_live_instances_then_waits_then_is_done():
    live = [inst("b", S.READY), inst("a", S.STARTING), inst("c", S.STOPPED, updated=10.0)]
    assert step(want("stop"), live) == StopThese(("a", "b"))
    assert step(want("stop"), [inst("a", S.STOPPING)]) is None
    assert step(want("stop"), [inst("a", S.STOPPED), inst("b", S.STOPPED)]) == Done(
        "stopped 2 instances"
    )
    assert step(want("stop"), [inst("c", S.STOPPED, updated=10.0)]) == Done("stopped: none ran")


def test_any_request_expires_and_needs_a_configured_model():
    assert step(want("run", until=150.0), []) == Done("expired: not done within 50 s")
    assert step(want("stop"), [], configured=False) == Done("failed: model 'm' is not configured")
    assert step(want(""), [inst("a", S.READY)]) is None  # nothing pending


def test_a_pin_outlives_its_request_and_starts_the_model_again_when_it_ended():
    pin = want("", pinned=True)
    assert step(pin, []) == DemandIt()
    assert step(pin, [inst("a", S.FAILED), inst("b", S.STOPPED)]) == DemandIt()
    assert step(pin, [inst("a", S.READY)]) is None
    assert step(want(""), []) is None  # neither pinned nor asked: nothing to do
    assert step(pin, [], configured=False) is None
    assert pinned({"k1": pin, "k2": want("run", model="x")}) == frozenset({"m"})


def test_preload_is_written_once_per_placer_start():
    assert preload_due(None, placer_started=100.0)
    assert preload_due(want("", since=50.0, outcome="ready: a on h1"), placer_started=100.0)
    assert not preload_due(want("", since=120.0), placer_started=100.0)  # done since we began
    assert not preload_due(want("run", since=50.0), placer_started=100.0)  # still pending
    assert not preload_due(want("stop", since=50.0), placer_started=100.0)


# ------------------------------------------------------------------ on the real stack


def lls(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lls.cli", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lls_bg(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lls.cli", "--config", str(config), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def service_pid(config: Path, name: str) -> int:
    """The pid of the `services.<name>` process whose command line names `config`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"services.{name}".encode() in argv and str(config).encode() in argv:
            return int(proc.name)
    raise AssertionError(f"no {name} process for {config}")


async def records(nats_url: str, model: str) -> tuple[list[InstanceRecord], DesiredModel | None]:
    bus = await connect(nats_url, "test")
    try:
        insts = await kv_snapshot(bus, bus.instances, InstanceRecord)
        desired = await kv_snapshot(bus, bus.desired, DesiredModel)
    finally:
        await bus.close()
    return [r for r in insts.values() if r.model == model], desired.get(proto.kv_key(model))


def states(nats_url: str, model: str) -> list[InstanceState]:
    return sorted(r.state for r in asyncio.run(records(nats_url, model))[0])


def wait_until(check, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    s = Stack(tmp_path, nats_url, {"tiny": {"url": f"file://{tiny_gguf(6)}", "ctx_size": 512}})
    s.start()
    yield s
    with_placer_running(s)
    s.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running"


def with_placer_running(s: Stack) -> None:
    """SIGCONT the placer (a failed test must not leave it frozen; harmless otherwise)."""
    try:
        os.kill(service_pid(s.config, "placer"), signal.SIGCONT)
    except (AssertionError, ProcessLookupError):
        pass


def test_load_and_stop_report_what_happened(stack, nats_url):
    r = lls(stack.config, "load", "tiny")
    assert r.returncode == 0, r.stderr
    assert "tiny: ready: tiny-" in r.stdout, r.stdout  # the outcome names the instance
    [iid] = [r.instance_id for r in asyncio.run(records(nats_url, "tiny"))[0]]

    again = lls(stack.config, "load", "tiny")  # already running: done at once
    assert again.returncode == 0 and f"ready: {iid} on h1" in again.stdout, again.stdout

    r = lls(stack.config, "stop", "tiny")
    assert r.returncode == 0, r.stderr
    assert f"tiny: {iid} on h1 stopped" in r.stdout, r.stdout  # each instance it stopped
    assert "tiny: stopped 1 instance" in r.stdout
    assert states(nats_url, "tiny") == [S.STOPPED]  # done means done: nothing left live

    r = lls(stack.config, "stop", "tiny")
    assert r.returncode == 0 and "stopped: none ran" in r.stdout, r.stdout
    _, desired = asyncio.run(records(nats_url, "tiny"))
    assert desired is not None and desired.wanted == "" and desired.by == "cli"  # not pinned


def test_a_pinned_model_outlives_its_idle_timeout_and_a_crash_until_unpinned(
    tmp_path, nats_url, llama_server_bin, tiny_gguf
):
    s = Stack(
        tmp_path,
        nats_url,
        {"tiny": {"url": f"file://{tiny_gguf(6)}", "ctx_size": 512, "idle_timeout": 2}},
        placer={"failure_backoff": 1},
    )
    s.start()
    try:
        r = lls(s.config, "load", "--pin", "tiny")
        assert r.returncode == 0, r.stderr
        time.sleep(6)  # three idle timeouts
        assert states(nats_url, "tiny") == [S.READY], "a pinned model was idle-stopped"
        assert "pinned: tiny (by cli" in lls(s.config, "ps").stdout

        # Its llama-server dies: the pin starts it again, without anyone asking.
        [first] = llama_server_pids(str(tmp_path))
        os.kill(first, signal.SIGKILL)
        wait_until(
            lambda: S.READY in states(nats_url, "tiny") and S.FAILED in states(nats_url, "tiny"),
            60,
            "the pinned model started again after its crash",
        )

        r = lls(s.config, "unpin", "tiny")
        assert r.returncode == 0 and "unpinned" in r.stdout, r.stdout
        wait_until(
            lambda: S.READY not in states(nats_url, "tiny"), 30, "the idle stop after unpinning"
        )
        _, desired = asyncio.run(records(nats_url, "tiny"))
        assert desired is not None and not desired.pinned
    finally:
        s.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running"


def test_stop_asked_while_the_placer_is_frozen(stack, nats_url):
    assert lls(stack.config, "load", "tiny").returncode == 0
    placer = service_pid(stack.config, "placer")

    # No placer acts: the stop fails clearly within its deadline, and is withdrawn.
    os.kill(placer, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = lls(stack.config, "stop", "tiny", "--timeout", "6")
        took = time.monotonic() - t0
    finally:
        os.kill(placer, signal.SIGCONT)
    assert r.returncode == 1, r.stdout
    assert "no placer acted on the request within 6 s: is a placer running?" in r.stderr
    assert took < 30, took
    _, desired = asyncio.run(records(nats_url, "tiny"))
    assert desired is not None and desired.outcome.startswith("withdrawn")
    time.sleep(4)  # the placer leads again: a withdrawn request must not act late
    assert states(nats_url, "tiny") == [S.READY]

    # The placer is frozen when asked and thaws within the deadline: the stored request is
    # carried out, and `lls stop` reports it.
    os.kill(placer, signal.SIGSTOP)
    try:
        bg = lls_bg(stack.config, "stop", "tiny", "--timeout", "90")
        time.sleep(5)
        assert bg.poll() is None, bg.communicate()
        assert states(nats_url, "tiny") == [S.READY]  # nothing acted yet
    finally:
        os.kill(placer, signal.SIGCONT)
    out, err = bg.communicate(timeout=100)
    assert bg.returncode == 0, (out, err)
    assert "no placer has taken the request yet; waiting" in out
    assert "stopped 1 instance" in out, out
    assert states(nats_url, "tiny") == [S.STOPPED]


@pytest.fixture
def cluster(tmp_path, nats_url, llama_server_bin):
    made: list[Cluster] = []

    def make(models: dict) -> Cluster:
        c = Cluster(tmp_path, nats_url, models)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running"


def test_load_and_preload_are_carried_out_by_a_placer_that_starts_later(
    cluster, nats_url, tiny_gguf
):
    c = cluster(
        {
            "warm": {"url": f"file://{tiny_gguf(21)}", "ctx_size": 256, "preload": True},
            "asked": {"url": f"file://{tiny_gguf(22)}", "ctx_size": 256},
            "huge": {"url": f"file://{tiny_gguf(23)}", "ctx_size": 256, "memory_mib": 10**8},
        }
    )
    c.agent("h1")
    c.spawn("gateway")
    c.wait_gateway()
    config = c.tmp / "gateway.yaml"  # the shared config: models and NATS
    bg = lls_bg(config, "load", "asked", "--timeout", "120")
    time.sleep(4)
    assert bg.poll() is None, bg.communicate()
    _, stored = asyncio.run(records(nats_url, "asked"))
    assert stored is not None and stored.wanted == "run" and not stored.seen_by
    ps = lls(config, "ps")
    assert "request: run asked (by cli" in ps.stdout and "no placer has taken" in ps.stdout

    # no placer at all: a stop fails clearly within its deadline
    t0 = time.monotonic()
    r = lls(config, "stop", "huge", "--timeout", "5")
    assert r.returncode == 1, r.stdout
    assert "no placer acted on the request within 5 s: is a placer running?" in r.stderr
    assert time.monotonic() - t0 < 30

    c.spawn("placer")
    out, err = bg.communicate(timeout=130)
    assert bg.returncode == 0, (out, err, c.logs("placer")[-3000:])
    assert "asked: ready: asked-" in out, out
    # preload: the placer wrote its request once and carried it out from the stored record
    wait_until(lambda: S.READY in states(nats_url, "warm"), 60, "the preload model ready")
    _, pre = asyncio.run(records(nats_url, "warm"))
    assert pre is not None and pre.by == "preload" and pre.outcome.startswith("ready")

    # a load that cannot succeed fails with the placer's reason, not a timeout
    r = lls(config, "load", "huge", "--timeout", "60")
    assert r.returncode == 1, r.stdout
    assert "error: huge: failed:" in r.stderr, r.stderr
    assert "huge" not in {rec.model for rec in asyncio.run(records(nats_url, "huge"))[0]}


def test_a_standby_that_takes_over_carries_out_a_stop_the_frozen_leader_did_not(
    cluster, nats_url, tiny_gguf
):
    c = cluster({"tiny": {"url": f"file://{tiny_gguf(24)}", "ctx_size": 256}})
    c.agent("h1")
    leader = c.spawn("placer", "placer-a")
    c.spawn("gateway")
    c.wait_gateway()
    config = c.tmp / "gateway.yaml"
    r = lls(config, "load", "tiny", "--timeout", "120")
    assert r.returncode == 0, (r.stdout, r.stderr)
    c.spawn("placer", "placer-b")  # a standby: placer-a leads
    time.sleep(3)  # let it start watching

    os.kill(leader.pid, signal.SIGSTOP)  # the leader hears nothing and does nothing
    try:
        r = lls(config, "stop", "tiny", "--timeout", "90")
        assert r.returncode == 0, (r.stdout, r.stderr, c.logs("placer-b")[-3000:])
        assert "stopped 1 instance" in r.stdout, r.stdout
        _, desired = asyncio.run(records(nats_url, "tiny"))
        assert desired is not None and desired.seen_by
        assert f"placer {desired.seen_by} holds the lease" in c.logs("placer-b")  # the standby
        assert states(nats_url, "tiny") == [S.STOPPED]
    finally:
        os.kill(leader.pid, signal.SIGCONT)
