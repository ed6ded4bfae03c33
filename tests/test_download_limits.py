"""What a download cannot do, even from the downloader's own config: read local files outside
the configured roots (never /proc, /dev or /sys; a symlink inside a root that leads out of it
counts as outside), climb out of a repo with `..`, fill the disk past the configured margin,
or leave unfinished files behind that nobody will resume."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import time
from pathlib import Path

import pytest
from test_download_service import (
    HOST,
    Events,
    ask,
    blob,
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


def test_only_the_resolved_path_of_a_file_url_counts(tmp_path: Path) -> None:
    """A symlink inside a root that points out of every root is refused, naming where it
    leads; one that stays inside is fine, and so is a root that is itself a link."""
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.gguf").write_bytes(b"not yours")
    (models / "real.gguf").write_bytes(b"GGUF")
    (models / "escape.gguf").symlink_to(elsewhere / "secret.gguf")
    (models / "sub").symlink_to(elsewhere)  # a folder link: the file's path is inside lexically
    (models / "alias.gguf").symlink_to(models / "real.gguf")
    for url in (f"file://{models}/escape.gguf", f"file://{models}/sub/secret.gguf"):
        with pytest.raises(SourceError) as e:
            check_file_url(url, [models])
        assert f"resolves to {elsewhere / 'secret.gguf'}" in str(e.value)
        assert "downloader.file_roots" in str(e.value) and "symlink" in str(e.value)
    assert check_file_url(f"file://{models}/alias.gguf", [models]) == models / "real.gguf"
    (tmp_path / "link-root").symlink_to(models)
    assert check_file_url(f"file://{models}/real.gguf", [tmp_path / "link-root"]) == (
        models / "real.gguf"
    )


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


async def test_file_urls_of_the_config_itself_are_refused_outside_the_roots(
    bus: Bus,
    events: Events,  # noqa: F811
    tmp_path: Path,
    no_local_stores: None,  # noqa: F811
) -> None:
    """Models whose own url leads out of downloader.file_roots (a folder beside it, /proc, a
    `..`, a symlink inside the root, a repo path climbing out) are refused: a command.refused
    and a download.failed naming why, nothing copied. A model inside the root is fetched."""
    models_dir, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models_dir.mkdir()
    elsewhere.mkdir()
    (models_dir / "ok.gguf").write_bytes(blob(64 * 1024))
    secret = elsewhere / "secret.gguf"
    secret.write_text("not a model")
    (models_dir / "link.gguf").symlink_to(secret)
    store = tmp_path / "store"
    # a leftover of an unconfigured model from an earlier run: swept at start
    stale = Staging.of(store, "stale.gguf")
    stale.part.parent.mkdir(parents=True)
    stale.part.write_bytes(b"x" * 1000)
    urls = {
        "ok": f"file://{models_dir}/ok.gguf",
        "outside": f"file://{secret}",
        "proc": "file:///proc/self/environ",
        "climb": f"file://{models_dir}/../elsewhere/secret.gguf",
        "link": f"file://{models_dir}/link.gguf",
        "hfdots": "hf://o/r/../../../etc/passwd",
    }
    models = {name: {"url": url} for name, url in urls.items()}
    cfg = parse(
        {
            "agent": {"store": str(store), "host_id": HOST},
            "downloader": {"file_roots": [str(models_dir)]},
            "models": models,
        }
    )
    refused: list[proto.CommandRefused] = []

    async def on_refused(msg) -> None:  # type: ignore[no-untyped-def]
        refused.append(proto.decode(msg.data, proto.CommandRefused))

    sub = await bus.nc.subscribe(proto.evt("command.refused"), cb=on_refused)
    ctx = ServiceContext(name="downloader", cfg=cfg, bus=bus, host_id=HOST)
    task = asyncio.create_task(run(ctx))
    try:
        for model in urls:
            await bus.command(proto.cmd_download(HOST), ask(f"c-{model}", model, models))
        failed = {m: await events.final(m) for m in urls if m != "ok"}
        done = await events.final("ok")
    finally:
        await sub.unsubscribe()
        ctx.stop.set()
        await asyncio.wait_for(task, 10)
    assert all(isinstance(f, proto.DownloadFailed) for f in failed.values()), failed
    assert "downloader.file_roots" in failed["outside"].reason
    assert "/proc, /dev or /sys" in failed["proc"].reason
    assert "downloader.file_roots" in failed["climb"].reason
    assert f"resolves to {secret}" in failed["link"].reason
    assert "symlink" in failed["link"].reason
    assert "'..'" in failed["hfdots"].reason
    why = {r.model: r.reason for r in refused}
    assert why == {m: f.reason for m, f in failed.items()}  # each refusal said so, once
    assert isinstance(done, proto.DownloadCompleted)
    assert store_files(store) == [done.filename]
    assert not Staging.of(store, "stale.gguf").part.exists()  # swept at start
