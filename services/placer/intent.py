"""Following stored intent (KV desired, `lls load` / `lls stop` / preload): every pass the
leader carries out the pending requests (pure `desired.next_step`: demand it, stop these,
or done with an outcome), and stores requests of its own (preload, a StopRequested event)
by compare-and-set. Nothing depends on a message having been heard or on what an earlier
leader remembered."""

from __future__ import annotations

import logging
import time

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

import proto
from lls.bus import Bus, new_id
from lls.config import Config

from .desired import DemandIt, Done, StopThese, next_step, preload_due
from .lease import Lease
from .watches import Watches
from .writes import Writer

log = logging.getLogger(__name__)


class IntentFollower:
    """The stored requests of KV desired, followed and answered as the leader."""

    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        *,
        lease: Lease,
        watches: Watches,
        writer: Writer,
        started: float,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.lease = lease
        self.watches = watches
        self.writer = writer
        self.started = started

    async def follow(self, now: float) -> None:
        """Carry out the pending requests of KV desired (pure `desired.next_step`), and write
        the config's preload request where it is due: every pass, so nothing depends on a
        message having been heard or on what an earlier leader remembered."""
        w = self.watches
        for model, mcfg in self.cfg.models.items():
            if mcfg.preload and preload_due(w.desired.get(model), self.started):
                await self.ask(model, proto.WANT_RUN, "preload", "models.<name>.preload")
        seen = [r for r in w.instances.values() if r.host not in w.lost]
        for model, want in list(w.desired.items()):
            if not want.wanted:  # nothing pending; a pin alone is demand while none is ready
                step = next_step(
                    want, seen, configured=model in self.cfg.models, refused=None, now=now
                )
                if isinstance(step, DemandIt):
                    w.demanded.setdefault(model, now)
                continue
            if not want.seen_by:  # the asker learns that a placer took it up
                taken = await self._write(want, seen_by=self.lease.holder)
                if taken is None:
                    continue  # changed meanwhile: the next pass sees the newer request
                want = taken
            step = next_step(
                want,
                seen,
                configured=model in self.cfg.models,
                refused=self.writer.refused.get(model),
                now=now,
            )
            if isinstance(step, Done):
                log.info("%s %s (asked by %s): %s", want.wanted, model, want.by, step.outcome)
                await self._write(want, wanted="", outcome=step.outcome, done_at=now)
            elif isinstance(step, DemandIt):
                w.demanded.setdefault(model, now)
            elif isinstance(step, StopThese):
                for iid in step.instance_ids:
                    if (rec := w.instances.get(iid)) is not None:
                        await self.writer.stop(rec, f"stop requested by {want.by}")

    async def ask(self, model: str, wanted: str, by: str, reason: str) -> None:
        """Store a request of the placer's own (preload, a StopRequested event): created if
        there is none, else compare-and-set over the one we see (a newer one wins)."""
        old = self.watches.desired.get(model)
        keep_pin = old is not None and old.pinned and wanted != proto.WANT_STOP  # a stop unpins
        want = proto.DesiredModel(
            model=model,
            wanted=wanted,
            since=time.time(),
            by=by,
            request_id=f"placer-{new_id()}",
            reason=reason,
            pinned=keep_pin,
            pinned_by=old.pinned_by if keep_pin and old else "",
        )
        key = proto.kv_key(model)
        self.lease.check()  # only the leader stores requests of its own (aborts the pass)
        try:
            if model in self.watches.desired_rev:
                rev = await self.bus.desired.update(
                    key, proto.encode(want), last=self.watches.desired_rev[model]
                )
            else:
                rev = await self.bus.desired.create(key, proto.encode(want))
        except KeyWrongLastSequenceError:  # someone wrote first: theirs is the newer request
            log.info("request %s %s (%s) not stored: a newer one came first", wanted, model, by)
            return  # (preload: the next pass asks again if still due)
        log.info("stored request: %s %s (%s, %s)", wanted, model, by, reason)
        self.watches.on_desired(key, want, rev)

    async def _write(
        self, want: proto.DesiredModel, **changes: object
    ) -> proto.DesiredModel | None:
        """Compare-and-set a request we saw; None when it changed since (a newer request)."""
        new = msgspec.structs.replace(want, **changes)
        self.lease.check()  # a deposed leader must not mark a request done (aborts the pass)
        try:
            rev = await self.bus.desired.update(
                proto.kv_key(want.model),
                proto.encode(new),
                last=self.watches.desired_rev.get(want.model),
            )
        except KeyWrongLastSequenceError:
            return None
        self.watches.on_desired(proto.kv_key(want.model), new, rev)
        return new
