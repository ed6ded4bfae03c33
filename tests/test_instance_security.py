"""Defence in depth at the agent and the instances, on real parts (NATS, llama-server).

Whoever can publish on an agent's command subject cannot make it run anything its config
does not say; instances listen only where the agent advertises and require a per-instance
key; the gateway trusts only endpoints that a host's own heartbeat vouches for and sends them
none of the client's secrets; two stacks on one machine never touch each other's servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml
from test_agent import (
    ADOPTED,
    Agents,
    agent_config,
    agents,  # noqa: F401 - fixture
    chat,
    chat_ok,
    eventually,
    get_record,
    heartbeat,
    key_for,
    new_iid,
    place,
    proc_env,
    put_model,
    put_record,
    server_pids,
    start_cmd,
    state_files,
    stored,
    unique_host,
    wait_state,
)

import proto
from lls.bus import Bus, new_id
from lls.config import parse
from lls.service import ServiceContext
from proto import InstanceState
from services.agent.runtime_process import alive
from services.agent.service import StartupError, create_agent
from services.gateway.router import endpoint_refusal
from stack import Stack

# ---------------------------------------------------------------- helpers


class Refusals:
    """CommandRefused events, subscribed before any command is sent."""

    def __init__(self) -> None:
        self.items: list[proto.CommandRefused] = []
        self.changed = asyncio.Event()

    async def cb(self, msg: Any) -> None:
        self.items.append(proto.decode(msg.data, proto.CommandRefused))
        self.changed.set()

    async def wait_for(self, n: int, within: float = 10) -> list[proto.CommandRefused]:
        async with asyncio.timeout(within):
            while len(self.items) < n:
                self.changed.clear()
                await self.changed.wait()
        return self.items


@pytest.fixture
async def refusals(bus: Bus) -> AsyncIterator[Refusals]:
    r = Refusals()
    sub = await bus.nc.subscribe(proto.evt("command.refused"), cb=r.cb)
    yield r
    await sub.unsubscribe()


async def publish_raw(bus: Bus, host: str, cmd: dict[str, Any]) -> None:
    """A command as anyone with a plain NATS client could write it."""
    data = msgspec.json.encode({"type": "start", "cmd_id": new_id(), **cmd})
    await bus.js.publish(proto.cmd_agent(host), data, headers={"Nats-Msg-Id": new_id()})


class Recorder:
    """A tiny HTTP server that records what reaches it and answers like a chat completion."""

    def __init__(self, port: int = 0) -> None:
        seen = self.requests = []  # type: list[dict[str, str]]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("content-length") or 0))
                seen.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps(
                    {"object": "chat.completion", "choices": [], "model": "m"}
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def files_named(pattern: str, folder: Path) -> list[Path]:
    """Files matching `pattern*` under `folder`, and in /tmp for a unique name (where a
    path-like id aims)."""
    found = list(folder.rglob(f"{pattern}*"))
    if "*" not in pattern:
        found += Path("/tmp").glob(f"{pattern}*")
    return found


def free_port_in(lo: int, hi: int) -> int:
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError(f"no free port in {lo}-{hi}")


# ---------------------------------------------------------------- forged commands


async def test_forged_start_commands_are_refused_and_nothing_runs_or_is_written(
    agents: Agents,  # noqa: F811
    bus: Bus,
    refusals: Refusals,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    host, filename = await agents.start_with_tiny(tiny_gguf(1))
    name = f"lls-forged-{new_id()}"
    forged: list[dict[str, Any]] = [
        # flags in the command: the pinned llama.cpp's --tools runs shell commands
        {"instance_id": new_iid(), "model": "tiny", "filename": filename, "n_gpu_layers": 0}
        | {"args": ["--tools", "all"], "ctx_size": 512},
        # ids that would be file names outside the run dir
        {"instance_id": f"/tmp/{name}", "model": "tiny", "filename": filename, "n_gpu_layers": 0},
        {"instance_id": f"../{name}", "model": "tiny", "filename": filename, "n_gpu_layers": 0},
        # a model this agent does not know, and a file that is not the model's
        {"instance_id": new_iid("x"), "model": "x", "filename": "x.gguf", "n_gpu_layers": 0},
        {"instance_id": new_iid(), "model": "tiny", "filename": "../../etc/passwd"}
        | {"n_gpu_layers": 0},
    ]
    for cmd in forged:
        await publish_raw(bus, host, cmd)
    got = await refusals.wait_for(len(forged))
    by_id = {r.instance_id: r for r in got}
    assert all(r.host == host for r in got)
    assert "args" in by_id[forged[0]["instance_id"]].reason  # a start carries no flags
    for bad in (f"/tmp/{name}", f"../{name}"):
        assert "id format" in by_id[bad].reason
    assert "not in this agent's config" in by_id[forged[3]["instance_id"]].reason
    assert stored("tiny") in by_id[forged[4]["instance_id"]].reason

    await asyncio.sleep(1.0)  # anything launched would show by now
    assert server_pids(tmp_path / "store") == [] and state_files(tmp_path) == []
    assert files_named(name, tmp_path) == []
    assert not (tmp_path / "run").exists() or files_named("*.log", tmp_path / "run") == []
    for cmd in forged:  # no record was invented either
        assert await get_record(bus, cmd["instance_id"]) is None


async def test_a_start_for_a_model_the_agent_lacks_fails_its_record_with_the_reason(
    agents: Agents,  # noqa: F811
    bus: Bus,
    refusals: Refusals,
    tmp_path: Path,
) -> None:
    """A placer whose config differs: the waiting request learns why at once."""
    host = unique_host()
    await agents.start(parse(agent_config(tmp_path, host)), host)
    iid = new_iid("elsewhere")
    await place(bus, host, start_cmd(iid, "elsewhere.gguf", model="elsewhere"))
    rec = await wait_state(bus, iid, InstanceState.FAILED)
    assert "agent refused" in rec.reason and "not in this agent's config" in rec.reason
    [refused] = await refusals.wait_for(1)
    assert (refused.instance_id, refused.model, refused.command) == (iid, "elsewhere", "start")


def test_host_ids_never_widen_or_split_subjects(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket as socket_mod

    monkeypatch.setattr(socket_mod, "gethostname", lambda: "gpu-1.lab.example>*")
    host = parse({}).host_id()
    assert host == "gpu-1-lab-example" and proto.HOST_ID_RE.fullmatch(host)
    with pytest.raises(ValueError, match="agent.host_id"):
        parse({"agent": {"host_id": "a.b"}})


async def test_a_host_id_from_the_command_line_is_checked_too(tmp_path: Path) -> None:
    cfg = parse(agent_config(tmp_path, "ok"))
    for bad in ("a.b", "*", ">", "a b"):
        ctx = ServiceContext(name="agent", cfg=cfg, bus=None, host_id=bad)  # type: ignore[arg-type]
        with pytest.raises(StartupError, match="--host-id"):
            await create_agent(ctx)


# ---------------------------------------------------------------- the instances


async def test_instance_requires_its_key_binds_the_advertised_address_and_inherits_no_tokens(
    agents: Agents,  # noqa: F811
    bus: Bus,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # in the agent's environment: a token, and a variable llama-server would read as a flag
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_servers")
    monkeypatch.setenv("LLAMA_ARG_TOOLS", "all")
    host = unique_host()
    put_model(tmp_path, tiny_gguf(1), "tiny")
    # 127.0.0.2 is loopback too, but not 127.0.0.1: shows the server binds only what it is given
    cfg = agent_config(tmp_path, host, advertise_host="127.0.0.2")
    await agents.start(parse(cfg), host)
    iid = new_iid()
    await place(bus, host, start_cmd(iid, stored("tiny")))
    rec = await wait_state(bus, iid, InstanceState.READY, InstanceState.FAILED)
    assert rec.state == InstanceState.READY, rec.reason + rec.log_tail
    assert rec.endpoint and rec.endpoint.startswith("http://127.0.0.2:")
    key = key_for(tmp_path, iid)

    assert (await chat(rec.endpoint, "tiny", None)).status_code == 401
    assert (await chat(rec.endpoint, "tiny", key_for(tmp_path, new_iid()))).status_code == 401
    await chat_ok(rec.endpoint, "tiny", key)
    async with httpx.AsyncClient(timeout=5) as c:
        assert (await c.get(f"{rec.endpoint}/health")).status_code == 200  # public
        with pytest.raises(httpx.ConnectError):  # not every interface
            await c.get(rec.endpoint.replace("127.0.0.2", "127.0.0.1") + "/health")

    [st] = state_files(tmp_path)
    assert key not in " ".join(st["argv"])  # ps shows argv: the key is in the environment
    assert st["argv"][st["argv"].index("--host") + 1] == "127.0.0.2"
    env = proc_env(st["pid"])
    assert env["LLAMA_API_KEY"] == key
    assert "HF_TOKEN" not in env and "LLAMA_ARG_TOOLS" not in env and "PATH" in env
    hr = await heartbeat(bus, host, lambda r: iid in r.instances, 5, "a heartbeat listing it")
    assert hr.advertise_host == "127.0.0.2" and hr.port_range == (39000, 39999)


# ---------------------------------------------------------------- two stacks, one machine


async def test_two_stacks_on_one_machine_never_adopt_or_stop_each_others_instances(
    agents: Agents,  # noqa: F811
    bus: Bus,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    """Same host id, same store; only the cluster id differs. Each time an agent starts,
    the other stack's server has no record on its bus: unscoped, it would be stopped."""
    host = unique_host()
    put_model(tmp_path, tiny_gguf(1), "a")
    put_model(tmp_path, tiny_gguf(2), "b")

    def cfg(cluster: str):  # noqa: ANN202
        return parse(agent_config(tmp_path, host) | {"cluster": {"id": cluster} | secret})

    secret = {"secret_file": str(tmp_path / "cluster.secret")}
    first = await agents.start(cfg("stack-a"), host)
    x = new_iid("a")
    await place(bus, host, start_cmd(x, stored("a"), model="a"))
    ready_x = await wait_state(bus, x, InstanceState.READY)
    [sx] = state_files(tmp_path)
    await first.crash()
    await bus.instances.delete(proto.instance_key(host, x))  # stack b's bus knows nothing

    second = await agents.start(cfg("stack-b"), host)  # its adoption is done now
    assert alive(sx["pid"], sx["start_ticks"]) and await get_record(bus, x) is None
    y = new_iid("b")
    await place(bus, host, start_cmd(y, stored("b"), model="b"))
    await wait_state(bus, y, InstanceState.READY)
    sy = next(s for s in state_files(tmp_path) if s["instance_id"] == y)
    assert {s["cluster"] for s in state_files(tmp_path)} == {"stack-a", "stack-b"}
    await second.crash()
    await bus.instances.delete(proto.instance_key(host, y))
    await put_record(bus, x, "a", InstanceState.READY, host, endpoint=ready_x.endpoint)

    third = await agents.start(cfg("stack-a"), host)  # adopts x, leaves y alone
    adopted = await wait_state(bus, x, InstanceState.READY, reason=ADOPTED)
    assert adopted.endpoint == ready_x.endpoint
    assert alive(sy["pid"], sy["start_ticks"])
    await third.stop()  # graceful: stops what it adopted, nothing of the other stack
    assert not alive(sx["pid"], sx["start_ticks"]) and alive(sy["pid"], sy["start_ticks"])
    assert server_pids(tmp_path / "store") == [sy["pid"]]


# ---------------------------------------------------------------- the gateway


def host_record(**kw: Any) -> proto.HostRecord:
    base: dict[str, Any] = dict(
        host_id="h1",
        ts=0.0,
        started_at=0.0,
        runtime="process",
        gpus=[],
        cpu_count=1,
        ram_total_mib=1,
        ram_free_mib=1,
        advertise_host="10.0.0.5",
        port_range=(39000, 39999),
    )
    return proto.HostRecord(**(base | kw))


def ready(endpoint: str, host: str | None = "h1") -> proto.InstanceRecord:
    return proto.InstanceRecord(
        instance_id="m-0123abcd",
        model="m",
        state=InstanceState.READY,
        created=0.0,
        updated=0.0,
        host=host,
        endpoint=endpoint,
    )


def test_endpoints_must_be_the_advertised_address_and_a_port_in_the_agents_range() -> None:
    hosts = {"h1": host_record(), "old": host_record(host_id="old", advertise_host="")}
    assert endpoint_refusal(ready("http://10.0.0.5:39001"), hosts) is None
    for endpoint in (
        "http://10.0.0.6:39001",  # another address
        "http://10.0.0.5:22",  # outside the range
        "http://evil.example:39001",
        "https://10.0.0.5:39001",
        "http://user@10.0.0.5:39001",
        "http://10.0.0.5:39001/other/prefix",
        "http://10.0.0.5",
        "http://10.0.0.5:notaport",
    ):
        assert endpoint_refusal(ready(endpoint), hosts) is not None, endpoint
    assert "not known" in (endpoint_refusal(ready("http://10.0.0.5:39001", "h2"), hosts) or "")
    assert endpoint_refusal(ready("http://10.0.0.5:39001", None), hosts) is not None
    assert endpoint_refusal(ready("http://10.0.0.5:39001", "old"), hosts) is not None


CLIENT_KEY = "sk-client-secret-0123456789"


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for r in made:
        r.close()


async def test_forged_ready_records_get_no_traffic_and_no_client_secret(
    tmp_path: Path, nats_url: str, bus: Bus, recorders: list[Recorder], llama_server_bin: Path
) -> None:
    secret_file = tmp_path / "cluster.secret"
    stack = Stack(
        tmp_path,
        nats_url,
        # never becomes ready by itself: its file does not exist, so only forged records serve
        {"m": {"url": "file:///nonexistent/m.gguf", "memory_mib": 100}},
        gateway__api_keys=[{"key": CLIENT_KEY}],
        gateway__cold_start_timeout=2,
        cluster={"secret_file": str(secret_file)},
    )
    lo, hi = yaml.safe_load(stack.config.read_text())["agent"]["port_range"]
    stack.start()
    try:
        await heartbeat(bus, "h1", lambda r: r.advertise_host == "127.0.0.1", 20, "agent h1")
        client_headers = {
            "Authorization": f"Bearer {CLIENT_KEY}",
            "x-api-key": CLIENT_KEY,
            "Cookie": f"session={CLIENT_KEY}",
            "x-custom": "client-only",
        }
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

        async def ask() -> httpx.Response:
            async with httpx.AsyncClient(timeout=30) as c:
                return await c.post(
                    f"{stack.base}/v1/chat/completions", json=body, headers=client_headers
                )

        # 1. an endpoint that no host advertises: ignored, and the gateway says so
        outside = Recorder()
        recorders.append(outside)
        for _ in range(100):  # the OS picks ports anywhere: keep one outside h1's range
            if not lo <= outside.port <= hi:
                break
            outside = Recorder()
            recorders.append(outside)
        assert not lo <= outside.port <= hi
        bad = new_iid("m")
        await put_record(
            bus, bad, "m", InstanceState.READY, "h1", endpoint=f"http://127.0.0.1:{outside.port}"
        )

        async def logged() -> bool:
            return f"ignoring {bad}" in stack.logs()

        await eventually(logged, 15, "the gateway to log the forged endpoint")
        r = await ask()
        assert r.status_code == 503, r.text  # not served by the forged endpoint
        assert outside.requests == []

        # 2. inside h1's range (as a forger on that host could): it gets the request, but
        # only the instance's own key, none of the client's secrets or extra headers
        inside = Recorder(free_port_in(lo, hi))
        recorders.append(inside)
        iid = new_iid("m")
        await put_record(
            bus, iid, "m", InstanceState.READY, "h1", endpoint=f"http://127.0.0.1:{inside.port}"
        )
        async with asyncio.timeout(20):
            while not inside.requests:
                await ask()
        [seen, *_] = inside.requests
        assert seen["authorization"] == f"Bearer {key_for(tmp_path, iid)}"
        assert not {"x-api-key", "cookie", "x-custom"} & set(seen)
        assert CLIENT_KEY not in json.dumps(inside.requests)
        assert outside.requests == []
        assert os.stat(secret_file).st_mode & 0o777 == 0o600
    finally:
        stack.stop()
