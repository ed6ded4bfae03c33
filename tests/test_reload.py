"""Live configuration: SIGHUP / `lls reload` re-reads the config on every service.

The decision (services/placer/reload.py) is tested directly; the rest on the real stack
(lls.run, NATS, placer, agent, downloader, llama-server, gateway)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

import proto
from conftest import ROOT
from lls.aio import wait_event
from lls.config import ModelConfig, launch_fingerprint, load, parse, store_filename
from lls.service import apply_live
from proto import InstanceRecord, InstanceState
from services.placer.reload import plan
from stack import Stack, llama_server_pids

# ---------------------------------------------------------------- the pure decision

M = ModelConfig(url="file:///m.gguf", ctx_size=1024)
M2 = ModelConfig(url="file:///m.gguf", ctx_size=2048)


def rec(iid: str, state: InstanceState, model: str = "m", fp: str = "", **kw) -> InstanceRecord:  # noqa: ANN003
    return InstanceRecord(
        instance_id=iid, model=model, state=state, created=0, updated=0, config_fp=fp, **kw
    )


def test_unchanged_and_unknown_records_are_left_alone() -> None:
    current = rec("a", InstanceState.READY, fp=launch_fingerprint(M))
    older = rec("b", InstanceState.READY, fp="")  # before reloads existed: unknown
    assert plan({"m": M}, [current, older]) == plan({"m": M}, [])


def test_a_removed_model_is_retired_when_serving_and_stopped_when_not() -> None:
    todo = plan(
        {},
        [
            rec("a", InstanceState.READY, fp="x"),
            rec("b", InstanceState.STARTING, fp="x"),
            rec("c", InstanceState.READY),  # no fingerprint: removed all the same
            rec("d", InstanceState.STOPPED),
        ],
    )
    assert [i for i, _ in todo.retire] == ["a", "c"]
    assert [i for i, _ in todo.stop] == ["b"]
    assert todo.replace == []
    assert "removed from the config" in todo.retire[0][1]


def test_a_changed_model_is_replaced_before_its_stale_instance_goes() -> None:
    old_fp, new_fp = launch_fingerprint(M), launch_fingerprint(M2)
    assert old_fp != new_fp
    stale = rec("a", InstanceState.READY, fp=old_fp)
    # 1. nothing current yet: place one beside it
    assert plan({"m": M2}, [stale]).replace == ["m"]
    # 2. the new one is on its way: wait (no second replacement, the stale one serves)
    starting = rec("b", InstanceState.STARTING, fp=new_fp)
    todo = plan({"m": M2}, [stale, starting])
    assert (todo.replace, todo.retire, todo.stop) == ([], [], [])
    # 3. the new one is ready: the stale one drains, then stops
    ready = rec("b", InstanceState.READY, fp=new_fp)
    assert [i for i, _ in plan({"m": M2}, [stale, ready]).retire] == ["a"]
    # a stale one that is not serving yet just stops; demand places a current one
    assert [i for i, _ in plan({"m": M2}, [rec("c", InstanceState.PENDING, fp=old_fp)]).stop] == [
        "c"
    ]


def test_swaps_and_retirements_under_way_are_left_to_themselves() -> None:
    yielding = rec("a", InstanceState.DRAINING, fp="old", drain_for="other")
    retiring = rec("b", InstanceState.DRAINING, fp="old")
    todo = plan({"m": M2}, [yielding, retiring])
    assert (todo.replace, todo.retire, todo.stop) == ([], [], [])


def test_only_launch_keys_change_the_fingerprint() -> None:
    base = launch_fingerprint(M)
    for changed in (
        ModelConfig(url="file:///other.gguf", ctx_size=1024),
        ModelConfig(url=M.url, ctx_size=1024, args=["--seed", "1"]),
        ModelConfig(url=M.url, ctx_size=1024, embeddings=True),
        ModelConfig(url=M.url, ctx_size=1024, sha256="a" * 64),
    ):
        assert launch_fingerprint(changed) != base
    for same in (
        ModelConfig(url=M.url, ctx_size=1024, aliases=["x"], defaults={"temperature": 0}),
        ModelConfig(url=M.url, ctx_size=1024, idle_timeout=5, keep_loaded=True, preload=True),
    ):
        assert launch_fingerprint(same) == base


def test_apply_live_swaps_live_sections_and_names_the_rest() -> None:
    cfg = parse({"models": {"a": {"url": "file:///a.gguf"}}})
    new = parse(
        {
            "models": {"b": {"url": "file:///b.gguf"}},
            "gateway": {"port": 5555, "max_in_flight": 3},
            "agent": {"heartbeat_s": 2},
        }
    )
    same = cfg  # holders of the object see the change
    assert apply_live(cfg, new) == ["agent", "gateway.port"]
    assert list(same.models) == ["b"] and same.gateway.max_in_flight == 3
    assert same.agent.heartbeat_s == 1.0  # the running agent section stays


# ---------------------------------------------------------------- on the real stack


def chat(model: str) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "ignore_eos": True,
    }


def write_models(s: Stack, models: dict) -> None:
    cfg = yaml.safe_load(s.config.read_text())
    cfg["models"] = models
    s.config.write_text(yaml.safe_dump(cfg))


def lls_reload(s: Stack) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lls.cli", "--config", str(s.config), "reload"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def records(nats_url: str, model: str) -> list[InstanceRecord]:
    from lls.bus import connect, kv_snapshot

    bus = await connect(nats_url, "test")
    try:
        recs = await kv_snapshot(bus, bus.instances, InstanceRecord)
    finally:
        await bus.close()
    return [r for r in recs.values() if r.model == model]


def wait_for(what: str, check, timeout: float, s: Stack):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s:\n{s.logs()[-5000:]}")


def running_files(s: Stack) -> dict[str, list[str]]:
    """Store file (its -m) -> the -c of each llama-server running it."""
    out: dict[str, list[str]] = {}
    for pid in llama_server_pids(str(s.tmp)):
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        name = Path(argv[argv.index("-m") + 1]).name
        out.setdefault(name, []).append(argv[argv.index("-c") + 1])
    return out


def ctx_sizes(s: Stack, model: str) -> list[str]:
    """The -c of each llama-server running `model`'s store file (as the config says now)."""
    return running_files(s).get(s.stored(model), [])


async def reload_under_load(
    s: Stack, nats_url: str, models: dict, old: InstanceRecord
) -> tuple[list[int], list[proto.Event]]:
    """Write `models` and `lls reload` while a client sends a steady stream of requests to
    old.model; return once `old` is stopped and another instance is ready: the statuses the
    client got, and the events meanwhile (in order)."""
    from lls.bus import connect

    statuses: list[int] = []
    events: list[proto.Event] = []

    async def steady(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            while not stop.is_set():
                r = await c.post(f"{s.base}/v1/chat/completions", json=chat(old.model))
                statuses.append(r.status_code)
                await asyncio.sleep(0.02)

    async def on_event(msg) -> None:  # noqa: ANN001
        events.append(proto.decode(msg.data, proto.Event))

    bus = await connect(nats_url, "test")
    sub = await bus.nc.subscribe("lls.evt.>", cb=on_event)
    stop = asyncio.Event()
    task = asyncio.create_task(steady(stop))
    try:
        await asyncio.sleep(1)
        write_models(s, models)
        out = await asyncio.to_thread(lls_reload, s)
        assert out.returncode == 0, out.stderr
        # the new instance comes up, then the old one drains and stops
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            recs = await records(nats_url, old.model)
            ready = [r for r in recs if r.state == InstanceState.READY]
            gone = next(r for r in recs if r.instance_id == old.instance_id)
            if gone.state == InstanceState.STOPPED and ready:
                break
            await asyncio.sleep(0.3)
        else:
            raise AssertionError(f"{old.model} was not replaced:\n{s.logs()[-5000:]}")
        await asyncio.sleep(1)
    finally:
        stop.set()
        await task
        await sub.unsubscribe()
        await bus.close()
    return statuses, events


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {
        "a": {"url": f"file://{tiny_gguf(31)}", "ctx_size": 512},
        "gone": {
            "url": f"file://{tiny_gguf(32)}",
            "ctx_size": 512,
            "args": ["-np", "1", "--context-shift"],
        },
    }
    s = Stack(tmp_path, nats_url, models, agent__gpus=[{"name": "sim", "memory_mib": 8192}])
    s.start()
    yield s
    s.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running after stop"


def test_reload_adds_changes_and_removes_models_without_failing_requests(
    stack: Stack, nats_url: str, tiny_gguf
) -> None:
    s = stack
    base = s.base
    with httpx.Client(timeout=60) as c:
        assert c.post(f"{base}/v1/chat/completions", json=chat("a")).status_code == 200
        assert c.post(f"{base}/v1/chat/completions", json=chat("gone")).status_code == 200
        assert c.post(f"{base}/v1/chat/completions", json=chat("new")).status_code == 404

    (old_a,) = [r for r in asyncio.run(records(nats_url, "a")) if r.state == InstanceState.READY]
    assert ctx_sizes(s, "a") == ["512"]

    # (1) a new model, (2) a's ctx_size changed, (3) "gone" removed: all in one reload,
    # while a client sends a steady stream of requests to a
    models = {
        "a": {"url": f"file://{tiny_gguf(31)}", "ctx_size": 768},
        "new": {"url": f"file://{tiny_gguf(33)}", "ctx_size": 512},
    }
    statuses, _ = asyncio.run(reload_under_load(s, nats_url, models, old_a))
    assert statuses and set(statuses) == {200}, statuses
    (new_a,) = [r for r in asyncio.run(records(nats_url, "a")) if r.state == InstanceState.READY]
    assert new_a.config_fp == launch_fingerprint(load(s.config).models["a"])
    assert ctx_sizes(s, "a") == ["768"]  # the new one, and the old one is gone

    with httpx.Client(timeout=60) as c:
        assert c.post(f"{base}/v1/chat/completions", json=chat("new")).status_code == 200
        r = c.post(f"{base}/v1/chat/completions", json=chat("gone"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        names = {m["id"] for m in c.get(f"{base}/v1/models").json()["data"]}
        assert names == {"a", "new"}
    wait_for(
        "gone's instance stopped",
        lambda: all(r.state in proto.END_STATES for r in asyncio.run(records(nats_url, "gone"))),
        30,
        s,
    )
    assert "config reloaded" in s.logs()


def test_a_changed_url_is_a_new_file_downloaded_then_started_without_failing_requests(
    stack: Stack, nats_url: str, tiny_gguf
) -> None:
    """The store name follows the source: another url is another file, which the placer has
    downloaded before it starts the replacement; the old file stays (nothing deletes a file
    an instance may still run from) but is no longer any model's."""
    s = stack
    old_file = s.stored("a")
    with httpx.Client(timeout=60) as c:
        assert c.post(f"{s.base}/v1/chat/completions", json=chat("a")).status_code == 200
    (old_a,) = [r for r in asyncio.run(records(nats_url, "a")) if r.state == InstanceState.READY]
    assert running_files(s) == {old_file: ["512"]}

    models = yaml.safe_load(s.config.read_text())["models"]
    models["a"]["url"] = f"file://{tiny_gguf(34)}"  # another model file, same flags
    statuses, events = asyncio.run(reload_under_load(s, nats_url, models, old_a))
    assert statuses and set(statuses) == {200}, statuses

    new_file = s.stored("a")
    assert new_file == store_filename("a", models["a"]["url"]) != old_file
    (new_a,) = [r for r in asyncio.run(records(nats_url, "a")) if r.state == InstanceState.READY]
    assert new_a.config_fp == launch_fingerprint(load(s.config).models["a"])
    assert running_files(s) == {new_file: ["512"]}  # the new file; the old server is gone

    # placed, then the new file downloaded to its host, and only then started
    def at(match) -> int:  # noqa: ANN001
        return next(i for i, e in enumerate(events) if match(e))

    def state_of(e: proto.Event, state: InstanceState) -> bool:
        return isinstance(e, proto.InstanceChanged) and (e.instance_id, e.state) == (
            new_a.instance_id,
            state,
        )

    downloading = at(lambda e: state_of(e, InstanceState.DOWNLOADING))
    downloaded = at(
        lambda e: (
            isinstance(e, proto.DownloadCompleted)
            and (e.model, e.filename, e.host) == ("a", new_file, new_a.host)
        )
    )
    starting = at(lambda e: state_of(e, InstanceState.STARTING))
    assert downloading < downloaded < starting, events
    assert (s.tmp / "store" / old_file).read_bytes() == tiny_gguf(31).read_bytes()
    assert (s.tmp / "store" / new_file).read_bytes() == tiny_gguf(34).read_bytes()

    async def host_files() -> dict[str, str]:
        from lls.bus import connect

        bus = await connect(nats_url, "test")
        try:
            host = proto.decode((await bus.hosts.get("h1")).value, proto.HostRecord)
        finally:
            await bus.close()
        return {f.filename: f.model for f in host.files}

    # the heartbeat names the configured model a file holds; the old one only by its name
    files = wait_for("both files in h1's heartbeat", lambda: asyncio.run(host_files()), 10, s)
    assert files == {new_file: "a", old_file: old_file.removesuffix(".gguf")}


def test_removed_model_finishes_its_in_flight_request(stack: Stack, nats_url: str) -> None:
    s = stack
    # --context-shift: it generates for as long as the stream is read
    body = {**chat("gone"), "max_tokens": 1_000_000, "stream": True}

    async def scenario() -> tuple[int, list[str]]:
        states: list[str] = []
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", f"{s.base}/v1/chat/completions", json=body) as r:
                chunks = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunks += 1
                    if chunks == 10:
                        cfg = yaml.safe_load(s.config.read_text())
                        del cfg["models"]["gone"]
                        s.config.write_text(yaml.safe_dump(cfg))
                        os.kill(s.proc.pid, signal.SIGHUP)  # what `lls reload` sends
                        for _ in range(100):  # it drains: admits nothing new, still streams
                            states = [x.state for x in await records(nats_url, "gone")]
                            if InstanceState.DRAINING in states:
                                break
                            await asyncio.sleep(0.1)
                        new = await c.post(f"{s.base}/v1/chat/completions", json=chat("gone"))
                        assert new.status_code == 404
                    if chunks == 200:
                        break  # the client is done: the drain ends, the instance stops
                return r.status_code, states

    status, states = asyncio.run(scenario())
    assert status == 200 and states == [InstanceState.DRAINING]
    wait_for(
        "gone's instance stopped",
        lambda: all(r.state in proto.END_STATES for r in asyncio.run(records(nats_url, "gone"))),
        30,
        s,
    )


SERVICES = ("gateway", "placer", "agent", "downloader", "ui")


def wait_all_started(s: Stack) -> None:
    """Every service has loaded the config (the gateway answering is not enough: the others
    may still be importing, and would read a file edited after start)."""
    wait_for(
        "every service started",
        lambda: all(f"{name} started (host" in s.logs() for name in SERVICES),
        30,
        s,
    )


def service_pid(s: Stack, name: str) -> int:
    """The pid of this stack's `services.<name>` process (its command line names our config)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"services.{name}".encode() in argv and str(s.config).encode() in argv:
            return int(proc.name)
    raise AssertionError(f"no {name} process for {s.config}")


def test_bad_config_is_refused_naming_the_key_and_the_old_one_serves(
    stack: Stack, nats_url: str
) -> None:
    s = stack
    wait_all_started(s)
    good = s.config.read_text()
    cfg = yaml.safe_load(good)
    cfg["gateway"]["max_in_flight"] = -1
    del cfg["models"]["a"]
    s.config.write_text(yaml.safe_dump(cfg))

    out = lls_reload(s)  # the CLI checks the file first
    assert out.returncode != 0 and "gateway.max_in_flight" in out.stderr

    async def refusals() -> list[proto.ConfigRefused]:
        from lls.bus import connect

        bus = await connect(nats_url, "test")
        got: list[proto.ConfigRefused] = []
        all_five = asyncio.Event()

        async def on(msg) -> None:  # noqa: ANN001
            got.append(proto.decode(msg.data, proto.ConfigRefused))
            if len({e.service for e in got}) == 5:
                all_five.set()

        sub = await bus.nc.subscribe(proto.evt("config.refused"), cb=on)
        try:
            os.kill(s.proc.pid, signal.SIGHUP)  # the services check it themselves too
            await wait_event(all_five, 15)
        finally:
            await sub.unsubscribe()
            await bus.close()
        return got

    got = asyncio.run(refusals())
    assert {e.service for e in got} == set(SERVICES)
    assert all("gateway.max_in_flight" in e.reason for e in got)
    assert "config reload refused" in s.logs() and "gateway.max_in_flight" in s.logs()
    with httpx.Client(timeout=60) as c:  # the running config still serves a
        assert c.post(f"{s.base}/v1/chat/completions", json=chat("a")).status_code == 200


def test_a_service_that_cannot_start_on_an_edited_config_waits_and_the_rest_serve(
    stack: Stack,
) -> None:
    # The ui dies (a crash, an OOM kill) after the file was edited into a bad state: it
    # cannot come back on that file, but that must not take the other services down.
    s = stack
    wait_all_started(s)
    good = s.config.read_text()
    cfg = yaml.safe_load(good)
    cfg["gateway"]["max_in_flight"] = -1
    s.config.write_text(yaml.safe_dump(cfg))
    os.kill(service_pid(s, "ui"), signal.SIGKILL)
    wait_for("the ui held", lambda: "ui cannot start on the config file" in s.logs(), 15, s)
    time.sleep(2)  # no restart loop, no "stopping everything"
    assert s.proc.poll() is None and "keeps dying" not in s.logs()
    with httpx.Client(timeout=60) as c:
        assert c.post(f"{s.base}/v1/chat/completions", json=chat("a")).status_code == 200

    s.config.write_text(good)  # fixed: a reload starts it again
    assert lls_reload(s).returncode == 0
    wait_for("the ui back", lambda: s.logs().count("ui started (host") == 2, 30, s)

    def dashboard() -> httpx.Response:
        return httpx.get(f"{s.base}/dashboard", params={"key": "unused"}, timeout=10)

    # "started" is logged before the ui listens (it replays the event stream first)
    wait_for("the ui listening", lambda: dashboard().status_code != 502, 15, s)
    r = dashboard()
    assert r.status_code == 200, r.text  # proxied to a live ui again
