"""Reading a model's header from its source before downloading it: real HTTP servers, real
GGUFs, and the inspect command over real NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from test_download_fetch import hf_cache

import proto
from lls.bus import Bus
from lls.config import parse, store_filename
from lls.gguf_header import read_summary
from lls.service import ServiceContext
from services.downloader.devserver import Behaviour, FileServer
from services.downloader.fetch import FetchError, Options
from services.downloader.peek import peek
from services.downloader.service import run

MiB = 1 << 20
OPTS = Options(connections=1, attempts=1, connect_timeout=2, read_timeout=5)


def padded(path: Path, mib: int) -> bytes:
    """A real GGUF followed by `mib` MiB, standing in for the tensor data of a big model."""
    return path.read_bytes() + bytes(mib * MiB)


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
async def test_header_is_read_from_the_first_bytes_of_a_big_remote_file(
    tiny_gguf: Callable[[int], Path], ranges: bool
) -> None:
    data = padded(tiny_gguf(1), 64)
    with FileServer({"/m.gguf": data}, Behaviour(ranges=ranges)) as srv:
        got = await peek(srv.url("m.gguf"), "m.gguf", OPTS)
        sent = srv.stats.bytes_sent
    assert got.summary == read_summary(tiny_gguf(1))
    assert got.size == len(data)
    assert sent < 8 * MiB, f"{sent} bytes sent for a header of a 64 MiB file"


async def test_split_model_size_counts_every_part(tiny_gguf: Callable[[int], Path]) -> None:
    first = tiny_gguf(2).read_bytes()
    files = {"/m-00001-of-00002.gguf": first, "/m-00002-of-00002.gguf": bytes(3 * MiB)}
    with FileServer(files) as srv:
        got = await peek(srv.url("m-00001-of-00002.gguf"), "m-00001-of-00002.gguf", OPTS)
    assert got.size == len(first) + 3 * MiB
    assert got.summary.architecture == "llama"


async def test_local_sources_are_read_in_place(
    tiny_gguf: Callable[[int], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_gguf(3)
    got = await peek(f"file://{path}", "m.gguf", OPTS)
    assert (got.summary, got.size) == (read_summary(path), path.stat().st_size)
    cache = tmp_path / "hub"
    hf_cache(cache, "org/repo", "m.gguf", path.read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: must not be used
    got = await peek("hf://org/repo/m.gguf", "m.gguf", OPTS, hf_roots=[cache], ollama_roots=[])
    assert got.summary == read_summary(path)


async def test_unreadable_sources_fail_with_reasons(
    tiny_gguf: Callable[[int], Path], tmp_path: Path
) -> None:
    whole = tiny_gguf(4).read_bytes()
    files = {"/page.gguf": b"<html>sign in</html>" * 100, "/cut.gguf": whole[:200]}
    with FileServer(files) as srv:
        with pytest.raises(FetchError, match="404"):
            await peek(srv.url("absent.gguf"), "m.gguf", OPTS)
        with pytest.raises(ValueError, match="not a GGUF file"):
            await peek(srv.url("page.gguf"), "m.gguf", OPTS)
        with pytest.raises(ValueError, match="truncated.*the file is 200 bytes"):
            await peek(srv.url("cut.gguf"), "m.gguf", OPTS)
    with pytest.raises(FetchError, match="no such file"):
        await peek(f"file://{tmp_path}/absent.gguf", "m.gguf", OPTS)


@asynccontextmanager
async def downloader(bus: Bus, store: Path, models: dict) -> AsyncIterator[None]:  # type: ignore[type-arg]
    """The downloader service in this process, with these models configured."""
    cfg = parse({"agent": {"store": str(store), "host_id": "h1"}, "models": models})
    ctx = ServiceContext(name="downloader", cfg=cfg, bus=bus, host_id="h1")
    task = asyncio.create_task(run(ctx))
    try:
        yield
    finally:
        ctx.stop.set()
        await asyncio.wait_for(task, 10)


async def _model_info(bus: Bus, model: str) -> proto.ModelInfo:
    for _ in range(100):
        try:
            entry = await bus.models.get(proto.kv_key(model))
            if entry.value:
                return proto.decode(entry.value, proto.ModelInfo)
        except Exception:  # noqa: BLE001 - not there yet
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"no header recorded for {model}")


async def test_inspect_command_records_the_header_and_says_so_on_the_event_stream(
    bus: Bus, tmp_path: Path, tiny_gguf: Callable[[int], Path]
) -> None:
    seen: list[proto.ModelInspected] = []

    async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
        seen.append(proto.decode(msg.data, proto.ModelInspected))

    sub = await bus.nc.subscribe(proto.evt("model.inspected"), cb=on_event)
    data = padded(tiny_gguf(5), 8)
    with FileServer({"/m.gguf": data}) as srv:
        models = {"good": {"url": srv.url("m.gguf")}, "gone": {"url": srv.url("nope.gguf")}}
        async with downloader(bus, tmp_path / "store", models):
            for model, m in models.items():
                name = store_filename(model, m["url"])
                cmd = proto.InspectModel(
                    cmd_id=f"i-{model}", model=model, url=m["url"], filename=name
                )
                await bus.command(proto.cmd_inspect(), cmd)
            good, gone = await _model_info(bus, "good"), await _model_info(bus, "gone")
    assert good.gguf == read_summary(tiny_gguf(5)) and good.size == len(data)
    assert good.url.endswith("/m.gguf") and good.error == ""
    assert gone.gguf is None and "404" in gone.error
    for _ in range(50):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.1)
    await sub.unsubscribe()
    by_model = {e.model: e for e in seen}
    assert by_model["good"].ok and "llama" in by_model["good"].summary
    assert not by_model["gone"].ok and "404" in by_model["gone"].summary
