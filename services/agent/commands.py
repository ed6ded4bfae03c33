"""Commands on `lls.cmd.agent.<host>`: start and stop, each handled in its own bounded task,
so a slow start never blocks a stop; both idempotent, a deposed placer's refused (its epoch).

Defence in depth: whoever can publish on the command subject cannot make this host run
anything its config does not say. A start names a configured model and a placement only;
the argv comes from the model's config, the file must be that model's file in the store, the
instance id must have the project's format (`refusal`). Anything else is refused with a
CommandRefused event and nothing runs. Every server requires the API key the placer issued
for it, which comes with its start command alone (lls.instance_key); a start without one is
refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

import proto
from lls import instance_key
from lls.aio import wait_event
from lls.config import Config, store_filename_of
from lls.consume import consume
from lls.fence import Fence
from lls.service import ServiceContext
from proto import InstanceState, StartInstance, StopInstance
from services.agent.instance import Instance
from services.agent.lifecycle import STOP_WAIT_S, Lifecycle
from services.agent.records import Records

log = logging.getLogger(__name__)

MAX_COMMANDS = 16  # commands handled at once (each in its own task)
LAUNCH_ACK_S = 20.0  # a start is acked once launched, at the latest after this (< ack_wait)


def refusal(cmd: StartInstance, cfg: Config) -> str | None:
    """Why this agent must not run `cmd`, or None: it names a configured model, that model's
    store file and chat template, with an instance id of the project's format and a sane
    placement."""
    if not proto.INSTANCE_ID_RE.fullmatch(cmd.instance_id):
        return f"instance id {cmd.instance_id!r} does not have the project's id format"
    mcfg = cfg.models.get(cmd.model)
    if mcfg is None:
        return f"model {cmd.model!r} is not in this agent's config"
    expected = store_filename_of(cmd.model, mcfg)
    if cmd.filename != expected:
        # also what a placer still on another url/sha256 of the model sends: say so
        return (
            f"file {cmd.filename!r} is not model {cmd.model}'s store file ({expected}); "
            "if its url or sha256 just changed, reload every service's config"
        )
    if cmd.n_gpu_layers < 0 or cmd.memory_mib < 0 or any(g < 0 for g in cmd.gpus):
        return "negative GPU layers, memory or GPU index"
    if cmd.chat_template != mcfg.chat_template:  # what runs is this config's, as argv is
        return (
            f"the chat template in the command is not model {cmd.model}'s in this agent's "
            "config; if it just changed, reload every service's config"
        )
    if not instance_key.KEY_RE.fullmatch(cmd.api_key):
        # never a server anyone may call: the key is what keeps other hosts out of it
        why = "carries no API key" if not cmd.api_key else "carries a malformed API key"
        return f"the start {why} (a placer older than per-instance keys? upgrade it)"
    return None


def _loose_fields(data: bytes) -> dict[str, str]:
    """instance_id/model/cmd_id of an undecodable command, for the refusal event."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: str(raw[k])[:200] for k in ("instance_id", "model", "cmd_id") if k in raw}


class Commands:
    """The host's command consumer and what each command does."""

    def __init__(
        self, ctx: ServiceContext, *, fence: Fence, records: Records, lifecycle: Lifecycle
    ):
        self.ctx = ctx
        self.bus = ctx.bus
        self.host = ctx.host_id
        self.fence = fence  # the highest placer epoch seen: older commands are refused
        self.records = records
        self.lifecycle = lifecycle
        self.instances = lifecycle.instances  # shared, never replaced
        self.handlers: set[asyncio.Task[None]] = set()  # commands being handled

    async def run(self) -> None:
        """Handle this host's commands until the agent stops, MAX_COMMANDS at once."""
        await consume(
            self.bus,
            f"agent-{self.host}",
            proto.cmd_agent(self.host),
            self._handle,
            self.ctx.stop,
            stream=proto.CMDS_STREAM,
            tasks=self.handlers,
            concurrency=MAX_COMMANDS,
        )

    async def _handle(self, msg: Any) -> None:
        try:
            cmd = proto.decode(msg.data, proto.AgentCommand)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            # e.g. a start carrying `args`: commands carry model and placement, never flags
            log.error("refusing a malformed command: %s", e)
            loose = _loose_fields(msg.data)
            await self.records.refuse(
                "unknown",
                loose.get("instance_id", ""),
                loose.get("model", ""),
                f"malformed command: {e}",
                loose.get("cmd_id", ""),
            )
            with contextlib.suppress(Exception):
                await msg.term()
            return
        try:
            stale = self.fence.admit(cmd.epoch)
            if stale is not None:  # a deposed placer's: not run, acked (never redelivered)
                kind, model = (
                    ("start", cmd.model) if isinstance(cmd, StartInstance) else ("stop", "")
                )
                await self.records.refuse(kind, cmd.instance_id, model, stale, cmd.cmd_id)
            elif isinstance(cmd, StartInstance):
                await self.start(cmd)
            else:
                await self.stop(cmd)
        except Exception:
            log.exception("command %s (%s) failed", cmd.cmd_id, type(cmd).__name__)
        finally:
            with contextlib.suppress(Exception):
                await msg.ack()

    async def start(self, cmd: StartInstance) -> None:
        """Idempotent: an instance already starting or running is left alone."""
        why = refusal(cmd, self.ctx.cfg)
        if why is not None:
            await self.records.refuse("start", cmd.instance_id, cmd.model, why, cmd.cmd_id)
            await self._fail_refused(cmd, why)
            return
        if cmd.instance_id in self.instances:
            log.info("start %s: already running here", cmd.instance_id)
            return
        inst = Instance(cmd.instance_id, cmd.model, tuple(cmd.gpus), cmd.memory_mib, cmd=cmd)
        inst.api_key = cmd.api_key  # refusal() checked its form
        self.lifecycle.spawn(inst)
        await wait_event(inst.launched, LAUNCH_ACK_S)

    async def _fail_refused(self, cmd: StartInstance, why: str) -> None:
        """A well-formed id whose record says it is placed here and waits for this start (a
        placer whose config differs from ours): fail it, so waiting requests hear why now."""
        if not proto.INSTANCE_ID_RE.fullmatch(cmd.instance_id):
            return
        rec = await self.records.get(cmd.instance_id)
        waiting = (InstanceState.PENDING, InstanceState.DOWNLOADING, InstanceState.STARTING)
        if rec is None or rec.host != self.host or rec.model != cmd.model:
            return
        if rec.state in waiting and cmd.instance_id not in self.instances:
            await self.records.transition(
                cmd.instance_id, rec.model, InstanceState.FAILED, reason=f"agent refused: {why}"
            )

    async def stop(self, cmd: StopInstance) -> None:
        if not proto.INSTANCE_ID_RE.fullmatch(cmd.instance_id):
            why = f"instance id {cmd.instance_id!r} does not have the project's id format"
            await self.records.refuse("stop", cmd.instance_id, "", why, cmd.cmd_id)
            return
        reason = cmd.reason or "stop requested"
        inst = self.instances.get(cmd.instance_id)
        if inst is not None:
            inst.request_stop(reason)
            if inst.task is not None:
                await asyncio.wait({inst.task}, timeout=STOP_WAIT_S)
            return
        rec = await self.records.get(cmd.instance_id)  # not running here: just settle its record
        live = proto.LIVE_STATES | {InstanceState.STOPPING}
        if rec is not None and rec.state in live and rec.host in (None, self.host):
            await self.records.transition(
                cmd.instance_id, rec.model, InstanceState.STOPPED, reason=reason
            )
