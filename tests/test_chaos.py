"""Chaos on the real stack (issue 10, "Show it"): under steady load on two models, kill -9
the leading placer (a standby takes over; the old leader's late command is refused), the
agent (it adopts its llama-servers, no duplicate), the downloader mid-file (it resumes), and
pause NATS. Afterwards: no request hung, every failure was a clear refusal, one instance per
model and no orphan llama-server, and the instances rebuilt from the event log equal KV.

Real parts throughout: nats-server, `python -m lls.run` (which restarts a killed service),
a second placer process as the standby, llama-server with tiny GGUFs, and a throttled HTTP
server (services/downloader/devserver.py) for the third model's file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import yaml
from test_history import all_events

import proto
from conftest import ROOT, NatsServer
from lab.observe import live, records, until
from lls import auth
from lls.bus import Bus, new_id
from lls.history import diff, rebuild
from proto import InstanceRecord, InstanceState, LeaseRecord, StopInstance
from services.downloader.devserver import Behaviour, FileServer
from services.downloader.fetch import state_path
from services.downloader.store import Staging
from services.placer.lease import KEY
from stack import Stack, llama_server_pids

T = TypeVar("T")
LOADED = ("a", "b")  # the two models under steady load
SLOW = "c"  # the third model: its file comes from the throttled server
DEADLINE_S = 60.0  # each request's own deadline: past it, the request hung
ADOPTED = "adopted after an agent restart"  # services/agent/lifecycle.py
REFUSALS = (429, 502, 503, 504)  # the statuses a request may be refused with under faults


@dataclass
class Outcome:
    phase: str
    model: str
    status: int | None  # None: no HTTP answer at all (timeout, connection error)
    seconds: float
    deadline: float
    error: str  # the error body's message, or the exception
    retry_after: str | None


def children(parent: int, module: str) -> list[int]:
    """Pids of `parent`'s child processes running `python -m <module>`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and module.encode() in argv:
            pids.append(int(proc.name))
    return pids


def only_child(stack: Stack, module: str) -> int:
    assert stack.proc is not None
    pids = children(stack.proc.pid, module)
    assert len(pids) == 1, (module, pids)
    return pids[0]


def llama_ports(marker: str) -> dict[int, int]:
    """port -> pid of each llama-server whose command line mentions `marker`."""
    ports = {}
    for pid in llama_server_pids(marker):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        ports[int(argv[argv.index("--port") + 1])] = pid
    return ports


async def lease(bus: Bus) -> LeaseRecord:
    return proto.decode((await bus.leases.get(KEY)).value, LeaseRecord)


class Load:
    """Clients that each send short requests, one after another, for the whole run."""

    def __init__(self, base: str):
        self.base = base
        self.phase = "warm"
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()

    async def ask(self, client: httpx.AsyncClient, model: str, deadline: float) -> Outcome:
        phase, t0 = self.phase, time.monotonic()
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        try:
            r = await client.post(f"{self.base}/v1/completions", json=body, timeout=deadline)
        except httpx.HTTPError as e:
            out = Outcome(phase, model, None, time.monotonic() - t0, deadline, repr(e), None)
        else:
            msg = ""
            if r.status_code != 200:
                try:
                    msg = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = f"not an OpenAI error body: {r.text[:200]!r}"
            retry = r.headers.get("retry-after")
            out = Outcome(phase, model, r.status_code, time.monotonic() - t0, deadline, msg, retry)
        self.outcomes.append(out)
        return out

    async def client(self, model: str) -> None:
        async with httpx.AsyncClient() as c:
            while not self.stop.is_set():
                await self.ask(c, model, DEADLINE_S)
                await asyncio.sleep(0.2)  # steady, not a flood: two cores run everything


@pytest.fixture
def slow_files(tiny_gguf: Callable[[int], Path]) -> Iterator[FileServer]:
    with FileServer({"/c.gguf": tiny_gguf(33).read_bytes()}, Behaviour()) as srv:
        yield srv


@pytest.fixture
def stack(
    tmp_path: Path,
    nats_url: str,
    llama_server_bin: Path,
    tiny_gguf: Callable[[int], Path],
    slow_files: FileServer,
) -> Iterator[Stack]:
    models = {
        "a": {"url": f"file://{tiny_gguf(31)}", "ctx_size": 512},
        "b": {"url": f"file://{tiny_gguf(32)}", "ctx_size": 512},
        SLOW: {"url": slow_files.url("c.gguf"), "ctx_size": 512},
    }
    # A killed agent is back within seconds; host_lost_after is not what this test is about.
    s = Stack(tmp_path, nats_url, models, placer__host_lost_after=30)
    s.start(timeout=90)
    yield s
    s.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running after stop"


def spawn_placer(stack: Stack, log: Path) -> subprocess.Popen:
    """A second placer on the stack's config, started as lls.run starts its own."""
    folder = Path(os.environ[auth.ENV_CREDS]).parent
    creds = auth.identity_file(folder, auth.service_user("placer", "h1"))
    url = yaml.safe_load(stack.config.read_text())["nats"]["url"]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.placer", "--config", str(stack.config)]
            + ["--nats", url, "--nats-creds", str(creds)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.fixture
async def standby(stack: Stack, tmp_path: Path) -> AsyncIterator[subprocess.Popen]:
    """The standby that takes over when the leader dies: connected and watching the lease."""
    log = tmp_path / "placer-standby.log"
    proc = spawn_placer(stack, log)
    try:
        await until(lambda: _true("started (host" in log.read_text()), 60, "the standby connects")
        await asyncio.sleep(1.0)  # it has read the lease record once at least
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_chaos_under_steady_load(
    stack: Stack,
    bus: Bus,
    nats_server: NatsServer,
    slow_files: FileServer,
    standby: subprocess.Popen,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    marker = str(tmp_path)
    report: list[str] = []
    t_start = time.monotonic()
    refused: list[proto.CommandRefused] = []

    async def on_refused(msg) -> None:  # type: ignore[no-untyped-def]
        refused.append(proto.decode(msg.data, proto.CommandRefused))

    sub = await bus.nc.subscribe(proto.evt("command.refused"), cb=on_refused)
    load = Load(stack.base)
    clients: list[asyncio.Task[None]] = []
    try:
        # Warm both models (cold starts), then the steady load: two clients per model.
        async with httpx.AsyncClient() as c:
            for model in LOADED:
                out = await load.ask(c, model, DEADLINE_S)
                assert out.status == 200, out
        clients = [asyncio.create_task(load.client(m)) for m in LOADED for _ in range(2)]
        await asyncio.sleep(1.0)  # the load runs before the first fault

        # ---- 1. kill -9 the leading placer: the standby takes over, a new epoch
        load.phase = "placer"
        before = await lease(bus)
        leader = only_child(stack, "services.placer")
        assert standby.poll() is None
        assert "holds the lease" not in (tmp_path / "placer-standby.log").read_text()
        os.kill(leader, signal.SIGKILL)
        t_kill = time.monotonic()

        async def taken_over() -> LeaseRecord | None:
            rec = await lease(bus)
            return rec if rec.holder and rec.holder != before.holder else None

        after = await until(taken_over, 30, "a standby takes the lease")
        take_over_s = time.monotonic() - t_kill
        assert after.epoch > before.epoch
        assert (
            f"holds the lease (epoch {after.epoch})"
            in (tmp_path / "placer-standby.log").read_text()
        ), "the standby process, not the restarted placer, took over"
        report.append(
            f"placer: take-over {take_over_s:.1f} s after kill -9 "
            f"(epoch {before.epoch} -> {after.epoch})"
        )
        # The old leader's late command (as one in flight when it died would arrive): a
        # stop of a serving instance, stamped with its epoch. The agent refuses it.
        (target,) = await live(bus, "a")
        late = StopInstance(
            cmd_id=new_id(), instance_id=target.instance_id, reason="late", epoch=before.epoch
        )
        await bus.command(proto.cmd_agent("h1"), late)

        async def refusal() -> proto.CommandRefused | None:
            return next((r for r in refused if r.cmd_id == late.cmd_id), None)

        got = await until(refusal, 20, "the agent refuses the deposed leader's stop")
        assert got.reason == f"stale leader epoch {before.epoch} < {after.epoch}", got
        await asyncio.sleep(1.0)
        (still,) = await live(bus, "a")
        assert (still.instance_id, still.state) == (target.instance_id, InstanceState.READY)

        # ---- 2. kill -9 the agent: the next one adopts its llama-servers, no duplicate
        load.phase = "agent"
        servers = llama_ports(marker)
        assert len(servers) == 2, servers
        agent = only_child(stack, "services.agent")
        os.kill(agent, signal.SIGKILL)
        t_kill = time.monotonic()

        async def adopted() -> bool:
            recs = [r for m in LOADED for r in await live(bus, m)]
            return len(recs) == 2 and all(
                r.state == InstanceState.READY and r.reason == ADOPTED for r in recs
            )

        await until(adopted, 60, "the restarted agent adopts both instances")
        assert only_child(stack, "services.agent") != agent
        assert llama_ports(marker) == servers, "adoption changed the llama-server processes"
        report.append(f"agent: both instances adopted {time.monotonic() - t_kill:.1f} s after")

        # ---- 3. kill -9 the downloader mid-file: the restarted one resumes
        load.phase = "downloader"
        cold = asyncio.create_task(_cold(load, SLOW))
        saved_at_kill, size = await kill_downloader_mid_file(stack, slow_files)
        t_kill = time.monotonic()
        # The command was never acked: JetStream redelivers it after the consumer's
        # ack_wait (30 s) to the restarted downloader, which resumes the part.

        async def slow_ready() -> bool:
            return any(r.state == InstanceState.READY for r in await live(bus, SLOW))

        await until(slow_ready, 90, f"{SLOW} ready after the downloader's restart")
        resumed_s = time.monotonic() - t_kill
        # It resumed from what was saved, not from the start.
        resumed = re.findall(r"\.part: resuming at (\d+) of (\d+) bytes", stack.logs())
        assert resumed, "the restarted downloader did not resume the part"
        at, of = map(int, resumed[-1])
        assert saved_at_kill <= at < of == size, (resumed, saved_at_kill)
        first = await cold
        report.append(
            f"downloader: killed at {saved_at_kill}/{size} bytes saved; {SLOW} ready "
            f"{resumed_s:.1f} s later, resumed at byte {at}; the cold "
            f"request got {first.status} after {first.seconds:.1f} s"
        )

        # ---- 4. pause NATS (SIGSTOP) for a few seconds
        load.phase = "nats"
        assert nats_server.proc is not None
        nats_server.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(4.0)
        finally:
            nats_server.proc.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()
        held = await until(lambda: lease(bus), 30, "the bus answers again")
        report.append(
            f"nats: paused 4 s; the bus answered {time.monotonic() - t_cont:.1f} s after "
            f"SIGCONT; lease then {held.holder} epoch {held.epoch} (before {after.epoch})"
        )

        # ---- afterwards: a few seconds of calm under load, then the load stops
        load.phase = "after"
        await asyncio.sleep(3.0)
        async with httpx.AsyncClient() as c:
            for model in (*LOADED, SLOW):
                out = await load.ask(c, model, DEADLINE_S)
                assert out.status == 200, out
    finally:
        load.stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        await sub.unsubscribe()

    # No request hung, every failure was a clear refusal.
    hung = [o for o in load.outcomes if o.status is None or o.seconds >= o.deadline]
    assert not hung, hung
    unclear = [
        o
        for o in load.outcomes
        if o.status != 200
        and (
            o.status not in REFUSALS
            or not o.error
            or o.error.startswith("not an OpenAI")
            or (o.status in (429, 503) and not o.retry_after)
        )
    ]
    assert not unclear, unclear

    # One live instance per model, and the llama-servers on the machine are exactly
    # those KV records (no orphan, no duplicate).
    async def settled() -> list[InstanceRecord] | None:
        recs = [r for r in await records(bus) if r.state in proto.LIVE_STATES]
        stable = all(r.state == InstanceState.READY for r in recs)
        return recs if stable and sorted(r.model for r in recs) == ["a", "b", "c"] else None

    serving = await until(settled, 30, "one ready instance per model")
    ports = {int((r.endpoint or "").rsplit(":", 1)[1]) for r in serving}
    assert set(llama_ports(marker)) == ports, (llama_ports(marker), serving)

    # The instances rebuilt from the event log equal KV (events follow their writes).
    async def agree() -> bool:
        kv = {r.instance_id: r for r in await records(bus)}
        return diff(rebuild(await all_events(bus)), kv) == []

    try:
        await until(agree, 15, "the rebuilt table equals KV")
    except AssertionError:
        kv = {r.instance_id: r for r in await records(bus)}
        raise AssertionError(diff(rebuild(await all_events(bus)), kv)) from None

    phases = ["warm", "placer", "agent", "downloader", "nats", "after"]
    lines = [f"chaos run: {time.monotonic() - t_start:.0f} s, {len(load.outcomes)} requests"]
    for phase in phases:
        outs = [o for o in load.outcomes if o.phase == phase]
        ok = sum(o.status == 200 for o in outs)
        slowest = max((o.seconds for o in outs), default=0.0)
        codes = sorted({o.status for o in outs if o.status != 200}, key=str)
        lines.append(
            f"  {phase:10} served {ok:4}  refused {len(outs) - ok:3} {codes or ''}"
            f"  slowest {slowest:.2f} s"
        )
    lines += [f"  {line}" for line in report]
    for why in sorted({(o.status, o.error) for o in load.outcomes if o.status != 200}, key=str):
        lines.append(f"  refusal {why[0]}: {why[1]}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


async def kill_downloader_mid_file(stack: Stack, slow_files: FileServer) -> tuple[int, int]:
    """Throttle the slow model's file, wait until part of it is saved, kill -9 the
    downloader, then unthrottle (the resume need not be slow). (bytes saved, file size)"""
    slow_files.behaviour.rate_bps = 40_000  # the ~460 KiB file: ~12 s
    size = len(slow_files.files["/c.gguf"])  # type: ignore[arg-type]
    part = Staging.of(stack.tmp / "store", stack.stored(SLOW)).part

    async def saved() -> int:
        return sum(json.loads(state_path(part).read_text())["done"])

    saved_at_kill = await until(saved, 60, "part of the slow file is saved")
    os.kill(only_child(stack, "services.downloader"), signal.SIGKILL)
    await asyncio.sleep(0.2)  # the server notices the dead connection first
    slow_files.behaviour.rate_bps = None
    return saved_at_kill, size


async def _cold(load: Load, model: str) -> Outcome:
    async with httpx.AsyncClient() as c:
        return await load.ask(c, model, 90.0)


async def _true(value: bool) -> bool:
    return value


async def test_a_download_in_flight_across_a_leader_change_still_finishes(
    stack: Stack, bus: Bus, slow_files: FileServer, standby: subprocess.Popen
) -> None:
    """The downloader dies mid-file, and before JetStream redelivers its command (ack_wait)
    the leading placer dies too: the model must still become ready."""
    load = Load(stack.base)
    cold = asyncio.create_task(_cold(load, SLOW))
    await kill_downloader_mid_file(stack, slow_files)
    before = await lease(bus)
    os.kill(only_child(stack, "services.placer"), signal.SIGKILL)

    async def taken_over() -> LeaseRecord | None:
        rec = await lease(bus)
        return rec if rec.holder and rec.holder != before.holder else None

    await until(taken_over, 30, "the standby takes the lease")

    async def slow_ready() -> bool:
        return any(r.state == InstanceState.READY for r in await live(bus, SLOW))

    try:
        await until(slow_ready, 50, f"{SLOW} ready after the downloader's restart")
    finally:
        await cold
