"""Log tails: the end of a running instance's llama-server log, answered on this host's
`lls.logs.<host>` subject. Only instances this agent runs, only their own log (the runtime
finds it from the handle); a request never names a file."""

from __future__ import annotations

import contextlib
import logging

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

import proto
from lls.bus import Bus
from services.agent.blocking import BlockingPool
from services.agent.instance import Instance
from services.agent.runtime import Runtime

log = logging.getLogger(__name__)

LOG_PENDING_MAX = 32  # log tail requests waiting for an answer; more are dropped


class LogTails:
    """The subscription that answers LogTailRequests for this host."""

    def __init__(
        self,
        bus: Bus,
        host: str,
        runtime: Runtime,
        instances: dict[str, Instance],
        pool: BlockingPool,
    ):
        self.bus = bus
        self.host = host
        self.runtime = runtime
        self.instances = instances  # Lifecycle's, shared
        self.pool = pool
        self._sub: Subscription | None = None

    async def serve(self) -> None:
        """Answer LogTailRequests on this host's subject (core NATS: nats-py subscribes again
        after a reconnect). Requests are answered one at a time, and few wait: a flood
        overflows the pending bound and is dropped, not queued."""
        self._sub = await self.bus.subscribe(
            proto.logs(self.host), cb=self._answer, pending_msgs_limit=LOG_PENDING_MAX
        )

    async def _answer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        reply = await self.tail(msg.data)
        try:
            await msg.respond(proto.encode(reply))
        except Exception as e:  # noqa: BLE001 - the asker is gone or the bus away
            log.warning("cannot answer a log tail request: %s", e)

    async def tail(self, data: bytes) -> proto.LogTailReply:
        """The end of a running instance's log. Only instances this agent runs, only their
        own log (the runtime finds it from the handle); a request never names a file."""
        try:
            req = proto.decode(data, proto.LogTailRequest)
        except msgspec.DecodeError as e:  # ValidationError too
            return proto.LogTailError(instance_id="", code="invalid", reason=f"bad request: {e}")
        iid = req.instance_id
        if not proto.INSTANCE_ID_RE.fullmatch(iid):
            why = "instance id does not have the project's id format"
            return proto.LogTailError(instance_id=iid[:200], code="invalid", reason=why)
        inst = self.instances.get(iid)
        handle = inst.handle if inst is not None else None
        if handle is None:
            why = f"instance {iid} does not run on host {self.host}"
            return proto.LogTailError(instance_id=iid, code="not_found", reason=why)
        lines = max(1, min(req.lines, proto.LOG_TAIL_MAX_LINES))
        try:
            got, truncated = await self.pool.call(
                self.runtime.log_lines, handle, lines, proto.LOG_TAIL_MAX_BYTES
            )
        except Exception as e:  # noqa: BLE001 - say why instead of leaving the asker waiting
            log.warning("%s: cannot read its log: %s", iid, e)
            return proto.LogTailError(instance_id=iid, code="unavailable", reason=str(e)[:500])
        return proto.LogTail(instance_id=iid, lines=got, truncated=truncated)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
