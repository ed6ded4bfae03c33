"""The downloader's fetching, verification, URL forms and reuse, against a real local HTTP
server and real files (no NATS here; see test_download_service.py for the bus)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from services.downloader.devserver import Behaviour, FileServer
from services.downloader.fetch import (
    CHUNK_MIN,
    FetchError,
    Options,
    Progress,
    check_disk,
    chunk_size,
    content_range,
    state_path,
)
from services.downloader.sources import (
    SourceError,
    check_filename,
    parse_ollama,
    resolve,
    split_names,
)
from services.downloader.store import Outcome, Staging, StoreConflict, obtain

MiB = 1 << 20
FAST = Options(connections=4, backoff_s=0.02, read_timeout=5)


def blob(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"x" * (n % 32)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def get(
    url: str,
    store: Path,
    filename: str = "m.gguf",
    sha256: str | None = None,
    opts: Options = FAST,
    progress: Progress | None = None,
    ollama: list[Path] | None = None,
    hf: list[Path] | None = None,
    model: str = "m",
) -> Outcome:
    sources = resolve(url, filename)
    outs = [
        await obtain(
            s,
            store,
            sha256 if i == 0 else None,
            opts,
            progress or Progress(),
            ollama or [],
            hf or [],
            model=model,
        )
        for i, s in enumerate(sources)
    ]
    return outs[0] if len(outs) == 1 else Outcome(sum(o.size for o in outs), outs[0].reused)


def rot_in_place(path: Path) -> int:
    """Bit rot: bytes change, inode, size and mtime do not (what a disk error looks like).
    Returns the inode."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.write(b"\0" * 64)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return stat.st_ino


def only_final_files(store: Path) -> list[str]:
    """Files a reader of the store could pick up (the staging dir is not one of them)."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if ".lls" not in p.parts)


# ------------------------------------------------------------------ HTTP


async def test_ranged_download_uses_parallel_connections_and_is_byte_identical(tmp_path: Path):
    data = blob(10 * MiB + 123)
    with FileServer({"/m.gguf": data}) as srv:
        out = await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))
    assert out == Outcome(len(data), None)
    assert (tmp_path / "m.gguf").read_bytes() == data
    n_chunks = -(-len(data) // chunk_size(len(data), FAST.connections))
    assert srv.stats.range_requests == n_chunks + 1  # + the probe
    assert srv.stats.bytes_sent == len(data) + 1
    assert not state_path(Staging.of(tmp_path, "m.gguf").part).exists()
    assert not Staging.of(tmp_path, "m.gguf").part.exists()


async def test_server_without_range_support_falls_back_to_one_stream(tmp_path: Path):
    data = blob(3 * MiB)
    with FileServer({"/m.gguf": data}, Behaviour(ranges=False)) as srv:
        out = await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))
    assert out.size == len(data)
    assert (tmp_path / "m.gguf").read_bytes() == data
    assert srv.stats.range_requests == 0
    assert srv.stats.requests == 2  # probe, then the one stream


async def test_dropped_connections_are_retried_from_where_they_stopped(tmp_path: Path):
    data = blob(6 * MiB)
    behaviour = Behaviour(drop_after=300_000, drops=5)
    with FileServer({"/m.gguf": data}, behaviour) as srv:
        out = await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))
    assert out.size == len(data)
    assert (tmp_path / "m.gguf").read_bytes() == data
    assert behaviour.drops == 0  # every drop happened
    # what arrived before a drop was kept: nothing was fetched twice
    assert srv.stats.bytes_sent <= len(data) + 1


async def test_dropped_single_stream_restarts_and_completes(tmp_path: Path):
    data = blob(2 * MiB)
    with FileServer({"/m.gguf": data}, Behaviour(ranges=False, drop_after=MiB, drops=2)) as srv:
        await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))
    assert (tmp_path / "m.gguf").read_bytes() == data


async def test_wrong_sha256_publishes_nothing_and_says_why(tmp_path: Path):
    data = blob(2 * MiB)
    with FileServer({"/m.gguf": data}) as srv:
        with pytest.raises(FetchError, match="sha256 mismatch.*fix the model's sha256") as e:
            await get(srv.url("m.gguf"), tmp_path, sha256="0" * 64)
    assert sha(data) in str(e.value)
    assert only_final_files(tmp_path) == []
    assert not Staging.of(tmp_path, "m.gguf").part.exists()


async def test_missing_file_and_denied_access_fail_with_actionable_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with FileServer({}) as srv:
        with pytest.raises(FetchError, match="not found .*404.*check the repository"):
            await get(srv.url("nope.gguf"), tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FileServer({"/m.gguf": b"x"}, Behaviour(token="secret")) as srv:
        with pytest.raises(FetchError, match="HTTP 401.*HF_TOKEN"):
            await get(srv.url("m.gguf"), tmp_path)
    assert only_final_files(tmp_path) == []


async def test_unreachable_server_fails_after_bounded_retries(tmp_path: Path):
    with FileServer({}) as srv:
        url = srv.url("m.gguf")
    opts = Options(connections=2, attempts=3, backoff_s=0.01, connect_timeout=1)
    with pytest.raises(FetchError, match="failed after 3 tries: could not connect"):
        await asyncio.wait_for(get(url, tmp_path, opts=opts), 10)


async def test_interrupted_download_resumes_from_disk_without_refetching(tmp_path: Path):
    data = blob(8 * MiB)
    conns = 4
    rate = 2e6  # per connection: the whole file takes about 1 s
    opts = Options(connections=conns, backoff_s=0.02)
    with FileServer({"/m.gguf": data}, Behaviour(rate_bps=rate)) as srv:
        first = asyncio.create_task(get(srv.url("m.gguf"), tmp_path, opts=opts))
        part = Staging.of(tmp_path, "m.gguf").part
        while True:  # until the resume state covers 2 MiB
            await asyncio.sleep(0.05)
            if state_path(part).exists():
                if sum(json.loads(state_path(part).read_text())["done"]) > 2 * MiB:
                    break
        first.cancel()  # like a stop of the service mid-file
        with pytest.raises(asyncio.CancelledError):
            await first
        assert only_final_files(tmp_path) == []
        saved = sum(json.loads(state_path(part).read_text())["done"])
        sent_before = srv.stats.bytes_sent
        progress = Progress()
        await get(srv.url("m.gguf"), tmp_path, sha256=sha(data), opts=opts, progress=progress)
    assert (tmp_path / "m.gguf").read_bytes() == data
    assert progress.resumed == saved
    # only the rest (+ the probe, + what cancelled connections still had in the server's pipe)
    assert srv.stats.bytes_sent - sent_before <= len(data) - saved + 1 + conns * 64 * 1024
    refetched = srv.stats.bytes_sent - len(data) - 2
    assert refetched <= conns * chunk_size(len(data), conns)


async def test_changed_file_on_the_server_restarts_instead_of_mixing_versions(tmp_path: Path):
    old, new = blob(4 * MiB, 1), blob(4 * MiB + 7, 2)
    st = Staging.of(tmp_path, "m.gguf")
    st.part.parent.mkdir(parents=True)
    st.part.write_bytes(old)
    state_path(st.part).write_text(
        json.dumps(
            {"total": len(old), "validator": '"x"', "chunk": CHUNK_MIN, "done": [CHUNK_MIN] * 4}
        )
    )
    with FileServer({"/m.gguf": new}) as srv:
        await get(srv.url("m.gguf"), tmp_path, sha256=sha(new))
    assert (tmp_path / "m.gguf").read_bytes() == new


async def test_file_in_the_store_completes_without_a_request(tmp_path: Path):
    data = blob(MiB)
    (tmp_path / "m.gguf").write_bytes(data)
    with FileServer({"/m.gguf": data}) as srv:
        out = await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))
        again = await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))  # digest cached
    assert out == again == Outcome(len(data), "store")
    assert srv.stats.requests == 0


async def test_a_mismatching_store_file_is_replaced_only_if_written_for_that_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A file the downloader did not write for the model is reported (path and both hashes)
    and kept; one it wrote, unchanged since but no longer matching (bit rot, its cached
    digest lost), is fetched again and replaced by an atomic rename."""
    data, other = blob(MiB, 3), b"someone else's model"
    dest = tmp_path / "m.gguf"
    dest.write_bytes(other)
    with FileServer({"/m.gguf": data}) as srv:
        with pytest.raises(StoreConflict) as e:
            await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))
        assert srv.stats.requests == 0
    assert dest.read_bytes() == other
    for text in (str(e.value), caplog.text):
        assert str(dest) in text and sha(data) in text and sha(other) in text, text

    dest.unlink()
    with FileServer({"/m.gguf": data}) as srv:
        await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))  # written for "m"
        st = Staging.of(tmp_path, "m.gguf")
        with pytest.raises(StoreConflict):  # written for m, but this is model n asking
            await get(srv.url("m.gguf"), tmp_path, sha256=sha(other), model="n")
        rotten = rot_in_place(dest)
        st.digest.unlink()
        out = await get(srv.url("m.gguf"), tmp_path, sha256=sha(data))
    assert out.reused is None and dest.read_bytes() == data
    assert dest.stat().st_ino != rotten  # renamed into place, not written over


async def test_file_url_is_copied_verified_and_renamed(tmp_path: Path):
    src = tmp_path / "src" / "my model.gguf"
    src.parent.mkdir()
    data = blob(3 * MiB + 5)
    src.write_bytes(data)
    store = tmp_path / "store"
    out = await get("file://" + str(src).replace(" ", "%20"), store, sha256=sha(data))
    assert out == Outcome(len(data), None)
    assert (store / "m.gguf").read_bytes() == data
    assert os.stat(store / "m.gguf").st_ino != os.stat(src).st_ino  # a copy, not a link
    with pytest.raises(FetchError, match="file not found"):
        await get("file:///nonexistent/x.gguf", store, "x.gguf")


def test_disk_space_is_checked_before_starting(tmp_path: Path):
    with pytest.raises(FetchError, match="not enough disk space.*free some space"):
        check_disk(tmp_path, 1 << 60)
    check_disk(tmp_path, 1024)


# ------------------------------------------------------------------ URL forms


async def test_hf_url_uses_the_endpoint_override_token_and_redirects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    data = blob(2 * MiB)
    path = "/org/repo/resolve/v1.0/sub/m.gguf"
    with FileServer({"/cdn/blob": data}, Behaviour(token="tok")) as srv:
        # another origin (localhost, not 127.0.0.1), as a CDN is
        srv.behaviour.redirects[path] = f"http://localhost:{srv.port}/cdn/blob"
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.port}")
        monkeypatch.setenv("HF_TOKEN", "tok")
        out = await get("hf://org/repo@v1.0/sub/m.gguf", tmp_path, sha256=sha(data))
    assert out.size == len(data)
    assert srv.stats.paths[path] == 1  # resolved once; chunks go to the redirect target
    assert srv.stats.paths["/cdn/blob"] > 2
    assert srv.stats.authorized == {path}  # the token never reaches the redirect target


async def test_expired_redirect_target_is_resolved_again(tmp_path: Path):
    data = blob(4 * MiB)
    with FileServer({"/cdn/blob": data}, Behaviour(target_uses=2)) as srv:
        srv.behaviour.redirects["/f.gguf"] = f"http://localhost:{srv.port}/cdn/blob"
        out = await get(srv.url("f.gguf"), tmp_path, sha256=sha(data))
    assert out.size == len(data)
    assert srv.stats.paths["/f.gguf"] > 2  # resolved again after targets expired


async def test_split_gguf_downloads_every_part_next_to_the_first(tmp_path: Path):
    parts = {f"/x/m-{i:05d}-of-00003.gguf": blob(MiB + i, i) for i in (1, 2, 3)}
    with FileServer(parts) as srv:
        out = await get(srv.url("x/m-00001-of-00003.gguf"), tmp_path, "m-00001-of-00003.gguf")
    assert out.size == sum(len(d) for d in parts.values())
    for name, d in parts.items():
        assert (tmp_path / name.rsplit("/", 1)[1]).read_bytes() == d


def test_url_forms_resolve_to_http_urls(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_MIRROR", raising=False)
    monkeypatch.setenv("HF_TOKEN", "t")
    [s] = resolve("hf://bartowski/Qwen-GGUF/q4/Qwen-Q4_K_M.gguf", "q.gguf")
    assert s.url == "https://huggingface.co/bartowski/Qwen-GGUF/resolve/main/q4/Qwen-Q4_K_M.gguf"
    assert s.headers == {"Authorization": "Bearer t"}
    assert s.hf is not None and s.hf.repo == "bartowski/Qwen-GGUF" and s.hf.revision is None
    [s] = resolve("hf://o/r@abc123/f.gguf", "f.gguf")
    assert s.url.endswith("/o/r/resolve/abc123/f.gguf")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://ms.local")
    [s] = resolve("modelscope://Qwen/Qwen-GGUF/a b.gguf", "a.gguf")
    assert s.url == "http://ms.local/models/Qwen/Qwen-GGUF/resolve/master/a%20b.gguf"
    [s] = resolve("https://huggingface.co/o/r/resolve/main/f.gguf", "f.gguf")
    assert s.hf is not None and s.hf.path == "f.gguf"  # reusable from the HF cache too
    srcs = resolve("hf://o/r/big-00001-of-00002.gguf", "big-00001-of-00002.gguf")
    assert [s.url.rsplit("/", 1)[1] for s in srcs] == [
        "big-00001-of-00002.gguf",
        "big-00002-of-00002.gguf",
    ]
    assert srcs[1].hf is not None and srcs[1].hf.path == "big-00002-of-00002.gguf"
    named = resolve("hf://o/r/big-00001-of-00002.gguf", "my-model.gguf")
    assert [s.filename for s in named] == [
        "my-model-00001-of-00002.gguf",
        "my-model-00002-of-00002.gguf",
    ]
    with pytest.raises(SourceError, match="owner/repo"):
        resolve("hf://only-repo/file.gguf", "f.gguf")
    with pytest.raises(SourceError, match="unsupported URL"):
        resolve("ftp://x/y.gguf", "y.gguf")


def test_store_file_names_must_stay_inside_the_store():
    for bad in ("", "/etc/passwd", "../x.gguf", "a/../../x", ".lls/x.part"):
        with pytest.raises(SourceError, match="inside the model store"):
            check_filename(bad)
    assert check_filename("sub/x.gguf") == "sub/x.gguf"
    assert split_names("a-00002-of-00003.gguf") == ["a-00002-of-00003.gguf"]
    assert len(split_names("a-00001-of-00003.gguf")) == 3
    assert content_range("bytes 0-0/42") == (0, 42) and content_range("bytes */7") == (None, 7)
    r = parse_ollama("llama3.2:1b")
    assert (r.namespace, r.name, r.tag) == ("library", "llama3.2", "1b")
    assert parse_ollama("me/x").tag == "latest"


# ------------------------------------------------------------------ reuse


def ollama_store(root: Path, name: str, tag: str, data: bytes) -> Path:
    digest = sha(data)
    blob_path = root / "blobs" / f"sha256-{digest}"
    blob_path.parent.mkdir(parents=True, exist_ok=True)
    blob_path.write_bytes(data)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return blob_path


def hf_cache(root: Path, repo: str, path: str, data: bytes, commit: str = "c0ffee") -> Path:
    base = root / ("models--" + repo.replace("/", "--"))
    blob_path = base / "blobs" / sha(data)
    blob_path.parent.mkdir(parents=True)
    blob_path.write_bytes(data)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    link = base / "snapshots" / commit / path
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob_path, link.parent))
    return blob_path


async def test_ollama_store_blob_is_hard_linked_instead_of_downloaded(tmp_path: Path):
    data = blob(MiB, 7)
    ollama = tmp_path / "ollama"
    blob_path = ollama_store(ollama, "tiny", "q4", data)
    store = tmp_path / "store"
    with FileServer({"/m.gguf": data}) as srv:
        out = await get(srv.url("m.gguf"), store, sha256=sha(data), ollama=[ollama])
        by_name = await get("ollama://tiny:q4", store, "named.gguf", ollama=[ollama])
    assert out == Outcome(len(data), f"ollama:{blob_path}")
    assert by_name.reused == f"ollama:{blob_path}"
    assert srv.stats.requests == 0
    assert os.stat(store / "m.gguf").st_ino == os.stat(blob_path).st_ino
    with pytest.raises(FetchError, match="ollama pull"):
        await get("ollama://absent", store, "absent.gguf", ollama=[ollama])


async def test_hf_cache_snapshot_is_reused_for_hf_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    data = blob(MiB, 8)
    cache = tmp_path / "hub"
    blob_path = hf_cache(cache, "org/repo", "sub/m.gguf", data)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: must not be used
    store = tmp_path / "store"
    out = await get("hf://org/repo/sub/m.gguf", store, "m.gguf", hf=[cache])
    assert out == Outcome(len(data), f"hf-cache:{blob_path}")
    assert (store / "m.gguf").read_bytes() == data
    # a pinned revision that is not cached is not satisfied by another snapshot
    with pytest.raises(FetchError):
        await get(
            "hf://org/repo@other/sub/m.gguf",
            store,
            "pinned.gguf",
            hf=[cache],
            opts=Options(connections=1, attempts=1, connect_timeout=1),
        )


async def test_cached_copy_with_wrong_checksum_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    data, other = blob(MiB, 1), blob(MiB, 2)
    cache = tmp_path / "hub"
    hf_cache(cache, "org/repo", "m.gguf", other)
    with FileServer({"/org/repo/resolve/main/m.gguf": data}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.port}")
        out = await get("hf://org/repo/m.gguf", tmp_path / "s", sha256=sha(data), hf=[cache])
    assert out.reused is None and (tmp_path / "s" / "m.gguf").read_bytes() == data
