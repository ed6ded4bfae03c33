"""Ollama's /api/pull and /api/delete: the official client on a real stack (a throttled HTTP
source, so progress arrives over time), the downloader's checks on forged DeleteFile commands,
and the bus permissions that keep the gateway from commanding downloaders itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import ollama
import pytest
from test_bus_auth import as_user, pending, refused  # noqa: F401 - as_user is a fixture

import proto
from lls.bus import Bus, connect, kv_snapshot
from lls.config import parse, store_filename
from lls.service import ServiceContext
from services.downloader.devserver import Behaviour, FileServer
from services.downloader.service import run as run_downloader
from stack import Stack

KEY = "scoped-key-123456"  # may use `slow` and `local` only
ADMIN = "admin-key-123456"


@pytest.fixture
def no_local_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reuse finds nothing in the developer's own Ollama or HF caches (the stack inherits)."""
    monkeypatch.setenv("LLS_OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf"))


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf, no_local_stores):  # noqa: ANN001
    """`slow` comes over HTTP at ~150 kB/s (~3 s for its 0.5 MB), `local` from a file."""
    data = tiny_gguf(6).read_bytes()
    with FileServer({"/slow.gguf": data}, Behaviour(rate_bps=150e3)) as srv:
        models = {
            "slow": {"url": srv.url("slow.gguf"), "ctx_size": 512},
            "local": {"url": f"file://{tiny_gguf(7)}", "ctx_size": 512},
            "other": {"url": f"file://{tiny_gguf(8)}", "ctx_size": 512},
        }
        s = Stack(tmp_path, nats_url, models, downloader={"connections": 1})
        s.patch_config(
            gateway={
                "api_keys": [
                    {"key": KEY, "models": ["slow", "local"]},
                    {"key": ADMIN, "admin": True},
                ]
            }
        )
        s.start()
        s.data = data  # type: ignore[attr-defined]
        yield s
        s.stop()


def client(stack: Stack, key: str = ADMIN) -> ollama.Client:
    return ollama.Client(host=stack.base, headers={"Authorization": f"Bearer {key}"})


def store(stack: Stack) -> Path:
    return stack.tmp / "store"


def host_files(nats_url: str) -> set[str]:
    """The files h1's heartbeat lists now (read as the operator)."""

    async def read() -> set[str]:
        bus = await connect(nats_url, "test")
        try:
            hosts = await kv_snapshot(bus, bus.hosts, proto.HostRecord)
        finally:
            await bus.close()
        return {f.filename for h in hosts.values() for f in h.files}

    return asyncio.run(read())


def eventually(check: Callable[[], bool], within: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.1)


def say_hi(c: ollama.Client, model: str) -> None:
    r = c.chat(
        model=model, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}
    )
    assert r.done


def test_pull_streams_progress_then_success_and_the_model_serves(stack: Stack) -> None:
    c = client(stack, KEY)
    t0 = time.monotonic()
    lines = list(c.pull("slow", stream=True))
    took = time.monotonic() - t0
    size = len(stack.data)  # type: ignore[attr-defined]
    statuses = [p.status for p in lines]
    assert statuses[0] == "pulling manifest", statuses
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = [p for p in lines if p.digest]
    name = stack.stored("slow")  # no sha256 configured: the digest is the store file's name
    assert all(p.digest == name and p.status == f"pulling {name}" for p in progress)
    assert all(p.total == size for p in progress), progress
    done = [p.completed for p in progress]
    assert done == sorted(done) and done[-1] == size
    assert len({d for d in done if d < size}) >= 2, f"no progress over {took:.1f} s: {done}"
    assert (store(stack) / name).read_bytes() == stack.data  # type: ignore[attr-defined]

    # Already there: at once, with the bar full; `stream: false` and the older `name` too.
    t0 = time.monotonic()
    again = list(c.pull("slow", stream=True))
    assert time.monotonic() - t0 < 5
    assert again[-1].status == "success"
    assert all(p.completed == p.total == size for p in again if p.digest)  # a full bar, if any
    r = httpx.post(
        f"{stack.base}/api/pull",
        json={"name": "slow", "stream": False},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert (r.status_code, r.json()) == (200, {"status": "success"})

    say_hi(c, "slow")  # served from the pulled file

    with pytest.raises(ollama.ResponseError) as e:  # (a scoped key would get 403: it tells nothing)
        list(client(stack).pull("no-such-model", stream=True))
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # outside the key's scope
        c.pull("other")
    assert e.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as e:  # deleting is for admins
        c.delete("slow")
    assert e.value.status_code == 403
    assert (store(stack) / name).exists()


def test_delete_removes_the_file_everywhere_but_not_while_the_model_runs(
    stack: Stack, nats_url: str
) -> None:
    c = client(stack)
    assert list(c.pull("local", stream=True))[-1].status == "success"
    path = store(stack) / stack.stored("local")
    assert path.exists()
    say_hi(c, "local")

    with pytest.raises(ollama.ResponseError) as e:
        c.delete("local")
    assert e.value.status_code == 409 and "in use" in e.value.error, e.value.error
    assert path.exists()

    async def stop() -> None:
        bus = await connect(nats_url, "test")
        try:
            await bus.emit(proto.StopRequested(model="local", requested_by="test"))
        finally:
            await bus.close()

    asyncio.run(stop())
    eventually(lambda: not client(stack).ps().models, what="local stopped")

    deadline = time.monotonic() + 15  # the placer sees the stop within a pass
    while True:
        try:
            assert c.delete("local").status == "success"
            break
        except ollama.ResponseError as err:
            assert err.status_code == 409 and time.monotonic() < deadline, err
            time.sleep(0.5)
    assert not path.exists()
    gone = lambda: path.name not in host_files(nats_url)  # noqa: E731
    eventually(gone, what="heartbeat drops the file")
    assert "local" in {m.model for m in c.list().models}  # still configured, pullable

    with pytest.raises(ollama.ResponseError) as e:  # nothing left to delete
        c.delete("local")
    assert e.value.status_code == 404
    r = httpx.request(
        "DELETE", f"{stack.base}/api/delete", json={"name": "nope"}, headers={"x-api-key": ADMIN}
    )
    assert r.status_code == 404 and "error" in r.json()

    assert list(c.pull("local", stream=True))[-1].status == "success"  # fetched anew
    assert path.exists()


# ------------------------------------------------------------------ the downloader's checks


@pytest.fixture
async def downloader(
    bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path], no_local_stores: None
) -> AsyncIterator[tuple[Path, FileServer]]:
    """A downloader for host h1 in this process; model `a` comes slowly over HTTP."""
    srv = FileServer({"/a.gguf": b"x" * 400_000}, Behaviour(rate_bps=100e3))
    srv.__enter__()
    store_dir = tmp_path / "store"
    cfg = parse(
        {
            "agent": {"store": str(store_dir), "host_id": "h1"},
            "downloader": {"connections": 1},
            "models": {
                "a": {"url": srv.url("a.gguf")},
                "b": {"url": f"file://{tiny_gguf(9)}"},
            },
        }
    )
    ctx = ServiceContext(name="downloader", cfg=cfg, bus=bus, host_id="h1")
    task = asyncio.create_task(run_downloader(ctx))
    yield store_dir, srv
    ctx.stop.set()
    await asyncio.wait_for(task, 10)
    srv.__exit__(None, None, None)


async def test_downloader_deletes_only_a_configured_models_own_file(
    bus: Bus,
    downloader: tuple[Path, FileServer],
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    store_dir, srv = downloader
    a = store_filename("a", srv.url("a.gguf"))  # the fixture's config
    b = store_filename("b", f"file://{tiny_gguf(9)}")
    seen: list[proto.Event] = []

    async def on_file(msg) -> None:  # type: ignore[no-untyped-def]
        seen.append(proto.decode(msg.data, proto.Event))

    sub = await bus.nc.subscribe("lls.evt.file.>", cb=on_file)
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / a).write_bytes(b"a")
    (store_dir / b).write_bytes(b"b")
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"keep")

    async def delete(cmd_id: str, model: str, filename: str) -> proto.Event:
        cmd = proto.DeleteFile(cmd_id=cmd_id, model=model, filename=filename)
        await bus.command(proto.cmd_download("h1"), cmd)
        deadline = time.monotonic() + 10
        while not (mine := [e for e in seen if getattr(e, "cmd_id", "") == cmd_id]):
            assert time.monotonic() < deadline, f"no answer to {cmd_id}: {seen}"
            await asyncio.sleep(0.05)
        return mine[0]

    forged = [
        ("c1", "a", "../outside.gguf"),  # out of the store
        ("c2", "a", b),  # another model's file
        ("c3", "a", str(store_dir / b)),  # an absolute path
        ("c3a", "a", "a.gguf"),  # the name before names followed the source
        ("c4", "nope", "nope.gguf"),  # not a configured model
    ]
    for cmd_id, model, filename in forged:
        ev = await delete(cmd_id, model, filename)
        assert isinstance(ev, proto.FileDeleteFailed) and not ev.busy, ev
    assert outside.read_bytes() == b"keep" and (store_dir / b).exists()

    ev = await delete("c5", "a", a)
    assert isinstance(ev, proto.FileDeleted) and ev.existed and ev.host == "h1"
    assert not (store_dir / a).exists() and (store_dir / b).exists()
    ev = await delete("c6", "a", a)  # again: nothing there, still success
    assert isinstance(ev, proto.FileDeleted) and not ev.existed

    # While it is being downloaded: refused as busy, and the download goes on.
    get = proto.DownloadFile(cmd_id="g1", model="a", url=srv.url("a.gguf"), filename=a)
    await bus.command(proto.cmd_download("h1"), get)
    await asyncio.sleep(1.0)
    ev = await delete("c7", "a", a)
    assert isinstance(ev, proto.FileDeleteFailed) and ev.busy, ev
    await sub.unsubscribe()


# ------------------------------------------------------------------ who may ask for what


async def test_the_gateway_asks_for_pulls_and_deletes_but_commands_no_downloader(
    as_user,  # noqa: F811
    bus: Bus,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await as_user("gateway")
    await gw.emit(proto.PullRequested(model="m", request_id="r1"))  # what it is for
    await gw.emit(proto.DeleteRequested(model="m", request_id="r2"))
    subject = proto.cmd_download("A")
    forged = proto.DeleteFile(cmd_id="x1", model="m", filename="m.gguf")
    await refused(gw.command(subject, forged), subject, caplog)
    deleted = proto.FileDeleted(model="m", host="A", filename="m.gguf")
    await refused(gw.emit(deleted), proto.evt("file.deleted"), caplog)
    answer = proto.DeleteAnswered(model="m", request_id="r2", status="absent")
    await refused(gw.emit(answer), proto.evt("delete.answered"), caplog)
    assert await pending(bus, subject) == 0

    d = await as_user("downloader-A")
    await d.emit(deleted)  # its own report
    await refused(
        d.emit(proto.DeleteRequested(model="m", request_id="r3")),
        proto.evt("delete.requested"),
        caplog,
    )
    pulled = proto.PullAnswered(model="m", request_id="r1", status="present", host="A")
    await refused(d.emit(pulled), proto.evt("pull.answered"), caplog)
    for user in ("ui", "agent-A"):
        other = await as_user(user)
        caplog.clear()  # the violation must be this user's
        await refused(
            other.emit(proto.PullRequested(model="m", request_id="r4")),
            proto.evt("pull.requested"),
            caplog,
        )
