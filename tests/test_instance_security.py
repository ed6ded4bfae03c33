"""Defence in depth at the agent and the instances, on real parts (NATS, llama-server).

Whoever can publish on an agent's command subject cannot make it run anything its config
does not say; instances listen only where the agent advertises and require their own key,
which the placer issues per start and only the gateways and the instance's host learn;
every reader checks a record's body against its key; the gateway sends traffic only to a
READY record a placement vouches for, at an address the config allows for its host, and
sends it none of the client's secrets; two stacks on one machine never touch each other's
servers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml
from nats.js.errors import NotFoundError
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
from test_bus_auth import as_user, refused  # noqa: F401 - fixture

import proto
from lls import auth, instance_key
from lls.bus import Bus, kv_snapshot, new_id
from lls.config import ConfigError, parse
from lls.records import InstanceIndex
from lls.service import ServiceContext
from proto import InstanceRecord, InstanceState
from services.agent.runtime_choice import StartupError
from services.agent.runtime_process import alive
from services.agent.service import create_agent
from services.gateway.trust import endpoint_refusal, placement_refusal, upstream_allowed
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

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
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

        self.server = ThreadingHTTPServer((host, port), Handler)
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
        # no API key: a server anyone could call (or another host could guess) never runs
        {"instance_id": new_iid(), "model": "tiny", "filename": filename, "n_gpu_layers": 0},
        {"instance_id": new_iid(), "model": "tiny", "filename": filename, "n_gpu_layers": 0}
        | {"api_key": "short;rm -rf /"},
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
    assert "carries no API key" in by_id[forged[5]["instance_id"]].reason
    assert "malformed API key" in by_id[forged[6]["instance_id"]].reason

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
    key = key_for(iid)

    assert (await chat(rec.endpoint, "tiny", None)).status_code == 401
    assert (await chat(rec.endpoint, "tiny", key_for(new_iid()))).status_code == 401
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
        return parse(agent_config(tmp_path, host) | {"cluster": {"id": cluster}})

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


# ---------------------------------------------------------------- records and their keys


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


def ready(
    endpoint: str, host: str | None = "h1", iid: str = "m-0123abcd", at: float = 0.0
) -> InstanceRecord:
    """A READY record of model m; `at`: when it was made and became ready (0: long ago)."""
    return InstanceRecord(
        instance_id=iid,
        model="m",
        state=InstanceState.READY,
        created=at,
        updated=at,
        host=host,
        endpoint=endpoint,
        ready_at=at or None,
    )


def issued(host: str, iid: str, model: str = "m") -> proto.InstanceKey:
    return proto.InstanceKey(
        instance_id=iid, host=host, model=model, key=instance_key.new_key(), issued=time.time()
    )


def test_a_record_belongs_only_under_the_key_its_body_names() -> None:
    rec = ready("http://10.0.0.5:39001")
    assert proto.key_mismatch("h1.m-0123abcd", rec) is None
    for key in ("h2.m-0123abcd", "h1.m-0123abce", "m-0123abcd", ".m-0123abcd", "h1.x.m-0123abcd"):
        assert proto.key_mismatch(key, rec) is not None, key
    dotted = msgspec.structs.replace(rec, host="h1.x")  # would read as host h1 in the key
    assert "not a host id" in (proto.key_mismatch("h1.x.m-0123abcd", dotted) or "")
    odd = msgspec.structs.replace(rec, instance_id="m:0123abcd")  # kv_key would rename it
    assert "cannot be a key" in (proto.key_mismatch("h1.m_0123abcd", odd) or "")
    assert proto.key_mismatch("h1", host_record()) is None
    assert proto.key_mismatch("h2", host_record()) is not None
    assert proto.key_mismatch("h1.m-0123abcd", issued("h1", "m-0123abcd")) is None
    assert proto.key_mismatch("h2.m-0123abcd", issued("h1", "m-0123abcd")) is not None


def test_one_record_per_instance_the_placed_hosts_whichever_came_first() -> None:
    shown: dict[str, str] = {}  # instance id -> key the view holds
    reports: list[tuple[str, str]] = []
    index = InstanceIndex(
        lambda key, rec, _rev: shown.__setitem__(rec.instance_id, key),
        lambda key: shown.pop(proto.instance_of_key(key)),
        lambda _bucket, key, why: reports.append((key, why)),
    )
    genuine = ready("http://10.0.0.5:39001")
    forged = msgspec.structs.replace(genuine, host="h2", endpoint="http://10.0.0.6:39001")
    index.put("h2.m-0123abcd", forged, 1)  # the forger's came first: nothing to go by yet
    index.put("h1.m-0123abcd", genuine, 2)
    assert shown == {"m-0123abcd": "h2.m-0123abcd"}
    index.placed("m-0123abcd", "h1")  # the placer's key names h1
    assert shown == {"m-0123abcd": "h1.m-0123abcd"}
    assert reports[-1][0] == "h2.m-0123abcd" and "another host's claim" in reports[-1][1]
    index.delete("h2.m-0123abcd")  # deleting a claim nobody saw deletes nothing
    index.put("h2.m-0123abcd", forged, 3)
    assert shown == {"m-0123abcd": "h1.m-0123abcd"}
    index.delete("h1.m-0123abcd")  # the placed one went: the forger's is still not it
    assert shown == {}
    index.placed("m-0123abcd", None)  # no key either: the only claim stands
    assert shown == {"m-0123abcd": "h2.m-0123abcd"}
    index.placed("n-0123abcd", "h1")  # a key whose record is not there yet
    index.put("h2.n-0123abcd", msgspec.structs.replace(forged, instance_id="n-0123abcd"), 4)
    assert "n-0123abcd" not in shown


def test_the_placers_view_counts_a_live_record_only_once_a_key_vouches_for_it() -> None:
    shown: dict[str, InstanceRecord] = {}
    reports: list[tuple[str, str]] = []
    index = InstanceIndex(
        lambda key, rec, _rev: shown.__setitem__(rec.instance_id, rec),
        lambda key: shown.pop(proto.instance_of_key(key)),
        lambda _bucket, key, why: reports.append((key, why)),
        vouched_only=True,
    )
    forged = ready("http://10.0.0.5:39001", "h1", "m-0123abcd")
    index.put("h1.m-0123abcd", forged, 1)  # never placed: the placer does not count it
    assert shown == {} and reports == []  # (nor reports it: a key may be on its way)
    genuine = ready("http://10.0.0.5:39002", "h1", "m-4567abcd")
    index.put("h1.m-4567abcd", genuine, 2)  # seen before its key (another bucket's watch)
    assert shown == {}
    index.placed("m-4567abcd", "h1")
    assert shown == {"m-4567abcd": genuine}
    stopped = msgspec.structs.replace(genuine, state=InstanceState.STOPPED)
    index.put("h1.m-4567abcd", stopped, 3)
    index.placed("m-4567abcd", None)  # its key swept once it ended: the record stays
    assert shown == {"m-4567abcd": stopped}
    ended = msgspec.structs.replace(forged, instance_id="m-89abcdef", state=InstanceState.FAILED)
    index.put("h1.m-89abcdef", ended, 4)  # an ended record needs no key
    assert set(shown) == {"m-4567abcd", "m-89abcdef"} and reports == []


def test_endpoints_must_be_advertised_in_range_and_allowed_by_the_config() -> None:
    hosts = {"h1": host_record(), "old": host_record(host_id="old", advertise_host="")}
    allowed = {"h1": ["10.0.0.5"]}
    assert endpoint_refusal(ready("http://10.0.0.5:39001"), hosts, allowed) is None
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
        assert endpoint_refusal(ready(endpoint), hosts, allowed) is not None, endpoint
    assert "not known" in (endpoint_refusal(ready("http://10.0.0.5:39001", "h2"), hosts, {}) or "")
    assert endpoint_refusal(ready("http://10.0.0.5:39001", None), hosts, allowed) is not None
    assert endpoint_refusal(ready("http://10.0.0.5:39001", "old"), hosts, allowed) is not None
    # what the host advertises is not enough: the config must allow it for that host
    why = endpoint_refusal(ready("http://10.0.0.5:39001"), hosts, {"h2": ["10.0.0.5"]})
    assert why is not None and "gateway.allowed_upstreams.h1" in why
    assert "loopback" in (endpoint_refusal(ready("http://10.0.0.5:39001"), hosts, {}) or "")


def test_allowed_upstreams_are_addresses_networks_or_names_per_host() -> None:
    assert upstream_allowed("h1", "127.0.0.1", {}) and upstream_allowed("h1", "::1", {})
    assert upstream_allowed("h9", "127.0.0.2", {}) and upstream_allowed("h1", "localhost", {})
    assert not upstream_allowed("h1", "10.0.0.5", {})  # nothing configured: loopback only
    allowed = {"h1": ["10.0.0.0/24", "gpu-a.lan"], "h2": ["fd00::5"]}
    assert upstream_allowed("h1", "10.0.0.77", allowed)
    assert upstream_allowed("h1", "GPU-A.lan", allowed)
    assert upstream_allowed("h2", "fd00::5", allowed)
    assert not upstream_allowed("h1", "10.0.1.1", allowed)
    assert not upstream_allowed("h2", "10.0.0.77", allowed)  # h1's network, not h2's
    assert not upstream_allowed("h3", "127.0.0.1", allowed)  # listed hosts only, once set
    assert not upstream_allowed("h1", "gpu-a.lan.evil.example", allowed)


def test_config_errors_name_the_upstream_key_and_the_retired_secret_file() -> None:
    for bad, where in (
        ({"gateway": {"allowed_upstreams": {"a.b": []}}}, "gateway.allowed_upstreams: 'a.b'"),
        ({"gateway": {"allowed_upstreams": {"h1": ["http://x:80"]}}}, r"allowed_upstreams.h1\[0\]"),
        ({"gateway": {"allowed_upstreams": {"h1": ["*"]}}}, r"allowed_upstreams.h1\[0\]"),
        ({"cluster": {"secret_file": "/etc/s"}}, "cluster.secret_file: no longer used"),
    ):
        with pytest.raises(ConfigError, match=where):
            parse(bad)
    ok = parse({"gateway": {"allowed_upstreams": {"h1": ["10.0.0.0/24", "gpu-a.lan", "::1"]}}})
    assert ok.gateway.allowed_upstreams == {"h1": ["10.0.0.0/24", "gpu-a.lan", "::1"]}


def test_only_a_placement_vouches_for_a_ready_record() -> None:
    rec = ready("http://10.0.0.5:39001")
    assert placement_refusal(rec, issued("h1", rec.instance_id)) is None
    assert "no placement" in (placement_refusal(rec, None) or "")
    assert "on host h2" in (placement_refusal(rec, issued("h2", rec.instance_id)) or "")
    assert "placed as other" in (
        placement_refusal(rec, issued("h1", rec.instance_id, "other")) or ""
    )


# ---------------------------------------------------------------- on a real stack


async def everything_readable(bus: Bus, streams: tuple[str, ...]) -> bytes:
    """Every stored message of these streams, raw (what their readers may fetch)."""
    out = []
    for stream in streams:
        seq = 1
        while True:
            try:
                msg = await bus.js.get_msg(stream, seq=seq, next=True, subject=">")
            except NotFoundError:
                break
            out.append(msg.data or b"")
            seq = msg.seq + 1
    return b"\n".join(out)


async def ready_record(bus: Bus, model: str, within: float = 60) -> InstanceRecord:
    async def find() -> InstanceRecord | None:
        recs = await kv_snapshot(bus, bus.instances, InstanceRecord)
        live = [r for r in recs.values() if r.model == model and r.state == InstanceState.READY]
        return live[0] if live else None

    return await eventually(find, within, f"a ready instance of {model}")


async def test_an_instance_key_is_issued_per_start_and_reaches_only_its_host_and_the_gateways(
    tmp_path: Path,
    nats_url: str,
    bus: Bus,
    as_user: Callable[[str], Awaitable[Bus]],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    llama_server_bin: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    stack = Stack(tmp_path, nats_url, {"tiny": {"url": f"file://{tiny_gguf(3)}", "ctx_size": 256}})
    stack.start()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{stack.base}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        rec = await ready_record(bus, "tiny")
        placed = await instance_key.read(bus, "h1", rec.instance_id)  # the operator may
        assert placed is not None and (placed.host, placed.model) == ("h1", "tiny")
        assert instance_key.KEY_RE.fullmatch(placed.key)
        # Its host has it: the agent gave it to llama-server, which takes it and nothing else.
        [st] = [s for s in state_files(tmp_path) if s["instance_id"] == rec.instance_id]
        assert proc_env(st["pid"])["LLAMA_API_KEY"] == placed.key
        assert placed.key not in " ".join(st["argv"])
        assert rec.endpoint and (await chat(rec.endpoint, "tiny", None)).status_code == 401
        await chat_ok(rec.endpoint, "tiny", placed.key)

        # Nothing another host may read holds it: no KV view, no event.
        views = (proto.EVENTS_STREAM, *(f"KV_{b}" for b in auth.KV_BUCKETS))
        assert placed.key.encode() not in await everything_readable(bus, views)
        # Nor may it (or the UI) read or watch the keys themselves; the gateway may.
        key = proto.instance_key("h1", rec.instance_id)
        bucket = proto.KV_INSTANCE_KEYS
        for user in ("agent-h2", "ui"):
            who = await as_user(user)
            get = f"$JS.API.STREAM.MSG.GET.KV_{bucket}"
            await refused(who.instance_keys.get(key), get, caplog)
            await refused(
                who.instance_keys.watchall(), f"$JS.API.CONSUMER.CREATE.KV_{bucket}", caplog
            )
        gateway = await as_user("gateway")
        assert (await instance_key.read(gateway, "h1", rec.instance_id)) == placed

        # A new start is a new key, and the old one opens nothing: the ended instance's key
        # is deleted, the next instance takes only its own.
        await bus.emit(proto.StopRequested(model="tiny"))
        await wait_state(bus, rec.instance_id, InstanceState.STOPPED, within=30)

        async def key_gone() -> bool:
            return await instance_key.read(bus, "h1", rec.instance_id) is None

        await eventually(key_gone, 30, "the ended instance's key to be deleted")
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{stack.base}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        again = await ready_record(bus, "tiny")
        assert again.instance_id != rec.instance_id and again.endpoint
        renewed = await instance_key.read(bus, "h1", again.instance_id)
        assert renewed is not None and renewed.key != placed.key
        assert (await chat(again.endpoint, "tiny", placed.key)).status_code == 401
        await chat_ok(again.endpoint, "tiny", renewed.key)
    finally:
        stack.stop()


CLIENT_KEY = "sk-client-secret-0123456789"


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for r in made:
        r.close()


class RecordRefusals:
    """record.refused events, as the services report the records they ignore."""

    def __init__(self) -> None:
        self.items: list[proto.RecordRefused] = []

    async def cb(self, msg: Any) -> None:
        self.items.append(proto.decode(msg.data, proto.RecordRefused))

    def by(self, service: str, key: str) -> list[proto.RecordRefused]:
        return [e for e in self.items if e.service == service and e.key == key]


async def test_forged_records_get_no_traffic_and_are_reported(
    tmp_path: Path,
    nats_url: str,
    bus: Bus,
    as_user: Callable[[str], Awaitable[Bus]],  # noqa: F811
    recorders: list[Recorder],
    llama_server_bin: Path,
) -> None:
    """Agents write records of their own host only (NATS); everything else about a record is
    the gateway's to check. The test plays the placer (the operator's identity writes the
    instance keys) and two hostile hosts, h2 and h3, with their own agent identities."""
    stack = Stack(
        tmp_path,
        nats_url,
        # never becomes ready by itself: its file does not exist, so only these records serve
        {"m": {"url": "file:///nonexistent/m.gguf", "memory_mib": 100}},
        gateway__api_keys=[{"key": CLIENT_KEY}],
        gateway__cold_start_timeout=2,
        gateway__routing="round_robin",  # every trusted replica gets its turn
        gateway__allowed_upstreams={"h1": ["127.0.0.1"], "h2": ["127.0.0.0/8"]},
    )
    lo, hi = yaml.safe_load(stack.config.read_text())["agent"]["port_range"]
    stack.start()
    refusals = RecordRefusals()
    sub = await bus.nc.subscribe(proto.evt("record.refused"), cb=refusals.cb)
    a1, a2, a3 = [await as_user(f"agent-h{i}") for i in (1, 2, 3)]

    def recorder(host: str = "127.0.0.1", port: int = 0) -> Recorder:
        r = Recorder(port, host)
        recorders.append(r)
        return r

    in_h1 = [recorder(port=free_port_in(lo, hi)) for _ in range(2)]
    r2, r3 = recorder(), recorder("127.0.0.3")

    async def heartbeats() -> None:  # h2 and h3 stay heard (and advertise their recorders)
        while True:
            for who, host, addr, port in (
                (a2, "h2", "127.0.0.1", r2.port),
                (a3, "h3", "127.0.0.3", r3.port),
            ):
                hb = host_record(
                    host_id=host, ts=time.time(), advertise_host=addr, port_range=(port, port)
                )
                await who.put(who.hosts, host, hb)
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(heartbeats())
    try:
        await heartbeat(bus, "h3", lambda r: r.advertise_host == "127.0.0.3", 10, "h3")
        x, y, z, w, v, u, ok = (new_iid("m") for _ in range(7))
        keys = {  # what the placer would have written: the instance was placed there
            "h1": [issued("h1", i) for i in (x, y, ok)] + [issued("h1", v, model="other")],
            "h3": [issued("h3", u)],
        }
        for entries in keys.values():
            for k in entries:
                await bus.instance_keys.put(
                    proto.instance_key(k.host, k.instance_id), proto.encode(k)
                )
        ok_key = keys["h1"][2].key
        await asyncio.sleep(0.5)  # the keys are seen first, as a placement's are

        async def put(who: Bus, key: str, rec: InstanceRecord) -> None:
            # made now: the placer would stop a replica idle since long ago
            now = time.time()
            rec = msgspec.structs.replace(rec, created=now, updated=now, ready_at=now)
            await who.instances.put(key, proto.encode(rec))

        at = f"http://127.0.0.1:{in_h1[0].port}"
        forged = {
            # body names h1 (whose key vouches for x) under h2's key: without the key check the
            # gateway would take it for h1's instance x
            f"h2.{x}": (a2, ready(at, "h1", x), "not of its key"),
            # h1's own key, but another instance's id (y's, vouched for)
            f"h1.{z}": (a1, ready(at, "h1", y), "not of its key"),
            # never placed: no key issued
            f"h1.{w}": (a1, ready(at, "h1", w), "no placement vouches"),
            # placed, but as another model
            f"h1.{v}": (a1, ready(at, "h1", v), "placed as other"),
            # placed on h3, at the address h3 advertises, which the config does not allow
            f"h3.{u}": (
                a3,
                ready(f"http://127.0.0.3:{r3.port}", "h3", u),
                "not an address the config allows",
            ),
            # another host's claim to h1's instance `ok`, at an address h2 may use
            f"h2.{ok}": (
                a2,
                ready(f"http://127.0.0.1:{r2.port}", "h2", ok),
                "another host's claim",
            ),
        }
        for key, (who, rec, _why) in forged.items():
            await put(who, key, rec)
        await put(a1, f"h1.{ok}", ready(f"http://127.0.0.1:{in_h1[1].port}", "h1", ok))

        client_headers = {
            "Authorization": f"Bearer {CLIENT_KEY}",
            "x-api-key": CLIENT_KEY,
            "Cookie": f"session={CLIENT_KEY}",
            "x-custom": "client-only",
        }
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        async with httpx.AsyncClient(timeout=30) as c:
            async with asyncio.timeout(20):
                while not in_h1[1].requests:  # the gateway's view follows the buckets
                    await c.post(
                        f"{stack.base}/v1/chat/completions", json=body, headers=client_headers
                    )
                    await asyncio.sleep(0.1)
            for _ in range(10):  # round robin: a trusted forgery would get some of these
                r = await c.post(
                    f"{stack.base}/v1/chat/completions", json=body, headers=client_headers
                )
                assert r.status_code == 200, r.text
        # Only the placed instance got traffic, with its own key and none of the client's.
        assert len(in_h1[1].requests) >= 11
        assert in_h1[0].requests == [] and r2.requests == [] and r3.requests == []
        assert {s["authorization"] for s in in_h1[1].requests} == {f"Bearer {ok_key}"}
        assert not {"x-api-key", "cookie", "x-custom"} & set(in_h1[1].requests[0])
        assert CLIENT_KEY not in json.dumps(in_h1[1].requests)

        # Each forgery is reported by the gateway, once, with why.
        async def reported() -> bool:
            return all(refusals.by("gateway", key) for key in forged)

        await eventually(reported, 10, "the gateway to report every forged record")
        for key, (_who, _rec, why) in forged.items():
            [event] = refusals.by("gateway", key)
            assert event.bucket == proto.KV_INSTANCES and why in event.reason, (key, event)
        assert f"ignoring {proto.KV_INSTANCES} record h2.{x}" in stack.logs()
        # The placer ignores what does not match its key as well (its view is keyed by id).
        assert refusals.by("placer", f"h2.{x}") and refusals.by("placer", f"h1.{z}")
        # Written again, still one report each (a forger cannot flood the log).
        for key, (who, rec, _why) in forged.items():
            await put(who, key, rec)
        await asyncio.sleep(1.0)
        assert all(len(refusals.by("gateway", key)) == 1 for key in forged)
        assert in_h1[0].requests == [] and r2.requests == [] and r3.requests == []
    finally:
        beating.cancel()
        await sub.unsubscribe()
        stack.stop()


async def test_a_forged_ready_record_does_not_keep_its_model_from_being_placed(
    tmp_path: Path,
    nats_url: str,
    bus: Bus,
    as_user: Callable[[str], Awaitable[Bus]],  # noqa: F811
    llama_server_bin: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    """A host writes a READY record of its own for a model nobody placed there: no key
    vouches for it, so the placer does not count it and places the model for real."""
    stack = Stack(tmp_path, nats_url, {"tiny": {"url": f"file://{tiny_gguf(3)}", "ctx_size": 256}})
    stack.start()
    try:
        a1 = await as_user("agent-h1")
        iid = new_iid("tiny")
        now = time.time()
        forged = msgspec.structs.replace(ready("http://127.0.0.1:1", "h1", iid, now), model="tiny")
        await a1.instances.put(proto.instance_key("h1", iid), proto.encode(forged))
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{stack.base}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        recs = await kv_snapshot(bus, bus.instances, InstanceRecord)
        served = [
            r for r in recs.values() if r.instance_id != iid and r.state == InstanceState.READY
        ]
        assert [r.model for r in served] == ["tiny"]
        assert await instance_key.read(bus, "h1", served[0].instance_id) is not None
    finally:
        stack.stop()
