"""Warm swaps on the real stack (NATS, placer, agent with the process runtime, llama-server
with a tiny GGUF, gateway): a conversation's KV cache is saved when its model stops and
restored when the model starts again, so the next turn evaluates only what is new."""

from __future__ import annotations

import asyncio
import os
import random
import re
import uuid
from pathlib import Path

import httpx
import msgspec
import pytest
from test_agent import (
    ADOPTED,
    agent_config,
    agents,  # noqa: F401 - the fixture
    key_for,
    last_event,
    new_iid,
    place,
    put_model,
    start_cmd,
    unique_host,
    wait_state,
)

import proto
from lls.bus import Bus, connect, kv_snapshot, new_id
from lls.config import parse
from services.agent import slot_cache
from stack import Stack, llama_server_pids

# The tiny model's vocabulary is mostly single bytes: ~1.3 tokens a character here, so ~1,900
# tokens. Its trained context (2048) caps a slot's context whatever -c says.
PROMPT_CHARS = 1500
WAIT_S = 60  # generous: two cores are shared with the whole stack (and other tests)


def long_prompt(seed: int = 1) -> str:
    """Words of random letters, PROMPT_CHARS long: each seed another conversation."""
    rng = random.Random(seed)
    text = ""
    while len(text) < PROMPT_CHARS:
        text += "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) + " "
    return text


def tiny(tiny_gguf, **extra: object) -> dict:  # noqa: ANN001
    return {"tiny": {"url": f"file://{tiny_gguf(1)}", "ctx_size": 4096, **extra}}


class Events:
    """SlotCacheChanged events as they come (core NATS: a JetStream publish reaches it too)."""

    def __init__(self) -> None:
        self.seen: list[proto.SlotCacheChanged] = []
        self.bus: Bus | None = None
        self.arrived = asyncio.Event()

    async def start(self, nats_url: str) -> None:
        self.bus = await connect(nats_url, "test-warm-swap")

        async def on_msg(msg) -> None:  # noqa: ANN001
            try:
                ev = proto.decode(msg.data, proto.Event)
            except msgspec.ValidationError:
                return
            if isinstance(ev, proto.SlotCacheChanged):
                self.seen.append(ev)
                self.arrived.set()

        await self.bus.nc.subscribe("lls.evt.slots.>", cb=on_msg)

    async def wait(self, stage: str, count: int = 1) -> proto.SlotCacheChanged:
        async with asyncio.timeout(WAIT_S):
            while len(got := [e for e in self.seen if e.stage == stage]) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return got[count - 1]

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()


async def turn(c: httpx.AsyncClient, base: str, prompt: str) -> dict:
    """One completion; llama-server's timings (prompt_n: tokens actually evaluated)."""
    r = await c.post(
        f"{base}/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    timings = r.json().get("timings")
    assert timings and "prompt_n" in timings, f"no llama-server timings in {r.json()}"
    return timings


async def stop_model(bus: Bus, model: str = "tiny") -> None:
    """`lls stop`, then wait until no instance of the model is live."""
    await bus.emit(proto.StopRequested(model=model, requested_by="test"))
    live = proto.LIVE_STATES | {proto.InstanceState.STOPPING}
    async with asyncio.timeout(WAIT_S):
        while True:
            recs = [
                r
                for r in (await kv_snapshot(bus, bus.instances, proto.InstanceRecord)).values()
                if r.model == model
            ]
            # positive evidence (a stopped record), not just no live one: a snapshot that
            # came back empty would otherwise end the wait before the stop began
            ended = [r for r in recs if r.state in proto.END_STATES]
            if ended and not [r for r in recs if r.state in live]:
                return
            await asyncio.sleep(0.1)


def cache_files(tmp_path: Path, host: str = "h1") -> list[slot_cache.CachedFile]:
    return slot_cache.scan(tmp_path / "store" / "slot-cache" / host)


async def saved_files(tmp_path: Path, within: float = 10.0) -> list[slot_cache.CachedFile]:
    """The cache's files once there are any (the save comes with the stop), within a deadline."""
    async with asyncio.timeout(within):
        while True:  # a folder, not an event, to watch
            if files := cache_files(tmp_path):
                return files
            await asyncio.sleep(0.1)


@pytest.fixture
async def events(nats_url):  # noqa: ANN001
    ev = Events()
    await ev.start(nats_url)
    yield ev
    await ev.close()


async def conversation_across_a_stop(stack: Stack, events: Events) -> tuple[dict, dict]:
    """The first turn's timings, and the next turn's after the model stopped and came back."""
    prompt = long_prompt()
    async with httpx.AsyncClient(timeout=WAIT_S) as c:
        first = await turn(c, stack.base, prompt)
        assert events.bus is not None
        await stop_model(events.bus)
        again = await turn(c, stack.base, prompt + "and then some more")
    return first, again


async def test_a_returning_conversation_is_restored_and_evaluates_only_the_new_part(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, events
):
    s = Stack(tmp_path, nats_url, tiny(tiny_gguf))
    s.start()
    try:
        first, again = await conversation_across_a_stop(s, events)
        saved = await events.wait("saved")
        restored = await events.wait("restored")
        kept = cache_files(tmp_path)
    finally:
        s.stop()
    assert first["prompt_n"] > 1000, first  # the first turn paid the whole prefill
    assert saved.model == "tiny" and saved.host == "h1" and saved.slots == 1
    assert saved.tokens >= first["prompt_n"] and saved.bytes > 0
    assert restored.tokens == saved.tokens and restored.instance_id != saved.instance_id
    assert again["prompt_n"] < 50, again  # only the addition (and a token or two) evaluated
    assert again.get("cache_n", 0) >= first["prompt_n"] - 10
    assert not [e for e in events.seen if e.stage == "failed"]
    assert [f.size for f in kept] == [saved.bytes]  # kept after the restore
    # the agent's own shutdown saved the longer conversation over it
    [last] = cache_files(tmp_path)
    assert last.name == kept[0].name and last.size > saved.bytes
    assert "--slot-save-path" in s.logs()
    assert llama_server_pids(str(tmp_path)) == []


async def test_with_the_cache_off_the_whole_prompt_is_evaluated_again(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, events
):
    s = Stack(tmp_path, nats_url, tiny(tiny_gguf), agent__slot_cache_mib=0)
    s.start()
    try:
        first, again = await conversation_across_a_stop(s, events)
    finally:
        s.stop()
    assert again["prompt_n"] >= first["prompt_n"], (first, again)
    assert events.seen == [] and cache_files(tmp_path) == []
    assert "--slot-save-path" not in s.logs()


async def test_a_save_from_another_context_size_is_never_restored_and_the_folder_stays_bounded(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, events
):
    # Two slots, each ~1 MiB once it holds the conversation: more than the 1 MiB limit.
    models = tiny(tiny_gguf, args=["-np", "2"])
    s = Stack(tmp_path, nats_url, models, agent__slot_cache_mib=1)
    s.start()
    try:
        async with httpx.AsyncClient(timeout=WAIT_S) as c:
            await asyncio.gather(turn(c, s.base, long_prompt(1)), turn(c, s.base, long_prompt(2)))
            assert events.bus is not None
            await stop_model(events.bus)
        saved = await events.wait("saved")
    finally:
        s.stop()
    assert saved.slots == 2 and saved.bytes > 1024 * 1024
    files = cache_files(tmp_path)
    assert len(files) == 1 and sum(f.size for f in files) <= 1024 * 1024, files
    before = files[0]

    # The same model with another context size: same file, same slots, another launch.
    s.patch_config(models={"tiny": {**models["tiny"], "ctx_size": 4000}})
    s.start()
    try:
        async with httpx.AsyncClient(timeout=WAIT_S) as c:
            again = await turn(c, s.base, long_prompt(1) + long_prompt(2)[:10])
    finally:
        s.stop()
    assert again["prompt_n"] > 1000, again  # cold: nothing was restored
    await events.wait("saved", 2)
    assert [e.stage for e in events.seen] == ["saved", "saved"]  # no restore tried
    [after] = cache_files(tmp_path)  # the new launch's save; the older one went to make room
    assert slot_cache.parse(after.name)[0] != slot_cache.parse(before.name)[0]  # type: ignore[index]


async def test_docker_instances_save_and_restore_through_their_mounted_folder(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, docker_client, events
):
    host = f"dock-{uuid.uuid4().hex[:6]}"
    s = Stack(tmp_path, nats_url, tiny(tiny_gguf), agent__runtime="docker", agent__host_id=host)
    s.start()
    try:
        first, again = await conversation_across_a_stop(s, events)
        saved = await events.wait("saved")
        restored = await events.wait("restored")
    finally:
        s.stop()
        left = docker_client.containers.list(all=True, filters={"label": f"lls.host={host}"})
        for c in left:
            c.remove(force=True)
    assert first["prompt_n"] > 1000 and again["prompt_n"] < 50, (first, again)
    assert restored.tokens == saved.tokens > 1000
    [f] = cache_files(tmp_path, host)  # written by the container as the agent's own user
    st = (tmp_path / "store" / "slot-cache" / host / f.name).stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


async def test_a_failed_restore_leaves_the_model_cold_and_a_failed_save_never_blocks_the_stop(
    tmp_path, nats_url, llama_server_bin, tiny_gguf, events
):
    s = Stack(tmp_path, nats_url, tiny(tiny_gguf))
    s.start()
    folder = tmp_path / "store" / "slot-cache" / "h1"
    try:
        async with httpx.AsyncClient(timeout=WAIT_S) as c:
            prompt = long_prompt()
            await turn(c, s.base, prompt)
            assert events.bus is not None
            await stop_model(events.bus)
            [saved_file] = await saved_files(tmp_path)
            (folder / saved_file.name).write_bytes(b"\x00garbage" * 1000)  # corrupt it
            again = await turn(c, s.base, prompt + "and more")  # served, cold
            failed = await events.wait("failed")
            assert cache_files(tmp_path) == []  # a file the server refused is dropped

            folder.rename(tmp_path / "elsewhere")  # nowhere to save: llama-server's save fails
            folder.write_text("not a folder")
            await stop_model(events.bus)  # still stops, promptly
            save_failed = await events.wait("failed", 2)
    finally:
        s.stop()
    assert again["prompt_n"] > 1000, again
    assert re.search(r"slot \d: HTTP 4", failed.reason) and failed.slots == 0, failed.reason
    assert save_failed.slots == 0 and "not saved" in save_failed.reason, save_failed
    assert not [e for e in events.seen if e.stage == "restored"]


async def test_a_server_that_never_answers_costs_a_save_or_restore_its_deadline_only(
    tmp_path, monkeypatch
):
    """A hung llama-server (a real socket that accepts and never answers): the save gives up
    at its deadline with a `failed` event, and so does the restore; neither raises."""
    from lls.config import parse
    from lls.service import ServiceContext
    from services.agent import service, slot_calls
    from services.agent.instance import Instance
    from services.agent.runtime import Handle
    from services.agent.runtime_choice import choose_runtime
    from services.agent.store import Store
    from services.agent.telemetry import Telemetry

    hung: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hung.append(w)  # read nothing, answer nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = parse(
        {
            "agent": {"runtime": "process", "store": str(tmp_path / "store"), "gpus": []},
            "models": tiny(lambda _: tmp_path / "m.gguf"),
        }
    )
    ctx = ServiceContext(name="agent", cfg=cfg, bus=None, host_id="h1")  # type: ignore[arg-type]
    telemetry = Telemetry("h1", [])
    runtime = choose_runtime(cfg.agent, "h1", tmp_path / "store", telemetry, "c1")
    agent = service.Agent(ctx, runtime, telemetry, Store(tmp_path / "store"))
    inst = Instance(
        "tiny-0123abcd",
        "tiny",
        (),
        0,
        handle=Handle("tiny-0123abcd", "tiny", port),
        api_key="k" * 43,
    )
    inst.slot_key = slot_cache.cache_key("tiny-1.gguf", "fp", runtime.program, 0)
    agent.slots.slot_dir.mkdir(parents=True)
    (agent.slots.slot_dir / slot_cache.slot_file(inst.slot_key, 0)).write_bytes(b"x")
    monkeypatch.setattr(slot_calls, "SLOT_RESTORE_S", 1.5)
    try:
        t0 = asyncio.get_running_loop().time()
        saved = await agent.slots.save(inst, 1.5, "idle")
        took = asyncio.get_running_loop().time() - t0
        assert saved is not None and saved.stage == "failed" and "deadline" in saved.reason
        assert 1.4 < took < 5, took
        t0 = asyncio.get_running_loop().time()
        restored = await agent.slots.restore(inst)
        took = asyncio.get_running_loop().time() - t0
        assert restored is not None and restored.stage == "failed", restored
        assert "deadline" in restored.reason and 1.4 < took < 5, (restored, took)
    finally:
        for w in hung:
            w.close()
        server.close()
        await agent._close()


async def test_an_instance_adopted_after_an_agent_restart_still_saves_when_it_stops(
    agents,  # noqa: F811
    bus,
    tmp_path,
    tiny_gguf,
):
    host = unique_host()
    filename = put_model(tmp_path, tiny_gguf(1), "tiny")
    first = await agents.start(parse(agent_config(tmp_path, host)), host)
    iid = new_iid()
    await place(bus, host, start_cmd(iid, filename))
    rec = await wait_state(bus, iid, proto.InstanceState.READY, within=WAIT_S)
    async with httpx.AsyncClient(timeout=WAIT_S) as c:
        r = await c.post(
            f"{rec.endpoint}/v1/completions",
            json={"model": "tiny", "prompt": long_prompt()[:300], "max_tokens": 2},
            headers={"Authorization": f"Bearer {key_for(iid)}"},
        )
        assert r.status_code == 200, r.text
    await first.crash()  # no stop: the server runs on for the next agent
    await agents.start(parse(agent_config(tmp_path, host)), host)
    await wait_state(bus, iid, proto.InstanceState.READY, reason=ADOPTED, within=WAIT_S)
    await bus.command(proto.cmd_agent(host), proto.StopInstance(cmd_id=new_id(), instance_id=iid))
    await wait_state(bus, iid, proto.InstanceState.STOPPED, within=WAIT_S)
    saved = await last_event(bus, proto.evt("slots.saved"))
    assert saved.instance_id == iid and saved.tokens > 250, saved
    [f] = cache_files(tmp_path, host)
    assert f.size == saved.bytes
