"""The executor: carries out the planner's actions (actions.py) in order, each only on the
record revision it was planned from, through the lease-checked writes and commands
(writes.py). A `Create` goes on here to its first step: a PENDING/DOWNLOADING instance is
downloaded to its host (`advance`, gated by the pure `plan.advance_gate`), its fit
re-checked with the file's header, and its start sent.
"""

from __future__ import annotations

import time

import proto
from lls import instance_key
from lls.bus import Bus, new_id
from lls.config import Config, ModelConfig, launch_fingerprint, store_filename_of
from proto import InstanceRecord, InstanceState

from .actions import (
    Action,
    Create,
    Download,
    Drain,
    EndDrain,
    Fail,
    Hold,
    HostBack,
    HostLost,
    MarkLost,
    Purge,
    Refuse,
    ResendStart,
    ResendStop,
    Stop,
    Wait,
)
from .backoff import NO_ROOM, Backoff
from .files import Files
from .keys import Keys
from .lease import Lease
from .placement import Need, NoFit, Placed
from .plan import advance_gate, check_start, check_stop
from .planning import Planning
from .watches import Watches
from .writes import Writer

BUSY_WAIT_S = 10.0  # a placed instance waits this long for its evicted victims' memory


class Executor:
    """Actions carried out at the planned revisions; placed instances created and started."""

    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        *,
        lease: Lease,
        backoff: Backoff,
        watches: Watches,
        planning: Planning,
        writer: Writer,
        files: Files,
        keys: Keys,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.lease = lease
        self.backoff = backoff
        self.watches = watches
        self.planning = planning
        self.writer = writer
        self.files = files
        self.keys = keys

    async def execute(self, actions: list[Action], now: float) -> None:
        """Carry out the planner's actions, in order. An action on an instance applies only
        to the record it was planned from: one changed since (by an earlier action here, or
        by an agent meanwhile) is left to the next pass, which plans from the newer record.
        Writes and commands go through `Writer.write` and `Writer.command`, so each checks
        the lease."""
        w, writer = self.watches, self.writer
        # Taken before the first await: the revisions the planner saw.
        planned = {
            a.instance_id: w.revisions.get(a.instance_id)
            for a in actions
            if hasattr(a, "instance_id")
        }
        for act in actions:
            if isinstance(act, HostLost):
                await self.bus.emit(proto.HostLost(host_id=act.host, reason=act.reason))
                w.lost.add(act.host)
                continue
            if isinstance(act, HostBack):
                await self.bus.emit(proto.HostBack(host_id=act.host, reason=act.reason))
                w.lost.discard(act.host)
                continue
            if isinstance(act, Refuse):
                await writer.refuse(act.model, act.reason, act.retry_after)
                continue
            if isinstance(act, Hold):
                self.backoff.note(act.kind, act.key, now, wait=act.until - now)
                continue
            if isinstance(act, Wait):
                continue
            if isinstance(act, Drain):
                victims = [v for i in act.victims if (v := w.instances.get(i)) is not None]
                await writer.drain(act.model, victims, act.reason, now)
                continue
            if isinstance(act, Create):
                await self.create(act.model, act.need, act.decision, now)
                continue
            iid: str = act.instance_id
            rec = w.instances.get(iid)
            if rec is None or w.revisions.get(iid) != planned.get(iid):
                continue
            if isinstance(act, MarkLost):
                await writer.write(rec, state=InstanceState.LOST, reason=act.reason)
                if act.replace:  # this pass's demand step places it again
                    w.demanded.setdefault(rec.model, now)
            elif isinstance(act, Stop):
                await writer.stop(rec, act.reason)
            elif isinstance(act, Fail):
                await writer.fail(rec, act.reason)
            elif isinstance(act, Download):
                mcfg = self.cfg.models.get(rec.model)
                if mcfg is None or rec.host is None:
                    continue
                if act.first:  # (the download goes out even if the write lost: as before)
                    await writer.write(rec, state=InstanceState.DOWNLOADING, reason=act.reason)
                filename = store_filename_of(rec.model, mcfg)
                await self.files.download(rec.host, rec.model, mcfg, filename, f"dl-{iid}")
                w.download_epoch[iid] = self.lease.epoch
            elif isinstance(act, EndDrain):
                await writer.end_drain(rec, act.stage, act.reason, now)
            elif isinstance(act, ResendStart):
                await self.resend_start(rec, act.reason)
            elif isinstance(act, ResendStop):
                if await writer.write(rec, reason=act.reason):
                    await writer.command(
                        proto.cmd_agent(rec.host or ""),
                        proto.StopInstance(
                            cmd_id=act.cmd_id, instance_id=iid, reason=act.stop_reason
                        ),
                    )
            elif isinstance(act, Purge):
                self.lease.check()
                await self.bus.instances.delete(proto.instance_key(rec.host or "", iid))

    # ------------------------------------------------------------------ a placed instance

    async def create(self, model: str, need: Need, decision: Placed, now: float) -> InstanceRecord:
        """Record a placed instance PENDING, stop what it evicts, and take its first step."""
        iid = f"{proto.kv_key(model)}-{new_id()[:8]}"
        rec = InstanceRecord(
            instance_id=iid,
            model=model,
            state=InstanceState.PENDING,
            created=now,
            updated=now,
            host=decision.host,
            gpus=list(decision.gpus),
            memory_mib=decision.memory_mib,
            reason="placed",
            placement=decision.reason if need.memory_mib else unknown_need(decision.host),
            config_fp=launch_fingerprint(self.cfg.models[model]),
        )
        key = proto.instance_key(decision.host, iid)
        # Its API key first: the placer's word that it is placed there (the gateway routes
        # only to what a key vouches for), sent to its host alone in the start command.
        placed = instance_key.issue(decision.host, iid, model)
        self.lease.check()
        await self.bus.instance_keys.create(key, proto.encode(placed))
        self.watches.on_key(key, placed, 0)
        rev = await self.bus.instances.create(key, proto.encode(rec))
        self.watches.on_instance(iid, rec, rev)  # our own write; the watcher confirms it
        await self.writer.recorded(rec, rev)
        await self.bus.emit(
            proto.PlacementDecided(
                model=model,
                instance_id=iid,
                host=decision.host,
                gpus=list(decision.gpus),
                memory_mib=decision.memory_mib,
                reason=rec.placement,
                evicted=list(decision.evict),
            )
        )
        for victim in decision.evict:
            vic = self.watches.instances.get(victim)
            if vic is None:
                continue
            if vic.state == InstanceState.DRAINING and vic.drain_for == model:
                await self.writer.stop(vic, f"evicted to make room for {model} (drained first)")
                why = f"{vic.model} drained; {model} starts in its room"
                drained_in = now - (vic.drain_since or now)
                await self.writer.swap_event(model, "done", [vic], why, drain_s=drained_in)
            else:
                await self.writer.stop(vic, f"evicted to make room for {model}")
        # A fit decided with the header's estimate and no eviction holds as it is; after an
        # eviction, the fit is re-checked until the victims' memory is really free.
        sure = decision if need.memory_mib and not decision.evict else None
        await self.advance(rec, now, decided=sure)
        return rec

    async def advance(self, rec: InstanceRecord, now: float, decided: Placed | None = None) -> None:
        """PENDING/DOWNLOADING: download the file to the chosen host, then start it there.
        The gates (pure `plan.advance_gate`) decide everything up to the file being there."""
        mcfg = self.cfg.models.get(rec.model)
        has_file = False
        if mcfg is not None and rec.host is not None:
            has_file = self.files.has_file(rec.host, rec.model, store_filename_of(rec.model, mcfg))
        gate = advance_gate(self.planning.view(), rec, now, has_file=has_file)
        if gate is not None or mcfg is None or rec.host is None:
            if gate is not None:
                await self.execute([gate], now)
            return
        filename = store_filename_of(rec.model, mcfg)
        # The file is there: now its header tells the real memory need; re-check the fit.
        # A copy beside a live instance (a replica, a reload's replacement) only takes free
        # room, and its failure is no reason to refuse requests the others serve.
        copy = any(
            r.instance_id != rec.instance_id and r.created <= rec.created
            for r in self.watches.live(rec.model)
        )
        if decided is not None:
            decision: Placed | NoFit = decided
        else:
            # Free room only: the room was made when it was placed (its victims drained
            # and stopped then); what still holds memory is on its way out, or a model
            # that must yield through a drain, never one stopped here unasked.
            need = self.planning.need(rec.model, mcfg, host=rec.host)
            decision = self.planning.place(need, now, exclude=rec.instance_id, may_evict=False)
        if isinstance(decision, NoFit):
            # Room may be on its way (an evicted instance still stopping, busy ones finishing):
            # retry on the next passes, for a bounded time, before failing.
            since = self.backoff.since(NO_ROOM, rec.instance_id, now)
            if now - since < BUSY_WAIT_S:
                return
            self.backoff.clear(NO_ROOM, rec.instance_id)
            await self.writer.fail(rec, decision.reason)
            if not copy:
                await self.writer.refuse(rec.model, decision.reason, 5)
            return
        self.backoff.clear(NO_ROOM, rec.instance_id)
        ok = await self.writer.write(
            rec,
            state=InstanceState.STARTING,
            gpus=list(decision.gpus),
            memory_mib=decision.memory_mib,
            reason="file in store; start sent",
            placement=decision.reason,
        )
        if ok:
            await self._send_start(rec, mcfg, filename, decision)

    async def _send_start(
        self, rec: InstanceRecord, mcfg: ModelConfig, filename: str, decision: Placed
    ) -> None:
        # model and placement only: the agent builds argv (ctx_size, args, embeddings) from
        # its own config, so nobody on the bus can hand it flags. The chat template's text
        # travels (the agent runs it only if its own config has the same)
        await self.writer.command(
            proto.cmd_agent(rec.host or ""),
            proto.StartInstance(
                cmd_id=f"start-{rec.instance_id}-{int(time.time())}",
                instance_id=rec.instance_id,
                model=rec.model,
                filename=filename,
                n_gpu_layers=decision.n_gpu_layers,
                gpus=list(decision.gpus),
                memory_mib=decision.memory_mib,
                chat_template=mcfg.chat_template,
                api_key=await self.keys.api_key(rec),
            ),
        )

    async def resend_start(self, rec: InstanceRecord, why: str) -> None:
        mcfg = self.cfg.models.get(rec.model)
        if mcfg is None:
            return
        decision = Placed(
            host=rec.host or "",
            gpus=tuple(rec.gpus),
            n_gpu_layers=999 if rec.gpus else 0,
            memory_mib=rec.memory_mib,
            reason=rec.placement,
        )
        if await self.writer.write(rec, reason=why):
            await self._send_start(rec, mcfg, store_filename_of(rec.model, mcfg), decision)

    async def check_start(self, rec: InstanceRecord, now: float) -> None:
        """A STARTING instance its agent never took up: resend (pure `plan.check_start`)."""
        cur = self.watches.instances.get(rec.instance_id)
        act = check_start(self.planning.view(), cur, now) if cur is not None else None
        if act is not None:
            await self.execute([act], now)

    async def check_stop(self, rec: InstanceRecord, now: float) -> None:
        """A STOPPING instance its agent never reported stopped: its stop again, with a new
        id, every STOP_GRACE_S (pure `plan.check_stop`)."""
        cur = self.watches.instances.get(rec.instance_id)
        act = check_stop(self.planning.view(), cur, now) if cur is not None else None
        if act is not None:
            await self.execute([act], now)


def unknown_need(host: str) -> str:
    return (
        f"{host} fetches the file first; its memory need is checked against free memory "
        "once its GGUF header can be read"
    )
