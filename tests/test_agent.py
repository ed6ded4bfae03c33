"""The agent on real parts: NATS JetStream, llama-server with a tiny GGUF, the process runtime.

Agents run in-process (crash = cancel the task without a stop request) or, where kill -9
matters, as a subprocess. Every process they start is killed at teardown, even on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

import proto
from lls.bus import Bus, connect, kv_snapshot, new_id
from lls.config import Config, parse, store_filename
from lls.instance_key import new_key
from lls.service import ServiceContext
from proto import InstanceRecord, InstanceState, StartInstance, StopInstance
from services.agent.runtime_choice import StartupError
from services.agent.runtime_process import alive
from services.agent.service import create_agent, run

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
ADOPTED = "adopted after an agent restart"
SIM_GPUS = [{"name": "Sim 8G", "memory_mib": 8192}, {"name": "Sim 4G", "memory_mib": 4096}]
# The agent runs only models of its config, with the config's flags; their files are
# stored(name) in the store (put there by put_model, so the urls are never fetched).
MODEL_NAMES = ("tiny", "a", "b", "broken", "m", "absent")
MODELS = {n: {"url": f"file:///nowhere/{n}.gguf", "ctx_size": 512} for n in MODEL_NAMES}


def stored(model: str = "tiny") -> str:
    """A model of MODELS: its file name in the store, as the placer sends it."""
    return store_filename(model, MODELS[model]["url"])


# ---------------------------------------------------------------- harness


def unique_host() -> str:
    return f"ag{uuid.uuid4().hex[:8]}"


def new_iid(model: str = "tiny") -> str:
    """An instance id the way the placer makes them."""
    return f"{proto.kv_key(model)}-{new_id()[:8]}"


def agent_config(tmp_path: Path, host_id: str, **agent: Any) -> dict[str, Any]:
    base = {
        "host_id": host_id,
        "runtime": "process",
        "store": str(tmp_path / "store"),
        "gpus": SIM_GPUS,
        "heartbeat_s": 0.3,
        "start_timeout": 30,
    }
    return {
        "agent": base | agent,
        "models": MODELS,
    }


ISSUED: dict[str, str] = {}  # instance id -> the API key its start command carried


def key_for(iid: str) -> str:
    """The instance's API key, as the placer issued it (start_cmd plays the placer); a new
    random one, never an instance's, for an id no start named."""
    return ISSUED.get(iid) or new_key()


def put_model(tmp_path: Path, src: Path, name: str = "tiny") -> str:
    store = tmp_path / "store"
    store.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, store / stored(name))
    return stored(name)


async def eventually(
    fn: Callable[[], Awaitable[T | None]], within: float = 30, what: str = ""
) -> T:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await fn()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what or fn}")
        await asyncio.sleep(0.1)


async def get_record(bus: Bus, iid: str) -> InstanceRecord | None:
    """Instance `iid`'s record, whichever host's key it is under."""
    records = await kv_snapshot(bus, bus.instances, InstanceRecord)
    return next((r for r in records.values() if r.instance_id == iid), None)


async def wait_state(
    bus: Bus, iid: str, *states: InstanceState, within: float = 30, reason: str | None = None
) -> InstanceRecord:
    async def check() -> InstanceRecord | None:
        r = await get_record(bus, iid)
        ok = r is not None and r.state in states and (reason is None or r.reason == reason)
        return r if ok else None

    try:
        return await eventually(check, within, f"{iid} to be {[s.value for s in states]}")
    except AssertionError:
        raise AssertionError(f"{iid} is {await get_record(bus, iid)}, wanted {states}") from None


async def host_record(bus: Bus, host: str) -> proto.HostRecord | None:
    try:
        return proto.decode((await bus.hosts.get(host)).value, proto.HostRecord)
    except Exception:  # noqa: BLE001
        return None


async def heartbeat(
    bus: Bus, host: str, ok: Callable[[proto.HostRecord], bool], within: float, what: str
) -> proto.HostRecord:
    """The first host record for which `ok` holds (heartbeats come on a timer)."""

    async def check() -> proto.HostRecord | None:
        r = await host_record(bus, host)
        return r if r is not None and ok(r) else None

    return await eventually(check, within, what)


async def put_record(
    bus: Bus, iid: str, model: str, state: InstanceState, host: str | None, **kw: Any
) -> None:
    t = proto.now()
    rec = InstanceRecord(
        instance_id=iid, model=model, state=state, created=t, updated=t, host=host, **kw
    )
    await bus.instances.put(proto.instance_key(host or "", iid), proto.encode(rec))


def start_cmd(iid: str, filename: str, model: str = "tiny", **kw: Any) -> StartInstance:
    """A start as the placer sends it, with the API key it issues (key_for finds it)."""
    base: dict[str, Any] = dict(n_gpu_layers=0, api_key=ISSUED.setdefault(iid, new_key()))
    return StartInstance(
        cmd_id=new_id(), instance_id=iid, model=model, filename=filename, **(base | kw)
    )


async def place(bus: Bus, host: str, cmd: StartInstance) -> None:
    """What the placer does: a PENDING record, then the start command."""
    await put_record(bus, cmd.instance_id, cmd.model, InstanceState.PENDING, host)
    await bus.command(proto.cmd_agent(host), cmd)


def state_files(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("run/*/*/*.json"))]


def server_pids(store: Path) -> list[int]:
    """llama-server processes whose model lies in this store (ours, whoever started them)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"llama-server") and any(str(store).encode() in a for a in cmd):
            if alive(int(d.name), None):
                pids.append(int(d.name))
    return pids


def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def kill_leftovers(tmp_path: Path) -> None:
    for pid in server_pids(tmp_path / "store"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class RunningAgent:
    ctx: ServiceContext
    task: asyncio.Task[None]
    bus: Bus

    async def stop(self, within: float = 30) -> None:
        """Graceful: what SIGTERM does."""
        self.ctx.stop.set()
        await asyncio.wait_for(self.task, within)
        await self.bus.close()

    async def crash(self) -> None:
        """No stop request, no cleanup: the in-process stand-in for kill -9."""
        self.task.cancel()
        await asyncio.wait([self.task], timeout=15)
        await self.bus.close()


class Agents:
    def __init__(self, nats_url: str, tmp_path: Path):
        self.nats_url = nats_url
        self.tmp_path = tmp_path
        self.running: list[RunningAgent] = []

    async def start(self, cfg: Config, host_id: str) -> RunningAgent:
        bus = await connect(self.nats_url, f"agent-{host_id}")
        ctx = ServiceContext(name="agent", cfg=cfg, bus=bus, host_id=host_id)
        t0 = proto.now()
        a = RunningAgent(ctx, asyncio.create_task(run(ctx)), bus)
        self.running.append(a)
        # the first heartbeat comes once adoption is done (an earlier agent's may be there)
        await heartbeat(bus, host_id, lambda r: r.ts > t0, 20, "the first heartbeat")
        return a

    async def start_with_tiny(self, src: Path) -> tuple[str, str]:
        """An agent on a new host id whose store holds `src` as stored("tiny"): (host, file name)."""
        host = unique_host()
        filename = put_model(self.tmp_path, src, "tiny")
        await self.start(parse(agent_config(self.tmp_path, host)), host)
        return host, filename

    async def aclose(self) -> None:
        for a in self.running:
            if not a.task.done():
                try:
                    await a.stop()
                except Exception:  # noqa: BLE001 - teardown goes on
                    a.task.cancel()
        kill_leftovers(self.tmp_path)


@pytest.fixture
async def agents(nats_url: str, tmp_path: Path, llama_server_bin: Path) -> AsyncIterator[Agents]:
    a = Agents(nats_url, tmp_path)
    try:
        yield a
    finally:
        await a.aclose()


async def chat(endpoint: str, model: str, key: str | None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as c:
        return await c.post(
            f"{endpoint}/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 8,
            },
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )


async def chat_ok(endpoint: str, model: str, key: str) -> dict[str, Any]:
    r = await chat(endpoint, model, key)
    assert r.status_code == 200, r.text
    return r.json()


async def last_event(bus: Bus, subject: str) -> Any:
    msg = await bus.js.get_last_msg(proto.EVENTS_STREAM, subject)
    return proto.decode(msg.data, proto.Event)


# ---------------------------------------------------------------- tests


async def test_heartbeat_reports_simulated_gpus_host_resources_and_store_files(
    agents: Agents, bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    host = unique_host()
    put_model(tmp_path, tiny_gguf(1), "tiny")
    (tmp_path / "store" / "next.gguf.part").write_bytes(b"half a download")
    await agents.start(parse(agent_config(tmp_path, host)), host)

    first = await host_record(bus, host)
    assert first is not None
    assert first.runtime == "process" and first.cpu_count >= 1
    assert 0 < first.ram_free_mib <= first.ram_total_mib
    assert [
        (g.index, g.name, g.memory_total_mib, g.memory_used_mib, g.simulated) for g in first.gpus
    ] == [
        (0, "Sim 8G", 8192, 0, True),
        (1, "Sim 4G", 4096, 0, True),
    ]
    assert [(f.model, f.filename) for f in first.files] == [("tiny", stored("tiny"))]
    assert first.files[0].size == (tmp_path / "store" / stored("tiny")).stat().st_size
    assert first.instances == []
    later = await heartbeat(bus, host, lambda r: r.ts > first.ts, 5, "a second heartbeat")
    assert later.started_at == first.started_at
    joined = await last_event(bus, proto.evt("host.joined"))
    assert (joined.host_id, joined.gpus, joined.runtime) == (host, 2, "process")


async def test_start_instance_becomes_ready_serves_chat_and_claims_its_gpu_memory(
    agents: Agents, bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    host, filename = await agents.start_with_tiny(tiny_gguf(1))
    iid = new_iid()
    await place(bus, host, start_cmd(iid, filename, gpus=[1], memory_mib=1500))

    rec = await wait_state(bus, iid, InstanceState.READY, InstanceState.FAILED)
    assert rec.state == InstanceState.READY, rec.reason + rec.log_tail
    assert rec.host == host and rec.gpus == [1] and rec.memory_mib == 1500
    assert rec.endpoint and rec.endpoint.startswith("http://127.0.0.1:") and rec.ready_at
    reply = await chat_ok(rec.endpoint, "tiny", key_for(iid))
    assert reply["choices"] and reply["model"] == "tiny"

    hr = await heartbeat(bus, host, lambda r: iid in r.instances, 5, "a heartbeat listing it")
    assert hr.gpus[1].memory_used_mib == 1500 and hr.gpus[1].memory_claimed_mib == 1500
    assert hr.gpus[0].memory_used_mib == 0
    ready = await last_event(bus, proto.evt("instance.ready"))
    assert (ready.instance_id, ready.endpoint, ready.host) == (iid, rec.endpoint, host)
    starting = await last_event(bus, proto.evt("instance.starting"))
    assert starting.instance_id == iid
    [st] = state_files(tmp_path)
    argv = st["argv"]
    assert argv[argv.index("-c") + 1] == "512" and argv[argv.index("-ngl") + 1] == "0"
    # no -np: llama-server picks its slots (4, one unified KV cache), and the record says so
    assert argv[argv.index("--alias") + 1] == "tiny" and "-np" not in argv
    assert rec.slots == 4
    assert proc_env(st["pid"])["CUDA_VISIBLE_DEVICES"] == "1"  # pinned to its placed GPU


async def test_duplicate_start_commands_run_one_server(
    agents: Agents, bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    host, filename = await agents.start_with_tiny(tiny_gguf(1))
    iid = new_iid()
    cmd = start_cmd(iid, filename)
    await place(bus, host, cmd)
    await bus.command(proto.cmd_agent(host), start_cmd(iid, filename))  # another cmd_id
    rec = await wait_state(bus, iid, InstanceState.READY)
    await bus.command(proto.cmd_agent(host), start_cmd(iid, filename))  # once ready, too
    await asyncio.sleep(1.0)
    assert len(server_pids(tmp_path / "store")) == 1
    assert len(state_files(tmp_path)) == 1
    assert (await get_record(bus, iid)).endpoint == rec.endpoint


async def test_stop_instance_marks_it_stopped_and_ends_the_server(
    agents: Agents, bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    host, filename = await agents.start_with_tiny(tiny_gguf(1))
    iid = new_iid()
    await place(bus, host, start_cmd(iid, filename, gpus=[0], memory_mib=700))
    await wait_state(bus, iid, InstanceState.READY)
    [st] = state_files(tmp_path)

    await bus.command(
        proto.cmd_agent(host), StopInstance(cmd_id=new_id(), instance_id=iid, reason="idle")
    )
    rec = await wait_state(bus, iid, InstanceState.STOPPED)
    assert rec.reason == "idle" and rec.endpoint is None
    assert not alive(st["pid"], st["start_ticks"])
    assert state_files(tmp_path) == [] and server_pids(tmp_path / "store") == []
    hr = await heartbeat(bus, host, lambda r: iid not in r.instances, 5, "one without it")
    assert hr.gpus[0].memory_used_mib == 0
    stopped = await last_event(bus, proto.evt("instance.stopped"))
    assert stopped.instance_id == iid


async def test_stopping_an_instance_not_running_here_only_settles_its_record(
    agents: Agents, bus: Bus, tmp_path: Path
) -> None:
    host = unique_host()
    await agents.start(parse(agent_config(tmp_path, host)), host)
    pending, unknown = new_iid(), new_iid()
    await put_record(bus, pending, "tiny", InstanceState.PENDING, host)
    for iid in (pending, unknown):
        await bus.command(proto.cmd_agent(host), StopInstance(cmd_id=new_id(), instance_id=iid))
    rec = await wait_state(bus, pending, InstanceState.STOPPED)
    assert rec.reason == "stop requested"
    assert await get_record(bus, unknown) is None  # nothing invented for an unknown id


async def test_corrupt_gguf_fails_with_the_log_tail_and_is_not_retried(
    agents: Agents, bus: Bus, tmp_path: Path
) -> None:
    host = unique_host()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / stored("broken")).write_bytes(b"GGUF" + os.urandom(4000))
    await agents.start(parse(agent_config(tmp_path, host)), host)
    iid = new_iid("broken")
    await place(bus, host, start_cmd(iid, stored("broken"), model="broken"))

    rec = await wait_state(bus, iid, InstanceState.FAILED, InstanceState.READY)
    assert rec.state == InstanceState.FAILED
    assert "exited with code 1" in rec.reason
    assert "failed to load model" in rec.log_tail and len(rec.log_tail.splitlines()) <= 30
    failed = await last_event(bus, proto.evt("instance.failed"))
    assert failed.instance_id == iid and failed.reason == rec.reason
    # a redelivered or repeated start does not retry: the placer decides that
    await bus.command(proto.cmd_agent(host), start_cmd(iid, stored("broken"), model="broken"))
    await asyncio.sleep(1.0)
    assert (await get_record(bus, iid)).updated == rec.updated
    assert state_files(tmp_path) == [] and server_pids(tmp_path / "store") == []


async def test_missing_model_file_fails_without_launching(
    agents: Agents, bus: Bus, tmp_path: Path
) -> None:
    host = unique_host()
    await agents.start(parse(agent_config(tmp_path, host)), host)
    iid = new_iid("absent")
    await place(bus, host, start_cmd(iid, stored("absent"), model="absent"))
    rec = await wait_state(bus, iid, InstanceState.FAILED)
    assert f"{stored('absent')} is not in the store" in rec.reason


async def test_server_that_never_gets_healthy_is_killed_and_failed(
    agents: Agents, bus: Bus, tmp_path: Path
) -> None:
    host = unique_host()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / stored("m")).write_bytes(b"x")
    fake = tmp_path / "llama-server"  # accepts anything, never listens
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --help ] && exit 0\necho "loading forever"\nexec sleep 60\n'
    )
    fake.chmod(0o755)
    cfg = agent_config(tmp_path, host, llama_server=str(fake), start_timeout=1.5)
    await agents.start(parse(cfg), host)
    iid = new_iid("m")
    await place(bus, host, start_cmd(iid, stored("m"), model="m"))
    rec = await wait_state(bus, iid, InstanceState.FAILED)
    assert "within 1.5 s" in rec.reason and "loading forever" in rec.log_tail
    assert state_files(tmp_path) == []


async def test_a_start_without_a_record_is_refused_and_a_crash_marks_it_failed_with_the_log_tail(
    agents: Agents, bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    host, filename = await agents.start_with_tiny(tiny_gguf(1))
    orphan = new_iid()
    await bus.command(proto.cmd_agent(host), start_cmd(orphan, filename))  # nobody placed it
    iid = new_iid()
    await place(bus, host, start_cmd(iid, filename))
    rec = await wait_state(bus, iid, InstanceState.READY)
    assert rec.host == host and rec.model == "tiny"
    assert await get_record(bus, orphan) is None  # never created by the agent, never run
    [st] = state_files(tmp_path)
    os.kill(st["pid"], signal.SIGKILL)
    rec = await wait_state(bus, iid, InstanceState.FAILED, within=10)
    assert "exited unexpectedly with code -9" in rec.reason and rec.log_tail
    assert rec.endpoint is None


async def test_graceful_stop_stops_every_instance_and_marks_them_stopped(
    agents: Agents, bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    host = unique_host()
    a = put_model(tmp_path, tiny_gguf(1), "a")
    b = put_model(tmp_path, tiny_gguf(2), "b")
    agent = await agents.start(parse(agent_config(tmp_path, host)), host)
    ids = [new_iid("a"), new_iid("b")]
    await place(bus, host, start_cmd(ids[0], a, model="a"))
    await place(bus, host, start_cmd(ids[1], b, model="b"))
    for iid in ids:
        await wait_state(bus, iid, InstanceState.READY)
    assert len(server_pids(tmp_path / "store")) == 2

    await agent.stop()
    for iid in ids:
        rec = await get_record(bus, iid)
        assert rec.state == InstanceState.STOPPED and rec.reason == "agent shutting down"
    assert server_pids(tmp_path / "store") == [] and state_files(tmp_path) == []
    assert (await host_record(bus, host)).instances == []


async def test_runtime_docker_without_an_engine_refuses_to_start_and_auto_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    host = unique_host()

    def ctx(runtime: str) -> ServiceContext:
        cfg = parse(agent_config(tmp_path, host, runtime=runtime))
        return ServiceContext(name="agent", cfg=cfg, bus=None, host_id=host)  # type: ignore[arg-type]

    with pytest.raises(StartupError, match="'docker' but no Docker engine answers"):
        await create_agent(ctx("docker"))
    agent = await create_agent(ctx("auto"))
    assert agent.runtime.name == "process"
    await agent._close()


# ---------------------------------------------------------------- kill -9 and adoption


class AgentProcess:
    def __init__(self, config: Path, nats_url: str, host: str, log: Path):
        self.args = [sys.executable, "-m", "services.agent", "--config", str(config)]
        self.args += ["--nats", nats_url, "--host-id", host]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def agent_process(nats_url: str, tmp_path: Path, llama_server_bin: Path):  # noqa: ANN201
    made: list[AgentProcess] = []

    def make(host: str) -> AgentProcess:
        config = tmp_path / "agent.yaml"
        config.write_text(yaml.safe_dump(agent_config(tmp_path, host)))
        p = AgentProcess(config, nats_url, host, tmp_path / "agent.log")
        made.append(p)
        return p

    yield make
    for p in made:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
    kill_leftovers(tmp_path)


async def test_agent_killed_with_sigkill_is_adopted_by_the_next_one_without_orphans(
    agent_process: Callable[[str], AgentProcess],
    bus: Bus,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    host = unique_host()
    a = put_model(tmp_path, tiny_gguf(1), "a")
    b = put_model(tmp_path, tiny_gguf(2), "b")
    agent = agent_process(host)
    agent.start()
    kept, unwanted, ghost = new_iid("a"), new_iid("b"), new_iid("a")
    await place(bus, host, start_cmd(kept, a, model="a", gpus=[0], memory_mib=900))
    await place(bus, host, start_cmd(unwanted, b, model="b"))
    ready = await wait_state(bus, kept, InstanceState.READY, within=40)
    await wait_state(bus, unwanted, InstanceState.READY)
    pids = {s["instance_id"]: s["pid"] for s in state_files(tmp_path)}

    assert agent.kill(signal.SIGKILL) == -signal.SIGKILL
    assert all(alive(p, None) for p in pids.values())  # kill -9 leaves the servers running
    # while no agent ran: one instance was given up on, and a record claims a server that
    # does not exist
    await put_record(bus, unwanted, "b", InstanceState.LOST, host, reason="host lost")
    await put_record(bus, ghost, "a", InstanceState.READY, host, endpoint="http://127.0.0.1:9")

    agent.start()
    rec = await wait_state(bus, ghost, InstanceState.FAILED, within=40)
    assert rec.reason == "agent restarted; instance process not found"
    adopted = await wait_state(bus, kept, InstanceState.READY, reason=ADOPTED)
    assert adopted.endpoint == ready.endpoint and adopted.gpus == [0]

    async def only_kept() -> bool:  # the unwanted one is being stopped meanwhile
        return server_pids(tmp_path / "store") == [pids[kept]]

    await eventually(only_kept, 10, "only the adopted server left")  # same process, no dup
    assert (await get_record(bus, unwanted)).state == InstanceState.LOST
    await chat_ok(adopted.endpoint, "a", key_for(kept))
    # one heartbeat sent before the unwanted server stopped may still list it
    hr = await heartbeat(bus, host, lambda r: r.instances == [kept], 10, "only the adopted one")
    assert hr.gpus[0].memory_used_mib == 900

    # a redelivered start for the adopted instance changes nothing
    await bus.command(proto.cmd_agent(host), start_cmd(kept, a, model="a"))
    await asyncio.sleep(0.5)
    assert server_pids(tmp_path / "store") == [pids[kept]]

    assert agent.kill(signal.SIGTERM) == 0  # graceful: stops what it adopted too
    rec = await get_record(bus, kept)
    assert rec.state == InstanceState.STOPPED and rec.reason == "agent shutting down"
    assert server_pids(tmp_path / "store") == [] and state_files(tmp_path) == []


async def test_agent_keeps_taking_commands_after_a_nats_server_restart(
    agents: Agents, nats_server: Any, bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    host, filename = await agents.start_with_tiny(tiny_gguf(1))
    nats_server.stop()
    await asyncio.sleep(1.0)
    nats_server.start()  # same port and store: streams, buckets and the consumer survive
    iid = new_iid()
    await eventually(lambda: _try_place(bus, host, start_cmd(iid, filename)), 20, "NATS back")
    rec = await wait_state(bus, iid, InstanceState.READY, within=60)
    assert rec.endpoint


async def _try_place(bus: Bus, host: str, cmd: StartInstance) -> bool:
    try:
        await place(bus, host, cmd)
        return True
    except Exception:  # noqa: BLE001 - not reconnected yet
        return False
