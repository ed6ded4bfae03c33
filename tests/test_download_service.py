"""The downloader service on the real bus: commands in through JetStream, events out, acks,
joined downloads, and a kill -9 of a real downloader process mid-file."""

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


@pytest.fixture
async def service(bus: Bus, tmp_path: Path, no_local_stores: None) -> AsyncIterator[Path]:
    """The downloader service running in this process, as lls.service.main would run it."""
    store = tmp_path / "store"
    ctx = ServiceContext(name="downloader", cfg=parse(config(store)), bus=bus, host_id=HOST)
    task = asyncio.create_task(run(ctx))
    yield store
    ctx.stop.set()
    await asyncio.wait_for(task, 10)


def command(cmd_id: str, model: str, url: str, filename: str, sha256: str | None = None):  # type: ignore[no-untyped-def]
    return proto.DownloadFile(cmd_id=cmd_id, model=model, url=url, filename=filename, sha256=sha256)


async def no_unacked_commands(bus: Bus) -> bool:
    info = await bus.js.consumer_info(proto.CMDS_STREAM, f"downloader-{HOST}")
    return info.num_ack_pending == 0 and info.num_pending == 0


async def test_command_over_nats_emits_progress_then_completed_and_is_acked(
    bus: Bus, events: Events, service: Path
):
    data = blob(3 * MiB)
    with FileServer({"/m.gguf": data}, Behaviour(rate_bps=1e6)) as srv:  # ~1 s with 4 conns
        t0 = time.monotonic()
        await bus.command(
            proto.cmd_download(HOST), command("c1", "m", srv.url("m.gguf"), "m.gguf", sha(data))
        )
        done = await events.final("m")
        elapsed = time.monotonic() - t0
    assert isinstance(done, proto.DownloadCompleted), done
    assert (done.host, done.filename, done.size, done.reused) == (HOST, "m.gguf", len(data), None)
    assert (service / "m.gguf").read_bytes() == data
    progress = events.of(proto.DownloadProgress, "m")
    assert progress, "no progress event during a ~1 s download"
    assert len(progress) <= 2 * elapsed + 1  # at most ~2 per second
    assert all(p.total == len(data) and p.host == HOST for p in progress)
    assert [p.bytes for p in progress] == sorted(p.bytes for p in progress)
    assert any(p.rate_bps > 0 and p.eta_s is not None for p in progress)
    await asyncio.sleep(0.2)
    assert await no_unacked_commands(bus)

    # the same file again: already in the store, completes at once without a download
    await bus.command(proto.cmd_download(HOST), command("c2", "m2", srv.url("m.gguf"), "m.gguf"))
    again = await events.final("m2", within=5)
    assert isinstance(again, proto.DownloadCompleted) and again.reused == "store"


async def test_a_file_stored_before_names_followed_the_source_is_reused_if_its_sha256_matches(
    bus: Bus, events: Events, service: Path
):
    """An upgraded store holds `<model>.gguf`. With a configured sha256 it matches, it is
    hard-linked under the new name (and stays, for whatever still runs from it); another
    content, or no sha256 to tell, is fetched again."""
    data = blob(MiB, 1)
    await asyncio.to_thread(service.mkdir, parents=True, exist_ok=True)
    (service / "m.gguf").write_bytes(data)
    (service / "n.gguf").write_bytes(blob(MiB, 2))  # not what n's sha256 says
    (service / "u.gguf").write_bytes(data)  # u has no sha256: any old version
    got: dict[str, tuple[str, proto.Event]] = {}
    with FileServer({f"/{m}.gguf": data for m in "mnu"}) as srv:
        for model in "mnu":
            url, digest = srv.url(f"{model}.gguf"), None if model == "u" else sha(data)
            name = store_filename(model, url, digest)
            await bus.command(proto.cmd_download(HOST), command(model, model, url, name, digest))
            got[model] = name, await events.final(model)
    for name, done in got.values():
        assert isinstance(done, proto.DownloadCompleted), done
        assert (service / name).read_bytes() == data
    assert got["m"][1].reused == "store:m.gguf" and "/m.gguf" not in srv.stats.paths
    assert (service / "m.gguf").stat().st_ino == (service / got["m"][0]).stat().st_ino
    assert got["n"][1].reused is None and (service / "n.gguf").read_bytes() == blob(MiB, 2)
    assert got["u"][1].reused is None and srv.stats.paths["/u.gguf"] >= 1


async def test_failure_is_an_event_with_a_reason_and_the_command_is_not_redelivered(
    bus: Bus, events: Events, service: Path
):
    with FileServer({}) as srv:
        await bus.command(
            proto.cmd_download(HOST), command("c1", "gone", srv.url("x.gguf"), "x.gguf")
        )
        failed = await events.final("gone")
    assert isinstance(failed, proto.DownloadFailed)
    assert "404" in failed.reason and "check the repository" in failed.reason
    await bus.command(proto.cmd_download(HOST), command("c2", "bad", "ftp://x/y.gguf", "y.gguf"))
    bad = await events.final("bad")
    assert isinstance(bad, proto.DownloadFailed) and "unsupported URL" in bad.reason
    await asyncio.sleep(0.2)
    assert await no_unacked_commands(bus)
    assert not (service / "x.gguf").exists() and not (service / "y.gguf").exists()


async def test_concurrent_commands_for_one_file_share_one_download_and_others_proceed(
    bus: Bus, events: Events, service: Path
):
    big, small = blob(4 * MiB, 1), blob(64 * 1024, 2)
    files = {"/big.gguf": big, "/small.gguf": small}
    with FileServer(files, Behaviour(rate_bps=1e6)) as srv:  # big takes ~1 s
        for i, model in enumerate(("a", "b")):
            await bus.command(
                proto.cmd_download(HOST), command(f"c{i}", model, srv.url("big.gguf"), "big.gguf")
            )
        await bus.command(
            proto.cmd_download(HOST), command("c9", "small", srv.url("small.gguf"), "small.gguf")
        )
        small_done = await events.final("small")
        assert not events.of(proto.DownloadCompleted, "a"), "the small file waited for the big one"
        a, b = await events.final("a"), await events.final("b")
    assert isinstance(small_done, proto.DownloadCompleted)
    assert isinstance(a, proto.DownloadCompleted) and isinstance(b, proto.DownloadCompleted)
    assert a.size == b.size == len(big)
    n_chunks = -(-len(big) // chunk_size(len(big), 4))
    assert srv.stats.paths["/big.gguf"] == n_chunks + 1  # one probe, each chunk once
    assert (service / "big.gguf").read_bytes() == big


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
        models = {"m": {"url": srv.url("m.gguf")}}
        name = store_filename("m", srv.url("m.gguf"))
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
