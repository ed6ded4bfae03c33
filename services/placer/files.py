"""Model files on hosts: where each is as far as the placer knows (heartbeats, downloads
just completed, deletes just sent), the DownloadFile a cold start or a pull sends, and
Ollama's pull and delete requests (answered with PullAnswered / DeleteAnswered)."""

from __future__ import annotations

import logging
import time

import proto
from lls.bus import Bus
from lls.config import Config, ModelConfig, store_filename_of

from .activity import ACTIVITY_STALE_S
from .placement import NoFit
from .planning import Planning
from .watches import Watches
from .writes import Writer

JOIN_GRACE_S = 10.0  # after the placer starts, a pull waits this long for a host to join

log = logging.getLogger(__name__)


class Files:
    """Where files are, and the file commands and requests."""

    def __init__(
        self, cfg: Config, bus: Bus, watches: Watches, planning: Planning, writer: Writer
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.watches = watches
        self.planning = planning
        self.writer = writer
        self.fetched: dict[tuple[str, str], float] = {}  # (host, file) downloaded -> when
        self.deleted: dict[tuple[str, str], float] = {}  # (host, file) told to delete -> when

    def downloaded(self, ev: proto.DownloadCompleted) -> None:
        # The file is there now; the host's next heartbeat would say so up to a
        # second later, and a swap would wait for it.
        self.fetched[(ev.host, ev.filename)] = time.time()
        self.deleted.pop((ev.host, ev.filename), None)

    def file_hosts(self, filename: str) -> set[str]:
        """Hosts whose store holds `filename` as far as we know: listed in a heartbeat or just
        downloaded, and not just told to delete it (a heartbeat may still list it)."""
        now = time.time()
        hosts = {
            h.host_id
            for h in self.watches.hosts.values()
            if any(f.filename == filename for f in h.files)
        }
        hosts |= {
            h
            for (h, f), at in self.fetched.items()
            if f == filename and now - at <= ACTIVITY_STALE_S
        }
        return {
            h
            for h in hosts
            if now - self.deleted.get((h, filename), -ACTIVITY_STALE_S) >= ACTIVITY_STALE_S
        }

    def has_file(self, host_id: str, model: str, filename: str) -> bool:
        """Whether `host_id`'s store holds the model's file as far as we know: its heartbeat
        lists it and it was not just deleted there, or a download just completed there."""
        host = self.watches.hosts.get(host_id)
        listed = host is not None and any(f.filename == filename for f in host.files)
        if listed and host_id in self.file_hosts(filename):
            return True  # (listed, but just deleted there: its heartbeat has not caught up)
        return self._fetched_and_sized(host_id, model, filename)

    def _fetched_and_sized(self, host: str, model: str, filename: str) -> bool:
        """A download completed on `host` that its heartbeat does not list yet, for a model
        whose memory need is known without the file's header (configured, or read)."""
        at = self.fetched.get((host, filename))
        if at is None or time.time() - at > ACTIVITY_STALE_S:
            return False  # by then the heartbeat lists it, or the file is gone
        mcfg = self.cfg.models[model]
        header = self.watches.header(model)
        return bool(mcfg.memory_mib) or (header is not None and header.gguf is not None)

    async def download(
        self, host: str, model: str, mcfg: ModelConfig, filename: str, cmd_id: str
    ) -> None:
        """Tell `host`'s downloader to fetch the model's file (a cold start, or a pull)."""
        await self.writer.command(
            proto.cmd_download(host),
            proto.DownloadFile(
                cmd_id=cmd_id, model=model, url=mcfg.url, filename=filename, sha256=mcfg.sha256
            ),
        )

    # ------------------------------------------------------------------ pull and delete

    async def pull(self, ev: proto.PullRequested) -> None:
        """Ollama's pull: the model's file to the host it would be placed on, with the same
        DownloadFile a cold start sends; a host that holds it already is the answer."""
        mcfg = self.cfg.models.get(ev.model)
        if mcfg is None:
            await self._answer_pull(ev, "refused", reason=f"model {ev.model!r} is not configured")
            return
        filename = store_filename_of(ev.model, mcfg)
        holders = sorted(self.file_hosts(filename) - self.watches.lost)
        if holders:
            await self._answer_pull(ev, "present", holders[0], filename)
            return
        now = time.time()
        if not self.watches.hosts and now - self.planning.started < JOIN_GRACE_S:
            # Started a moment ago: the hosts' first heartbeats are on their way. The pull
            # waits for them (the next pass) instead of being refused with "no hosts".
            self.watches.inbox.append(ev)
            return
        need = self.planning.need(ev.model, mcfg, host=None)
        decision = self.planning.place(need, now)
        if isinstance(decision, NoFit):  # room taken now: where it goes in its turn
            decision = self.planning.place_at_rest(need, now)
        if isinstance(decision, NoFit):
            await self._answer_pull(ev, "refused", reason=decision.reason)
            return
        await self.download(decision.host, ev.model, mcfg, filename, f"pull-{ev.request_id}")
        await self._answer_pull(ev, "downloading", decision.host, filename)

    async def _answer_pull(
        self,
        ev: proto.PullRequested,
        status: str,
        host: str = "",
        filename: str = "",
        reason: str = "",
    ) -> None:
        log.info("pull %s: %s %s", ev.model, status, reason or host)
        await self.bus.emit(
            proto.PullAnswered(
                model=ev.model,
                request_id=ev.request_id,
                status=status,
                host=host,
                filename=filename,
                reason=reason,
            )
        )

    async def delete_file(self, ev: proto.DeleteRequested) -> None:
        """Ollama's delete: refused while the model has a live instance (its file is in use or
        about to be); otherwise each host holding the file is told to delete it."""
        mcfg = self.cfg.models.get(ev.model)
        answer = proto.DeleteAnswered(model=ev.model, request_id=ev.request_id, status="refused")
        live = self.watches.live(ev.model)
        if mcfg is None:
            answer.reason = f"model {ev.model!r} is not configured"
        elif live:
            r = max(live, key=lambda r: r.updated)
            answer.reason = (
                f"model {ev.model} is in use: instance {r.instance_id} is {r.state.value} on "
                f"{r.host}; stop it first (lls stop {ev.model}) or wait for its idle stop"
            )
        else:
            answer.filename = filename = store_filename_of(ev.model, mcfg)
            answer.hosts = sorted(self.file_hosts(filename) - self.watches.lost)
            answer.status = "deleting" if answer.hosts else "absent"
            now = time.time()
            for host in answer.hosts:
                self.deleted[(host, filename)] = now
                self.fetched.pop((host, filename), None)
                await self.writer.command(
                    proto.cmd_download(host),
                    proto.DeleteFile(
                        cmd_id=f"del-{ev.request_id}-{host}", model=ev.model, filename=filename
                    ),
                )
        log.info("delete %s: %s %s", ev.model, answer.status, answer.reason or answer.hosts)
        await self.bus.emit(answer)
