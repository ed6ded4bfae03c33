"""The downloader service on the real bus: commands in through JetStream, events out, acks,
joined downloads, and a kill -9 of a real downloader process mid-file. Every command here is
the one its config implies (the downloader refuses any other: test_download_trust.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

import proto
from lls.bus import Bus
from lls.config import parse, store_filename
from lls.service import ServiceContext
from services.downloader.devserver import Behaviour, FileServer
from services.downloader.fetch import chunk_size, state_path
from services.downloader.service import run
from services.downloader.store import Staging

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
HOST = "h1"


def blob(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def no_local_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point reuse at empty dirs so the developer's own Ollama/HF caches never interfere."""
    monkeypatch.setenv("LLS_OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf"))


class Events:
    """Download events seen on the bus, subscribed before any command is sent."""

    def __init__(self) -> None:
        self.items: list[proto.Event] = []
        self.changed = asyncio.Event()

    async def cb(self, msg) -> None:  # type: ignore[no-untyped-def]
        self.items.append(proto.decode(msg.data, proto.Event))
        self.changed.set()

    def of(self, kind: type, model: str | None = None) -> list:  # type: ignore[type-arg]
        return [e for e in self.items if isinstance(e, kind) and model in (None, e.model)]

    async def final(self, model: str, within: float = 15) -> proto.Event:
        deadline = time.monotonic() + within
        while True:
            done = [
                e
                for e in self.items
                if isinstance(e, proto.DownloadCompleted | proto.DownloadFailed)
                and e.model == model
            ]
            if done:
                return done[0]
            left = deadline - time.monotonic()
            assert left > 0, f"no completed/failed event for {model}; saw {self.items}"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


@pytest.fixture
async def events(bus: Bus) -> AsyncIterator[Events]:
    ev = Events()
    sub = await bus.nc.subscribe("lls.evt.download.>", cb=ev.cb)
    yield ev
    await sub.unsubscribe()


def config(store: Path, connections: int = 4, models: dict | None = None) -> dict:  # type: ignore[type-arg]
    return {
        "agent": {"store": str(store), "host_id": HOST},
        "downloader": {"connections": connections},
        "models": models or {},
    }


class Downloaders:
    """Downloader services run in this process, as lls.service.main would run them, on a
    config with the given models; all share one store."""

    def __init__(self, bus: Bus, store: Path) -> None:
        self.bus, self.store = bus, store
        self.running: list[tuple[ServiceContext, asyncio.Task[None]]] = []

    async def start(self, models: dict, **downloader: object) -> Path:  # type: ignore[type-arg]
        raw = config(self.store, models=models)
        raw["downloader"].update(downloader)
        ctx = ServiceContext(name="downloader", cfg=parse(raw), bus=self.bus, host_id=HOST)
        self.running.append((ctx, asyncio.create_task(run(ctx))))
        return self.store

    async def stop(self) -> None:
        for ctx, task in self.running:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
        self.running.clear()


@pytest.fixture
async def downloaders(
    bus: Bus, tmp_path: Path, no_local_stores: None
) -> AsyncIterator[Downloaders]:
    d = Downloaders(bus, tmp_path / "store")
    yield d
    await d.stop()


def command(cmd_id: str, model: str, url: str, filename: str, sha256: str | None = None):  # type: ignore[no-untyped-def]
    return proto.DownloadFile(cmd_id=cmd_id, model=model, url=url, filename=filename, sha256=sha256)


def ask(cmd_id: str, model: str, models: dict) -> proto.DownloadFile:  # type: ignore[type-arg]
    """The DownloadFile a placer sends for `model` of this config."""
    m = models[model]
    url, digest = m["url"], m.get("sha256")
    return command(cmd_id, model, url, store_filename(model, url, digest), digest)


async def no_unacked_commands(bus: Bus) -> bool:
    info = await bus.js.consumer_info(proto.CMDS_STREAM, f"downloader-{HOST}")
    return info.num_ack_pending == 0 and info.num_pending == 0


async def test_command_over_nats_emits_progress_then_completed_and_is_acked(
    bus: Bus, events: Events, downloaders: Downloaders
):
    data = blob(3 * MiB)
    with FileServer({"/m.gguf": data}, Behaviour(rate_bps=1e6)) as srv:  # ~1 s with 4 conns
        models = {"m": {"url": srv.url("m.gguf"), "sha256": sha(data)}}
        store = await downloaders.start(models)
        cmd = ask("c1", "m", models)
        t0 = time.monotonic()
        await bus.command(proto.cmd_download(HOST), cmd)
        done = await events.final("m")
        elapsed = time.monotonic() - t0
    assert isinstance(done, proto.DownloadCompleted), done
    assert (done.host, done.filename, done.size, done.reused) == (
        HOST,
        cmd.filename,
        len(data),
        None,
    )
    assert (store / cmd.filename).read_bytes() == data
    progress = events.of(proto.DownloadProgress, "m")
    assert progress, "no progress event during a ~1 s download"
    assert len(progress) <= 2 * elapsed + 1  # at most ~2 per second
    assert all(p.total == len(data) and p.host == HOST for p in progress)
    assert [p.bytes for p in progress] == sorted(p.bytes for p in progress)
    assert any(p.rate_bps > 0 and p.eta_s is not None for p in progress)
    await asyncio.sleep(0.2)
    assert await no_unacked_commands(bus)

    # the same file again (a pull): already in the store, completes at once
    events.items.clear()
    await bus.command(proto.cmd_download(HOST), ask("c2", "m", models))
    again = await events.final("m", within=5)
    assert isinstance(again, proto.DownloadCompleted) and again.reused == "store"


async def test_a_file_stored_before_names_followed_the_source_is_reused_if_its_sha256_matches(
    bus: Bus, events: Events, downloaders: Downloaders, tmp_path: Path
):
    """An upgraded store holds `<model>.gguf`. With a configured sha256 it matches, it is
    hard-linked under the new name (and stays, for whatever still runs from it); another
    content, or no sha256 to tell, is fetched again."""
    data = blob(MiB, 1)
    service = tmp_path / "store"
    await asyncio.to_thread(service.mkdir, parents=True, exist_ok=True)
    (service / "m.gguf").write_bytes(data)
    (service / "n.gguf").write_bytes(blob(MiB, 2))  # not what n's sha256 says
    (service / "u.gguf").write_bytes(data)  # u has no sha256: any old version
    got: dict[str, tuple[str, proto.Event]] = {}
    with FileServer({f"/{m}.gguf": data for m in "mnu"}) as srv:
        models = {
            m: {"url": srv.url(f"{m}.gguf")} | ({} if m == "u" else {"sha256": sha(data)})
            for m in "mnu"
        }
        await downloaders.start(models)
        for model in "mnu":
            cmd = ask(model, model, models)
            await bus.command(proto.cmd_download(HOST), cmd)
            got[model] = cmd.filename, await events.final(model)
    for name, done in got.values():
        assert isinstance(done, proto.DownloadCompleted), done
        assert (service / name).read_bytes() == data
    assert got["m"][1].reused == "store:m.gguf" and "/m.gguf" not in srv.stats.paths
    assert (service / "m.gguf").stat().st_ino == (service / got["m"][0]).stat().st_ino
    assert got["n"][1].reused is None and (service / "n.gguf").read_bytes() == blob(MiB, 2)
    assert got["u"][1].reused is None and srv.stats.paths["/u.gguf"] >= 1


async def test_failure_is_an_event_with_a_reason_and_the_command_is_not_redelivered(
    bus: Bus, events: Events, downloaders: Downloaders
):
    with FileServer({}) as srv:
        models = {"gone": {"url": srv.url("x.gguf")}}
        service = await downloaders.start(models)
        await bus.command(proto.cmd_download(HOST), ask("c1", "gone", models))
        failed = await events.final("gone")
    assert isinstance(failed, proto.DownloadFailed)
    assert "404" in failed.reason and "check the repository" in failed.reason
    await asyncio.sleep(0.2)
    assert await no_unacked_commands(bus)
    assert [p.name for p in service.iterdir() if p.is_file()] == []


async def test_concurrent_commands_for_one_file_share_one_download_and_others_proceed(
    bus: Bus, events: Events, downloaders: Downloaders
):
    """A cold start and a pull of one model at once: one download, two answers."""
    big, small = blob(4 * MiB, 1), blob(64 * 1024, 2)
    files = {"/big.gguf": big, "/small.gguf": small}
    with FileServer(files, Behaviour(rate_bps=1e6)) as srv:  # big takes ~1 s
        models = {"big": {"url": srv.url("big.gguf")}, "small": {"url": srv.url("small.gguf")}}
        service = await downloaders.start(models)
        for cmd_id in ("c0", "c1"):
            await bus.command(proto.cmd_download(HOST), ask(cmd_id, "big", models))
        await bus.command(proto.cmd_download(HOST), ask("c9", "small", models))
        small_done = await events.final("small")
        assert not events.of(proto.DownloadCompleted, "big"), "the small file waited"
        deadline = time.monotonic() + 15
        while len(events.of(proto.DownloadCompleted | proto.DownloadFailed, "big")) < 2:
            assert time.monotonic() < deadline, events.items
            await asyncio.sleep(0.05)
    assert isinstance(small_done, proto.DownloadCompleted)
    a, b = events.of(proto.DownloadCompleted | proto.DownloadFailed, "big")
    assert isinstance(a, proto.DownloadCompleted) and isinstance(b, proto.DownloadCompleted)
    assert a.size == b.size == len(big)
    n_chunks = -(-len(big) // chunk_size(len(big), 4))
    assert srv.stats.paths["/big.gguf"] == n_chunks + 1  # one probe, each chunk once
    assert (service / a.filename).read_bytes() == big


async def test_kill_9_mid_file_then_resume_refetches_at_most_the_chunks_in_flight(
    bus: Bus, events: Events, nats_url: str, tmp_path: Path, no_local_stores: None
):
    data = blob(8 * MiB)
    conns = 4
    store = tmp_path / "store"
    cfg_file = tmp_path / "config.yaml"
    log_path = tmp_path / "downloader.log"
    log_file = await asyncio.to_thread(log_path.open, "wb")
    with FileServer({"/m.gguf": data}, Behaviour(rate_bps=0.5e6)) as srv:  # ~4 s in all
        # a configured model: its unfinished download is kept for the resume, not swept
        models = {"m": {"url": srv.url("m.gguf"), "sha256": sha(data)}}
        name = store_filename("m", srv.url("m.gguf"), sha(data))
        part = Staging.of(store, name).part
        cfg_file.write_text(yaml.safe_dump(config(store, conns, models)))
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "services.downloader", "--config", str(cfg_file)],
            *["--nats", nats_url, "--host-id", HOST, "--log-level", "DEBUG"],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            await bus.command(
                proto.cmd_download(HOST), command("c1", "m", srv.url("m.gguf"), name, sha(data))
            )
            deadline = time.monotonic() + 20
            saved = 0
            while saved < MiB:
                assert time.monotonic() < deadline, log_path.read_text()
                assert proc.returncode is None, log_path.read_text()
                await asyncio.sleep(0.05)
                try:
                    saved = sum(json.loads(state_path(part).read_text())["done"])
                except (OSError, ValueError):
                    pass
        finally:
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            log_file.close()
        assert not (store / name).exists(), "a partial file under the final name"
        await asyncio.sleep(0.2)  # let the server notice the dead connections
        srv.behaviour.rate_bps = None  # the resume need not be slow

        # a new downloader (in this process) takes a re-sent command and resumes
        ctx = ServiceContext(
            name="downloader", cfg=parse(config(store, conns, models)), bus=bus, host_id=HOST
        )
        task = asyncio.create_task(run(ctx))
        try:
            await bus.command(
                proto.cmd_download(HOST), command("c2", "m", srv.url("m.gguf"), name, sha(data))
            )
            done = await events.final("m")
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
    assert isinstance(done, proto.DownloadCompleted), done
    assert (store / name).read_bytes() == data
    refetched = srv.stats.bytes_sent - len(data) - 2  # minus the two 1-byte probes
    assert 0 <= refetched <= conns * chunk_size(len(data), conns)
    assert not part.exists() and not state_path(part).exists()
