"""The downloader service: DownloadFile commands in; progress, completed and failed events out.
DeleteFile commands remove a configured model's file from the store (file.deleted / failed).

It also reads models' headers from their sources on InspectModel commands (one consumer that
every downloader shares), so the placer knows a model's memory before anything is fetched.

One durable pull consumer per host on the command stream. Each command runs in its own task
(at most downloader.max_parallel at once; the rest wait in the stream), is kept alive with in_progress()
while it runs, and is acked once its outcome is on the bus: failures are events, not endless
redeliveries. Commands for a file already being fetched join that download.

It trusts no command (admit.py): a command whose url, sha256 or file name is not what its
own config gives the model is refused (a command.refused event, acked, nothing fetched), after
waiting up to RELOAD_GRACE_S for a config reload that may be under way. A file:// source
must resolve (symlinks and `..` followed) to a path under downloader.file_roots (default: the
folders of the config's own file:// models), never /proc, /dev or /sys; the file actually
opened is checked again. A store file that does not match its sha256 is replaced only if this
downloader wrote it for that model (store.py's write records), else reported and left alone.
Unfinished downloads nobody will resume are swept at start and before each new download, and
a download that would leave less than downloader.min_free_mib free on the store's disk is
refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
from nats.aio.msg import Msg

import proto
from lls.bus import Bus
from lls.config import Config, ModelConfig, expand, legacy_store_filename, store_filename_of
from lls.consume import consume
from lls.fence import Fence
from lls.service import ServiceContext
from services.downloader import admit
from services.downloader.admit import Command
from services.downloader.fetch import FetchError, Options, Progress
from services.downloader.peek import peek
from services.downloader.sources import (
    Source,
    SourceError,
    check_file_url,
    check_real_path,
    file_roots,
    resolve,
    split_names,
)
from services.downloader.store import Outcome, obtain, remove, sweep_partials

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5  # at most 2 progress events per second per command
RATE_WINDOW_S = 5.0
KEEPALIVE_S = 10.0  # well inside the consumer's 30 s ack_wait
INSPECT_TIMEOUT_S = 20.0  # reading one header; inside the consumer's 30 s ack_wait
# A command that disagrees with the config waits this long for a reload before it is refused:
# `lls reload` signals every service at once, and the placer may send the new url first.
RELOAD_GRACE_S = 2.0


@dataclass
class _Job:
    """One running fetch of one store file (all parts of a split GGUF)."""

    sha256: str | None
    parts: list[Progress] = field(default_factory=list)
    task: asyncio.Task[Outcome] | None = None

    def snapshot(self) -> tuple[int, int | None, int]:
        """(bytes on disk, total if known, bytes moved during this run)."""
        done = sum(p.done for p in self.parts)
        totals = [p.total for p in self.parts]
        total = None if not totals or None in totals else sum(t for t in totals if t is not None)
        moved = sum(max(0, p.done - p.resumed) for p in self.parts)
        return done, total, moved


def failure_text(e: BaseException, timeout_s: float) -> str:
    if isinstance(e, FetchError | SourceError):
        return str(e)
    if isinstance(e, TimeoutError):
        return (
            f"the download did not finish within downloader.timeout ({timeout_s:g} s); raise "
            "it for large files or check the network. What was downloaded is kept and resumes."
        )
    return f"unexpected downloader error: {e!r}; see the downloader log"


class Downloader:
    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        host_id: str,
        *,
        opts: Options | None = None,
        ollama_roots: list[Path] | None = None,
        hf_roots: list[Path] | None = None,
    ):
        self.bus = bus
        self.host = host_id
        self.store = cfg.store_dir()
        self.timeout = cfg.downloader.timeout
        self.opts = opts or Options(
            connections=cfg.downloader.connections,
            min_free=cfg.downloader.min_free_mib << 20,
        )
        self.file_roots = file_roots(
            [expand(r) for r in cfg.downloader.file_roots],
            [m.url for m in cfg.models.values()],
        )
        # store files of configured models: their unfinished downloads are worth resuming
        self.keep = {
            name
            for model, m in cfg.models.items()
            for name in split_names(store_filename_of(model, m))
        }
        # what a command for a model must carry (admit.refusal): its url, sha256, store file
        self.models: dict[str, ModelConfig] = dict(cfg.models)
        self.grace = RELOAD_GRACE_S
        self.reloaded = asyncio.Event()  # set (and replaced) by each config reload
        self.ollama_roots = ollama_roots
        self.hf_roots = hf_roots
        self.jobs: dict[Path, _Job] = {}
        self.max_active = cfg.downloader.max_parallel
        self.fence = Fence()  # the highest placer epoch seen: older commands are refused

    # ------------------------------------------------------------ the consumer loop

    async def serve(self, stop: asyncio.Event) -> None:
        inspections = asyncio.create_task(
            consume(
                self.bus,
                "inspector",
                proto.cmd_inspect(),
                self._on_inspect,
                stop,
                stream=proto.CMDS_STREAM,
            )
        )
        lease = asyncio.create_task(self.fence.follow(self.bus, stop))
        try:
            await self._serve_downloads(stop)
        finally:
            inspections.cancel()
            lease.cancel()
            await asyncio.gather(inspections, lease, return_exceptions=True)

    async def _serve_downloads(self, stop: asyncio.Event) -> None:
        subject = proto.cmd_download(self.host)
        self.store.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(sweep_partials, self.store, self.keep)
        log.info("downloading into %s, commands on %s", self.store, subject)
        active: set[asyncio.Task[None]] = set()
        try:
            await consume(
                self.bus,
                f"downloader-{self.host}",
                subject,
                self._on_message,
                stop,
                stream=proto.CMDS_STREAM,
                tasks=active,
                concurrency=self.max_active,
            )
        finally:
            for t in list(active):
                t.cancel()
            await asyncio.gather(*active, return_exceptions=True)
            await self.close()

    async def close(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task]
        for t in tasks:
            t.cancel()  # resume state is saved on the way out
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_message(self, msg: Msg) -> None:
        try:
            cmd = proto.decode(msg.data, proto.DownloaderCommand)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.error("dropping a malformed download command: %s", e)
            await msg.term()
            return
        if await self._refused_stale(cmd, msg):
            return
        keepalive = asyncio.create_task(_keep_alive(msg))
        event: proto.Event
        try:
            why = await self.refusal(cmd)
            if why is not None:
                await self._refuse(cmd, why, msg)
                return
            if isinstance(cmd, proto.DeleteFile):
                event = await self.delete(cmd)
            else:
                event = await self.handle(cmd)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()  # stopping: hand it back for the next downloader start
            raise
        finally:
            keepalive.cancel()
        await self._emit(event)
        try:
            await msg.ack()
        except Exception as e:  # noqa: BLE001 - redelivery is harmless: commands are idempotent
            log.warning("ack of %s failed: %r", cmd.cmd_id, e)

    # ------------------------------------------------------------ one command

    async def handle(
        self, cmd: proto.DownloadFile
    ) -> proto.DownloadCompleted | proto.DownloadFailed:
        """Bring cmd.filename into the store; the outcome as the event to publish."""
        log.info("download %s: %s -> %s", cmd.model, cmd.url, cmd.filename)
        try:
            sources = self._sources(cmd.url, cmd.filename)
            job = await self._job_for(cmd, sources)
        except SourceError as e:
            return self._failed(cmd, e)
        reporter = asyncio.create_task(self._report(cmd, job))
        try:
            assert job.task is not None
            outcome = await asyncio.shield(job.task)  # a joiner's cancel must not kill the job
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an event
            return self._failed(cmd, e)
        finally:
            reporter.cancel()
        log.info(
            "done %s: %s, %d bytes, reused=%s",
            cmd.model,
            cmd.filename,
            outcome.size,
            outcome.reused,
        )
        return proto.DownloadCompleted(
            model=cmd.model,
            host=self.host,
            filename=sources[0].filename,  # a split model's first part
            size=outcome.size,
            reused=outcome.reused,
        )

    async def delete(self, cmd: proto.DeleteFile) -> proto.FileDeleted | proto.FileDeleteFailed:
        """Remove a configured model's store file (all its parts); absent is success. Only the
        name this config gives that model (self.refusal checked it), as a plain name in the
        store: a command cannot name any other file."""
        existed = False
        why, busy = self._refuse_delete(cmd)
        if not why:
            try:
                for name in split_names(cmd.filename):
                    existed = await remove(self.store, name) or existed
            except TimeoutError:  # another downloader process holds the file's lock
                busy = True
                why = f"{cmd.filename} is being written on {self.host}; delete it once that ends"
            except OSError as e:
                why = f"could not delete {cmd.filename} on {self.host}: {e.strerror or e}"
        if why:
            log.warning("delete %s refused: %s", cmd.model, why)
            return proto.FileDeleteFailed(
                model=cmd.model,
                host=self.host,
                filename=cmd.filename,
                reason=why,
                cmd_id=cmd.cmd_id,
                busy=busy,
            )
        log.info("deleted %s: %s (%s)", cmd.model, cmd.filename, "done" if existed else "absent")
        return proto.FileDeleted(
            model=cmd.model,
            host=self.host,
            filename=cmd.filename,
            cmd_id=cmd.cmd_id,
            existed=existed,
        )

    def _refuse_delete(self, cmd: proto.DeleteFile) -> tuple[str, bool]:
        """(why a DeleteFile must not run here or '', whether only because the file is busy).
        Its model and file name are the config's already (self.refusal)."""
        expected = cmd.filename
        names = split_names(expected)
        if any(Path(n).name != n or n in (".", "..") for n in names):  # store_filename's job
            return f"file {expected!r} is not a plain name in the store", False
        for n in names:
            job = self.jobs.get(self.store / n)
            if job is not None and job.task is not None and not job.task.done():
                why = f"{expected} is being downloaded on {self.host}; delete it once that ends"
                return why, True
        return "", False

    def _sources(self, url: str, filename: str) -> list[Source]:
        """What to fetch, refusing local files outside the allowed roots."""
        sources = resolve(url, filename)
        for src in sources:
            if src.url.startswith("file://"):
                check_file_url(src.url, self.file_roots)
        return sources

    def _file_check(self, url: str) -> Callable[[Path], None]:
        """The roots check of the file a file:// download actually opened (see copy_file)."""
        roots = self.file_roots
        return lambda real: check_real_path(url, real, roots)

    def _failed(self, cmd: proto.DownloadFile, e: BaseException) -> proto.DownloadFailed:
        if not isinstance(e, FetchError | SourceError | TimeoutError):
            log.error("download %s failed", cmd.model, exc_info=e)
        reason = failure_text(e, self.timeout)
        log.warning("download %s failed: %s", cmd.model, reason)
        return proto.DownloadFailed(model=cmd.model, host=self.host, reason=reason)

    async def _job_for(self, cmd: proto.DownloadFile, sources: list[Source]) -> _Job:
        key = self.store / sources[0].filename
        sha = cmd.sha256.lower() if cmd.sha256 else None
        while (job := self.jobs.get(key)) is not None and job.task and not job.task.done():
            if sha is None or job.sha256 == sha:
                log.info("%s joins the running download of %s", cmd.cmd_id, key.name)
                return job
            # Another checksum for the same name: let that one finish, then check ours.
            await asyncio.wait({job.task})
        await asyncio.to_thread(sweep_partials, self.store, self.keep)
        job = _Job(sha256=sha)
        job.task = asyncio.create_task(self._run_job(cmd, sources, job))
        self.jobs[key] = job

        def forget(t: asyncio.Task[Outcome]) -> None:
            if self.jobs.get(key) is job:
                del self.jobs[key]
            if not t.cancelled():
                t.exception()  # retrieved here so an unawaited failure is not logged twice

        job.task.add_done_callback(forget)
        return job

    async def _run_job(self, cmd: proto.DownloadFile, sources: list[Source], job: _Job) -> Outcome:
        async with asyncio.timeout(self.timeout):
            size = 0
            reused: list[str | None] = []
            for i, src in enumerate(sources):
                progress = Progress()
                job.parts.append(progress)
                # A split model's checksum can only name one file: the first part.
                out = await obtain(
                    src,
                    self.store,
                    job.sha256 if i == 0 else None,
                    self.opts,
                    progress,
                    self.ollama_roots,
                    self.hf_roots,
                    # a whole file from before the upgrade; a split one's other parts are
                    # unverifiable, so those are fetched again
                    legacy=legacy_store_filename(cmd.model) if len(sources) == 1 else None,
                    model=cmd.model,
                    opened=self._file_check(src.url),
                )
                size += out.size
                reused.append(out.reused)
        origin = None if None in reused else ", ".join(dict.fromkeys(r for r in reused if r))
        return Outcome(size, origin)

    async def _report(self, cmd: proto.DownloadFile, job: _Job) -> None:
        samples: collections.deque[tuple[float, int]] = collections.deque()
        last: tuple[int, int | None] | None = None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            done, total, moved = job.snapshot()
            now = time.monotonic()
            samples.append((now, moved))
            while samples and now - samples[0][0] > RATE_WINDOW_S:
                samples.popleft()
            if (done, total) == last:
                continue
            last = (done, total)
            t0, m0 = samples[0]
            rate = max(0.0, (moved - m0) / (now - t0)) if now > t0 else 0.0  # a restart dips
            eta = (total - done) / rate if total is not None and rate > 0 else None
            await self._emit(
                proto.DownloadProgress(
                    model=cmd.model,
                    host=self.host,
                    bytes=done,
                    total=total,
                    rate_bps=round(rate, 1),
                    eta_s=round(eta, 1) if eta is not None else None,
                )
            )

    # ------------------------------------------------------------ header inspection

    async def _on_inspect(self, msg: Msg) -> None:
        try:
            cmd = proto.decode(msg.data, proto.InspectModel)
        except msgspec.DecodeError as e:
            log.error("dropping a malformed inspect command: %s", e)
            await msg.term()
            return
        if await self._refused_stale(cmd, msg):
            return
        why = await self.refusal(cmd)
        if why is not None:  # its record is not overwritten: it may be the real model's
            await self._refuse(cmd, why, msg)
            return
        info = await self.inspect(cmd)
        try:
            await self.bus.put(self.bus.models, cmd.model, info)
        except Exception as e:  # noqa: BLE001 - not acked: redelivered and tried again
            log.warning("could not store the header of %s: %r", cmd.model, e)
            return
        ok = info.gguf is not None
        summary = info.error if not ok else describe(info)
        await self._emit(proto.ModelInspected(model=cmd.model, summary=summary, ok=ok))
        with contextlib.suppress(Exception):  # a redelivery only reads the header again
            await msg.ack()

    async def inspect(self, cmd: proto.InspectModel) -> proto.ModelInfo:
        """The model's header and size from its source, or why they could not be read."""
        log.info("inspect %s: %s", cmd.model, cmd.url)
        info = proto.ModelInfo(model=cmd.model, url=cmd.url, ts=time.time())
        try:
            self._sources(cmd.url, cmd.filename)  # the same limits as a download
        except SourceError as e:
            await self._refused(cmd, str(e))
            info.error = str(e)
            return info
        try:
            async with asyncio.timeout(INSPECT_TIMEOUT_S):
                p = await peek(cmd.url, cmd.filename, self.opts, self.ollama_roots, self.hf_roots)
        except TimeoutError:
            info.error = f"its header could not be read within {INSPECT_TIMEOUT_S:g} s"
        except (FetchError, ValueError) as e:  # SourceError is a ValueError
            info.error = str(e)
        except httpx.HTTPError as e:
            info.error = f"{cmd.url}: {e or type(e).__name__}"
        else:
            info.size, info.gguf = p.size, p.summary
        if info.error:
            log.warning("inspect %s: %s", cmd.model, info.error)
        return info

    async def _refused_stale(self, cmd: Command, msg: Msg) -> bool:
        """A deposed placer's command (lls/fence.py): not run, acked (never redelivered), and
        a CommandRefused says why."""
        why = self.fence.admit(cmd.epoch)
        if why is None:
            return False
        await self._refused(cmd, why)
        with contextlib.suppress(Exception):
            await msg.ack()
        return True

    async def refusal(self, cmd: Command) -> str | None:
        """Why `cmd` must not run here (admit.refusal, then where a download's files would
        come from), or None. A config mismatch is looked at again after the next reload,
        within self.grace: one under way must not fail the model it changes."""
        reloaded = self.reloaded
        why = admit.refusal(cmd, self.models)
        if why is not None and self.grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reloaded.wait(), self.grace)
            why = admit.refusal(cmd, self.models)
        if why is None and isinstance(cmd, proto.DownloadFile):
            try:
                self._sources(cmd.url, cmd.filename)
            except SourceError as e:
                why = str(e)
        return why

    async def _refuse(self, cmd: Command, why: str, msg: Msg) -> None:
        """Refused: a CommandRefused, and the command's own failure event for whoever waits on
        it (a placer's instance, a pull), then acked. A download of the model's real file
        running here is not reported failed: its own outcome follows."""
        await self._refused(cmd, why)
        if isinstance(cmd, proto.DeleteFile):
            await self._emit(
                proto.FileDeleteFailed(
                    model=cmd.model[:200],
                    host=self.host,
                    filename=cmd.filename[:200],
                    reason=why,
                    cmd_id=cmd.cmd_id[:200],
                )
            )
        elif isinstance(cmd, proto.DownloadFile) and not self._downloading(cmd.model):
            await self._emit(
                proto.DownloadFailed(model=cmd.model[:200], host=self.host, reason=why)
            )
        with contextlib.suppress(Exception):
            await msg.ack()

    async def _refused(self, cmd: Command, why: str) -> None:
        kind = type(cmd).__struct_config__.tag
        log.warning("refused %s command %s for %r: %s", kind, cmd.cmd_id, cmd.model, why)
        await self._emit(
            proto.CommandRefused(
                host=self.host,
                command=str(kind),
                instance_id="",
                model=cmd.model[:200],
                reason=why,
                cmd_id=cmd.cmd_id[:200],
            )
        )

    def _downloading(self, model: str) -> bool:
        """Whether the model's configured store file is being fetched here now."""
        m = self.models.get(model)
        if m is None:
            return False
        job = self.jobs.get(self.store / split_names(store_filename_of(model, m))[0])
        return job is not None and job.task is not None and not job.task.done()

    async def _emit(self, event: proto.Event) -> None:
        try:
            await self.bus.emit(event)
        except Exception as e:  # noqa: BLE001 - a lost event must not break a download
            log.warning("could not publish %s: %r", type(event).__name__, e)


async def _keep_alive(msg: Msg) -> None:
    while True:
        await asyncio.sleep(KEEPALIVE_S)
        with contextlib.suppress(Exception):
            await msg.in_progress()


def describe(info: proto.ModelInfo) -> str:
    """One line for the event log, e.g. "llama, 32 layers, 8192 trained ctx, 4.58 GiB"."""
    s = info.gguf
    assert s is not None
    size = f", {info.size / (1 << 30):.2f} GiB" if info.size else ""
    return f"{s.architecture}, {s.n_layers} layers, {s.n_ctx_train} trained ctx{size}"


async def run(ctx: ServiceContext) -> None:
    if not proto.HOST_ID_RE.fullmatch(ctx.host_id):  # it becomes a subject token
        raise SystemExit(
            f"error: host id {ctx.host_id!r} (--host-id or agent.host_id): 1 to 64 letters, "
            "digits, '-' and '_' only"
        )

    def make(cfg: Config) -> Downloader:
        d = cfg.downloader
        return Downloader(
            cfg,
            ctx.bus,
            ctx.host_id,
            ollama_roots=[expand(p) for p in d.ollama_dirs] or None,
            hf_roots=[expand(p) for p in d.hf_cache_dirs] or None,
        )

    downloader = make(ctx.cfg)
    if ctx.config_path is None:
        downloader.grace = 0.0  # nothing to reload from: no reason to wait for one

    def reload(_old: Config, new: Config) -> None:
        """What the downloader derives from the config follows a reload (the models' URLs,
        file roots and store files, limits); downloads under way go on as they are."""
        fresh = make(new)
        for name in RELOADED:
            setattr(downloader, name, getattr(fresh, name))
        waiting, downloader.reloaded = downloader.reloaded, asyncio.Event()
        waiting.set()  # commands held for a reload look again (Downloader.refusal)

    ctx.on_reload.append(reload)
    await downloader.serve(ctx.stop)


# Downloader attributes made from the config alone, replaced on a reload.
RELOADED = (
    "timeout",
    "opts",
    "file_roots",
    "keep",
    "models",
    "max_active",
    "ollama_roots",
    "hf_roots",
)
