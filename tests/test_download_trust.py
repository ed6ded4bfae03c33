"""The downloader trusts no command: it acts only on what its own config says about a model
(url, sha256, store file name), and it never replaces a store file it did not write for that
model. Real NATS, the real downloader service, a real HTTP server and real files."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml
from test_download_fetch import rot_in_place
from test_download_peek import padded
from test_download_service import (
    HOST,
    Downloaders,
    Events,
    ask,
    blob,
    command,
    config,
    downloaders,  # noqa: F401 - fixture
    events,  # noqa: F401 - fixture
    no_local_stores,  # noqa: F401 - fixture
    no_unacked_commands,
    sha,
)

import proto
from lls.bus import Bus
from lls.config import ModelConfig, load, store_filename
from lls.service import ServiceContext
from services.downloader.admit import refusal
from services.downloader.devserver import FileServer
from services.downloader.service import RELOAD_GRACE_S, run
from services.downloader.store import Staging

MiB = 1 << 20


class Refusals:
    """command.refused events, subscribed before any command is sent."""

    def __init__(self) -> None:
        self.items: list[proto.CommandRefused] = []

    async def cb(self, msg) -> None:  # type: ignore[no-untyped-def]
        self.items.append(proto.decode(msg.data, proto.CommandRefused))

    async def of(self, cmd_id: str, within: float = 10) -> proto.CommandRefused:
        deadline = time.monotonic() + within
        while not (mine := [r for r in self.items if r.cmd_id == cmd_id]):
            assert time.monotonic() < deadline, f"no refusal of {cmd_id}; saw {self.items}"
            await asyncio.sleep(0.05)
        return mine[0]


@pytest.fixture
async def refusals(bus: Bus) -> AsyncIterator[Refusals]:
    r = Refusals()
    sub = await bus.nc.subscribe(proto.evt("command.refused"), cb=r.cb)
    yield r
    await sub.unsubscribe()


def store_files(store: Path) -> list[str]:
    """Files under the store, staging included (nothing may be written at all)."""
    if not store.exists():
        return []
    skip = {".lock"}  # taking a file's lock is not writing it
    return sorted(
        str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.suffix not in skip
    )


# ---------------------------------------------------------------- the decision, plain values


def test_a_command_must_carry_the_configs_url_sha256_and_file_name() -> None:
    url, digest = "https://example.com/m.gguf", "ab" * 32
    models = {"m": ModelConfig(url=url, sha256=digest.upper())}  # case does not matter
    name = store_filename("m", url, digest)

    def download(**kw: object) -> proto.DownloadFile:
        fields: dict = {"model": "m", "url": url, "filename": name, "sha256": digest} | kw  # type: ignore[type-arg]
        return proto.DownloadFile(cmd_id="c", **fields)

    assert refusal(download(), models) is None
    why = refusal(download(url="https://evil.example/m.gguf"), models)
    assert why is not None and "url differs" in why and "evil" not in why  # URLs not echoed
    why = refusal(download(sha256="cd" * 32), models)
    assert why is not None and "sha256 (cdcdcdcdcdcd…, the config's abababababab…)" in why
    why = refusal(download(sha256=None), models)
    assert why is not None and "sha256 (none," in why
    why = refusal(download(filename="../../etc/cron.d/x"), models)
    assert why is not None and "file name ('../../etc/cron.d/x', the config's" in why
    assert "reload every service's config" in why
    why = refusal(download(model="ghost"), models)
    assert why == "model 'ghost' is not in this downloader's config"
    inspect = proto.InspectModel(cmd_id="i", model="m", url=url, filename=name)
    assert refusal(inspect, models) is None
    inspect.url = "file:///etc/shadow"
    assert "url differs" in (refusal(inspect, models) or "")
    delete = proto.DeleteFile(cmd_id="d", model="m", filename=name)
    assert refusal(delete, models) is None
    delete.filename = store_filename("n", url, digest)
    assert "file name" in (refusal(delete, models) or "")


# ---------------------------------------------------------------- forged commands over the bus


async def test_forged_download_commands_are_refused_acked_and_fetch_nothing(
    bus: Bus,
    events: Events,  # noqa: F811
    refusals: Refusals,
    downloaders: Downloaders,  # noqa: F811
) -> None:
    data, evil = blob(MiB, 1), blob(MiB, 2)
    with FileServer({"/m.gguf": data, "/evil.gguf": evil}) as srv:
        models = {"m": {"url": srv.url("m.gguf"), "sha256": sha(data)}}
        store = await downloaders.start(models)
        real = ask("real", "m", models)
        evil_url = srv.url("evil.gguf")
        forged = {
            # another url (with the name that url would have: a consistent forgery)
            "url": command(
                "f-url", "m", evil_url, store_filename("m", evil_url, sha(data)), sha(data)
            ),
            # the real source, written somewhere else in (or out of) the store
            "file name": command("f-name", "m", real.url, "../outside.gguf", real.sha256),
            # the real url, but another checksum would accept another file
            "sha256": command("f-sha", "m", real.url, real.filename, sha(evil)),
            "not in this downloader's config": command("f-ghost", "ghost", evil_url, "g.gguf"),
        }
        for cmd in forged.values():
            await bus.command(proto.cmd_download(HOST), cmd)
        got = {field: await refusals.of(cmd.cmd_id) for field, cmd in forged.items()}
        await asyncio.sleep(0.3)
        assert srv.stats.requests == 0, srv.stats.paths  # nothing fetched, not even probed
        assert store_files(store) == []  # nothing written
        assert await no_unacked_commands(bus)  # acked: never redelivered
        # whoever waits on the download hears why (the genuine one was not running then)
        failed = [e.reason for e in events.of(proto.DownloadFailed, "m")]

        events.items.clear()
        await bus.command(proto.cmd_download(HOST), real)  # the genuine one still works
        done = await events.final("m")
    for field, r in got.items():
        assert (r.host, r.command, r.instance_id) == (HOST, "download", ""), r
        assert field in r.reason, r.reason
    assert sorted(failed) == sorted(r.reason for r in got.values() if r.model == "m")
    assert isinstance(done, proto.DownloadCompleted), done
    assert (store / real.filename).read_bytes() == data
    assert srv.stats.paths.get("/evil.gguf") is None
    assert not (store.parent / "outside.gguf").exists()


async def test_a_mismatching_store_file_it_did_not_write_is_reported_and_kept(
    bus: Bus,
    events: Events,  # noqa: F811
    downloaders: Downloaders,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file under the model's store name that is not what its sha256 says, and that the
    downloader did not write (put there by hand, or by another tool): the failure names the
    path and both hashes, in the event and the log; the file stays; nothing is fetched."""
    data, theirs = blob(MiB, 3), b"GGUF someone's own build"
    with FileServer({"/m.gguf": data}) as srv:
        models = {"m": {"url": srv.url("m.gguf"), "sha256": sha(data)}}
        cmd = ask("c1", "m", models)
        store = await downloaders.start(models)
        await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
        (store / cmd.filename).write_bytes(theirs)
        with caplog.at_level(logging.WARNING):
            await bus.command(proto.cmd_download(HOST), cmd)
            failed = await events.final("m")
        assert srv.stats.requests == 0
    assert isinstance(failed, proto.DownloadFailed), failed
    path = str(store / cmd.filename)
    for text in (failed.reason, caplog.text):
        assert path in text and sha(data) in text and sha(theirs) in text, text
    assert "did not write" in failed.reason
    assert (store / cmd.filename).read_bytes() == theirs


async def test_its_own_file_is_still_its_own_after_a_restart_and_is_replaced_when_rotten(
    bus: Bus,
    events: Events,  # noqa: F811
    downloaders: Downloaders,  # noqa: F811
) -> None:
    """The write record is on disk: after a restart, a file the downloader wrote for the
    model and that no longer matches (bit rot, its cached digest lost) is fetched again. The
    same file rewritten by someone else (its size or mtime changed) is not its own any more."""
    data = blob(MiB, 4)
    with FileServer({"/m.gguf": data}) as srv:
        models = {"m": {"url": srv.url("m.gguf"), "sha256": sha(data)}}
        store = await downloaders.start(models)
        cmd = ask("c1", "m", models)
        await bus.command(proto.cmd_download(HOST), cmd)
        assert isinstance(await events.final("m"), proto.DownloadCompleted)
        await downloaders.stop()
        dest, st = store / cmd.filename, Staging.of(store, cmd.filename)
        rotten = await asyncio.to_thread(rot_in_place, dest)
        st.digest.unlink()  # the digest cache lost too (else it vouches for the old bytes)
        sent = srv.stats.bytes_sent

        await downloaders.start(models)  # a new process, as far as the store knows
        events.items.clear()
        await bus.command(proto.cmd_download(HOST), ask("c2", "m", models))
        again = await events.final("m")
        assert isinstance(again, proto.DownloadCompleted) and again.reused is None, again
        assert dest.read_bytes() == data and dest.stat().st_ino != rotten
        assert srv.stats.bytes_sent - sent >= len(data)  # fetched anew

        # rewritten in place by another hand: same inode, another mtime: not replaced
        await asyncio.to_thread(dest.write_bytes, b"edited by hand")
        events.items.clear()
        await bus.command(proto.cmd_download(HOST), ask("c3", "m", models))
        edited = await events.final("m")
    assert isinstance(edited, proto.DownloadFailed) and "did not write" in edited.reason
    assert dest.read_bytes() == b"edited by hand"


async def test_a_changed_url_with_the_same_sha256_reuses_the_models_earlier_file(
    bus: Bus,
    events: Events,  # noqa: F811
    downloaders: Downloaders,  # noqa: F811
) -> None:
    """Store names follow url and sha256, so a config change is a new file. A new mirror of
    the same bytes (same sha256) is hard-linked from the file the downloader wrote for the
    model before, not fetched; a new sha256 (another file) is fetched; the old file stays."""
    v1, v2 = blob(MiB, 5), blob(MiB, 6)
    with FileServer({"/a/m.gguf": v1, "/b/m.gguf": v1, "/b/m2.gguf": v2}) as srv:
        before = {"m": {"url": srv.url("a/m.gguf"), "sha256": sha(v1)}}
        store = await downloaders.start(before)
        old = ask("c1", "m", before)
        await bus.command(proto.cmd_download(HOST), old)
        assert isinstance(await events.final("m"), proto.DownloadCompleted)
        await downloaders.stop()

        mirror = {"m": {"url": srv.url("b/m.gguf"), "sha256": sha(v1)}}
        await downloaders.start(mirror)
        new = ask("c2", "m", mirror)
        assert new.filename != old.filename
        events.items.clear()
        await bus.command(proto.cmd_download(HOST), new)
        moved = await events.final("m")
        assert isinstance(moved, proto.DownloadCompleted), moved
        assert moved.reused == f"store:{old.filename}"
        assert "/b/m.gguf" not in srv.stats.paths
        assert (store / new.filename).stat().st_ino == (store / old.filename).stat().st_ino
        await downloaders.stop()

        newer = {"m": {"url": srv.url("b/m2.gguf"), "sha256": sha(v2)}}
        await downloaders.start(newer)
        events.items.clear()
        await bus.command(proto.cmd_download(HOST), ask("c3", "m", newer))
        fetched = await events.final("m")
    assert isinstance(fetched, proto.DownloadCompleted) and fetched.reused is None, fetched
    assert (store / fetched.filename).read_bytes() == v2
    assert (store / old.filename).read_bytes() == v1  # an instance may still run from it


async def test_a_command_for_a_new_url_waits_for_the_reload_under_way(
    bus: Bus,
    events: Events,  # noqa: F811
    refusals: Refusals,
    tmp_path: Path,
    no_local_stores: None,  # noqa: F811
) -> None:
    """`lls reload` signals every service at once, and the placer may send the new url
    before this downloader has re-read its config: the command waits for the reload (up to
    RELOAD_GRACE_S) and runs. One that still disagrees after that is refused."""
    data = blob(MiB, 7)
    store = tmp_path / "store"
    cfg_file = tmp_path / "config.yaml"
    with FileServer({"/old.gguf": data, "/new.gguf": data}) as srv:
        old = {"m": {"url": srv.url("old.gguf")}}
        new = {"m": {"url": srv.url("new.gguf")}}
        cfg_file.write_text(yaml.safe_dump(config(store, models=old)))
        ctx = ServiceContext(
            name="downloader",
            cfg=load(cfg_file),
            bus=bus,
            host_id=HOST,
            config_path=str(cfg_file),
        )
        task = asyncio.create_task(run(ctx))
        try:
            await bus.command(proto.cmd_download(HOST), ask("c1", "m", new))
            await asyncio.sleep(RELOAD_GRACE_S / 4)  # it has the command, not the new config
            cfg_file.write_text(yaml.safe_dump(config(store, models=new)))
            assert await ctx.reload()
            done = await events.final("m")

            t0 = time.monotonic()
            await bus.command(proto.cmd_download(HOST), ask("c2", "m", old))  # the old url now
            late = await refusals.of("c2", within=RELOAD_GRACE_S + 10)
            waited = time.monotonic() - t0
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
    assert isinstance(done, proto.DownloadCompleted), done
    assert (store / store_filename("m", srv.url("new.gguf"))).read_bytes() == data
    assert not [r for r in refusals.items if r.cmd_id == "c1"]
    assert "url and file name" in late.reason and waited >= RELOAD_GRACE_S * 0.9


async def test_forged_inspect_and_delete_commands_are_refused_and_change_nothing(
    bus: Bus,
    refusals: Refusals,
    downloaders: Downloaders,  # noqa: F811
    tiny_gguf: Callable[[int], Path],
) -> None:
    """A forged InspectModel does not overwrite the model's header record (the placer sizes
    the model by it); a forged DeleteFile deletes nothing. Both are refused and acked."""
    data = padded(tiny_gguf(11), 1)
    with FileServer({"/m.gguf": data, "/big.gguf": padded(tiny_gguf(12), 1)}) as srv:
        models = {"m": {"url": srv.url("m.gguf")}}
        store = await downloaders.start(models)
        name = store_filename("m", srv.url("m.gguf"))

        async def header() -> proto.ModelInfo | None:
            try:
                entry = await bus.models.get(proto.kv_key("m"))
            except Exception:  # noqa: BLE001 - not there yet
                return None
            return proto.decode(entry.value, proto.ModelInfo) if entry.value else None

        real = proto.InspectModel(cmd_id="i1", model="m", url=srv.url("m.gguf"), filename=name)
        await bus.command(proto.cmd_inspect(), real)
        deadline = time.monotonic() + 10
        while (info := await header()) is None:
            assert time.monotonic() < deadline, "no header recorded"
            await asyncio.sleep(0.1)
        assert info.gguf is not None and info.url == real.url

        forged = proto.InspectModel(cmd_id="i2", model="m", url=srv.url("big.gguf"), filename=name)
        await bus.command(proto.cmd_inspect(), forged)
        got = await refusals.of("i2")
        assert (got.command, got.model) == ("inspect", "m") and "url differs" in got.reason
        after = await header()
        assert after is not None and after.url == real.url and after.ts == info.ts
        assert "/big.gguf" not in srv.stats.paths

        await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
        (store / name).write_bytes(data)
        (store / "keep.gguf").write_bytes(b"someone's")
        for cmd_id, filename in (("d1", "keep.gguf"), ("d2", "../config.yaml")):
            await bus.command(
                proto.cmd_download(HOST),
                proto.DeleteFile(cmd_id=cmd_id, model="m", filename=filename),
            )
            r = await refusals.of(cmd_id)
            assert r.command == "delete" and "file name" in r.reason
        assert (store / "keep.gguf").exists() and (store / name).exists()
        await asyncio.sleep(0.2)
        assert await no_unacked_commands(bus)
