"""What a download command cannot do: read local files outside the configured roots (never
/proc, /dev or /sys), climb out of a repo with `..`, fill the disk past the configured margin,
or leave unfinished files behind that nobody will resume."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_download_service import (
    HOST,
    Events,
    blob,
    command,
    events,  # noqa: F401 - fixture
    no_local_stores,  # noqa: F401 - fixture
)

import proto
from lls.bus import Bus
from lls.config import parse
from lls.service import ServiceContext
from services.downloader.devserver import Behaviour, FileServer
from services.downloader.fetch import FetchError, Options, Progress, state_path
from services.downloader.service import run
from services.downloader.sources import (
    SourceError,
    check_file_url,
    file_roots,
    parse_hf_https,
    parse_ollama,
    resolve,
)
from services.downloader.store import Staging, obtain, sweep_partials

MiB = 1 << 20


# ---------------------------------------------------------------- pure checks


def test_file_urls_only_from_roots_and_never_from_proc_dev_sys(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.gguf").write_bytes(b"x")
    roots = [models]
    check_file_url(f"file://{models}/m.gguf", roots)
    for url in (
        f"file://{tmp_path}/other.gguf",  # beside the root, not in it
        f"file://{models}/../secret",  # climbs out
        f"file://{models}/%2e%2e/secret",
        "file:///etc/passwd",
        "file://relative/m.gguf",
    ):
        with pytest.raises(SourceError):
            check_file_url(url, roots)
    # a root of / still never reaches the kernel's files, not even through a link
    (models / "env.gguf").symlink_to("/proc/self/environ")
    for url in ("file:///proc/self/environ", "file:///dev/zero", "file:///sys/kernel/x"):
        with pytest.raises(SourceError, match="/proc, /dev or /sys"):
            check_file_url(url, [Path("/")])
    with pytest.raises(SourceError, match="/proc, /dev or /sys"):
        check_file_url(f"file://{models}/env.gguf", roots)


def test_default_roots_are_the_folders_of_the_configs_own_file_models(tmp_path: Path) -> None:
    urls = [f"file://{tmp_path}/a/m.gguf", "hf://o/r/x.gguf", f"file://{tmp_path}/b/n.gguf"]
    assert file_roots([], urls) == [tmp_path / "a", tmp_path / "b"]
    assert file_roots([Path("/srv/models")], urls) == [Path("/srv/models")]


def test_dot_segments_are_refused_in_repo_urls_and_never_reach_a_cache() -> None:
    for url in (
        "hf://owner/repo/../../../../etc/passwd",
        "hf://owner/repo/sub/%2e%2e/x.gguf",
        "hf://owner/../x/y.gguf",
        "modelscope://owner/repo/../x.gguf",
    ):
        with pytest.raises(SourceError, match=r"'\.\.'"):
            resolve(url, "m.gguf")
    for name in ("../../etc/x", "a/../b", "m:../../x", "m:a/b"):
        with pytest.raises(SourceError):
            parse_ollama(name)
    assert parse_hf_https("https://huggingface.co/o/r/resolve/main/../../../x.gguf") is None
    assert parse_hf_https("https://huggingface.co/o/r/resolve/main/x.gguf") is not None


# ---------------------------------------------------------------- disk and partial files


async def test_a_download_that_would_eat_into_the_free_margin_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.gguf"
    src.write_bytes(blob(MiB))
    store = tmp_path / "store"
    free = shutil.disk_usage(tmp_path).free
    tight = Options(min_free=free)  # 1 MiB more would go below the margin
    [source] = resolve(f"file://{src}", "m.gguf")
    with pytest.raises(FetchError, match="downloader.min_free_mib"):
        await obtain(source, store, None, tight, Progress())
    st = Staging.of(store, "m.gguf")
    assert not st.part.exists() and not st.dest.exists()
    with FileServer({"/m.gguf": blob(MiB)}) as srv:
        [source] = resolve(srv.url("m.gguf"), "m.gguf")
        with pytest.raises(FetchError, match="downloader.min_free_mib"):
            await obtain(source, store, None, tight, Progress())
    assert not st.part.exists() and not state_path(st.part).exists()


async def test_a_failed_download_is_kept_only_when_it_can_resume(tmp_path: Path) -> None:
    data = blob(2 * MiB)
    store = tmp_path / "store"
    opts = Options(connections=2, attempts=1, backoff_s=0.01, read_timeout=2)
    st = Staging.of(store, "m.gguf")
    # no Range support: nothing to resume from, so nothing is kept
    with FileServer({"/m.gguf": data}, Behaviour(ranges=False, drop_after=MiB, drops=99)) as srv:
        [source] = resolve(srv.url("m.gguf"), "m.gguf")
        with pytest.raises(FetchError):
            await obtain(source, store, None, opts, Progress())
    assert not st.part.exists()
    # ranged: the part and its resume state stay for the next request
    with FileServer({"/m.gguf": data}, Behaviour(drop_after=MiB // 4, drops=99)) as srv:
        [source] = resolve(srv.url("m.gguf"), "m.gguf")
        with pytest.raises(FetchError):
            await obtain(source, store, None, opts, Progress())
    assert st.part.exists() and state_path(st.part).exists()


def test_sweep_deletes_parts_nobody_will_resume_and_spares_running_ones(tmp_path: Path) -> None:
    store = tmp_path
    staging = {n: Staging.of(store, n) for n in ("kept.gguf", "old.gguf", "gone.gguf", "busy.gguf")}
    for st in staging.values():
        st.part.parent.mkdir(parents=True, exist_ok=True)
        st.part.write_bytes(b"x" * 100)
        state_path(st.part).write_text("{}")
    week_ago = time.time() - 8 * 24 * 3600
    for f in (staging["old.gguf"].part, state_path(staging["old.gguf"].part)):
        os.utime(f, (week_ago, week_ago))
    orphan = state_path(Staging.of(store, "orphan.gguf").part)
    orphan.write_text("{}")
    fd = os.open(staging["busy.gguf"].lock, os.O_RDWR | os.O_CREAT)  # a download in progress
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        gone = sweep_partials(store, keep={"kept.gguf", "old.gguf"})
    finally:
        os.close(fd)
    assert staging["kept.gguf"].part.exists()  # configured, recent: resumes next time
    assert not staging["old.gguf"].part.exists()  # configured, but nobody came back for it
    assert not state_path(staging["old.gguf"].part).exists()
    assert not staging["gone.gguf"].part.exists()  # no configured model uses it
    assert staging["busy.gguf"].part.exists()  # being written right now
    assert not orphan.exists()
    assert set(gone) == {staging["old.gguf"].part, staging["gone.gguf"].part, orphan}


# ---------------------------------------------------------------- over the bus


def store_files(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_file())


@pytest.fixture
async def limited(
    bus: Bus,
    tmp_path: Path,
    no_local_stores: None,  # noqa: F811
) -> AsyncIterator[Path]:
    """The downloader service with default roots: the folder of its one file:// model."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "ok.gguf").write_bytes(blob(64 * 1024))
    store = tmp_path / "store"
    # a leftover of an unconfigured model from an earlier run: swept at start
    stale = Staging.of(store, "stale.gguf")
    stale.part.parent.mkdir(parents=True)
    stale.part.write_bytes(b"x" * 1000)
    cfg = parse(
        {
            "agent": {"store": str(store), "host_id": HOST},
            "models": {"ok": {"url": f"file://{models}/ok.gguf"}},
        }
    )
    ctx = ServiceContext(name="downloader", cfg=cfg, bus=bus, host_id=HOST)
    task = asyncio.create_task(run(ctx))
    yield store
    ctx.stop.set()
    await asyncio.wait_for(task, 10)


async def test_forged_file_downloads_fail_with_a_reason_and_copy_nothing(
    bus: Bus,
    events: Events,  # noqa: F811
    limited: Path,
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model")
    tries = {
        "outside": (f"file://{secret}", "s.gguf"),
        "proc": ("file:///proc/self/environ", "p.gguf"),
        "climb": (f"file://{tmp_path}/models/../secret.txt", "c.gguf"),
        "hfdots": ("hf://o/r/../../../etc/passwd", "h.gguf"),
    }
    for model, (url, filename) in tries.items():
        await bus.command(proto.cmd_download(HOST), command(f"c-{model}", model, url, filename))
    await bus.command(
        proto.cmd_download(HOST),
        command("c-ok", "ok", f"file://{tmp_path}/models/ok.gguf", "ok.gguf"),
    )
    for model in tries:
        failed = await events.final(model)
        assert isinstance(failed, proto.DownloadFailed), failed
    assert "downloader.file_roots" in (await events.final("outside")).reason
    assert "/proc, /dev or /sys" in (await events.final("proc")).reason
    assert "'..'" in (await events.final("hfdots")).reason
    assert isinstance(await events.final("ok"), proto.DownloadCompleted)
    assert store_files(limited) == ["ok.gguf"]
    assert not Staging.of(limited, "stale.gguf").part.exists()  # swept at start
