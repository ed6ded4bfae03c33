"""Asking a host's agent for an instance's llama-server log tail (NATS core request/reply)."""

from __future__ import annotations

from typing import Any

import msgspec
import nats.errors

import proto
from lls.bus import Bus

ASK_TIMEOUT_S = 2.0  # the page refreshes every few seconds: an answer later than this is moot


class NoAnswer(Exception):
    """The host's agent did not answer (down, stuck, or not subscribed): 504; or answered
    something unreadable: 502."""

    def __init__(self, message: str, status: int = 504):
        super().__init__(message)
        self.status = status


def find_instance(instances: dict[str, dict[str, Any]], instance_id: str) -> dict[str, Any] | None:
    """The live record of `instance_id` in the view's instances (keyed `<host>.<id>`), else
    the first one found (its host may have moved on)."""
    found = [r for r in instances.values() if r.get("instance_id") == instance_id]
    live = {s.value for s in proto.LIVE_STATES} | {proto.InstanceState.STOPPING.value}
    return next((r for r in found if r.get("state") in live), found[0] if found else None)


async def ask_log_tail(
    bus: Bus, host: str, instance_id: str, lines: int, timeout: float = ASK_TIMEOUT_S
) -> proto.LogTailReply:
    """The agent of `host`'s answer; NoAnswer when none comes within `timeout`."""
    req = proto.LogTailRequest(instance_id=instance_id, lines=lines)
    try:
        msg = await bus.nc.request(proto.logs(host), proto.encode(req), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise NoAnswer(f"no agent of host {host} listens for log requests") from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise NoAnswer(f"the agent of host {host} did not answer within {timeout:g} s") from None
    try:
        return proto.decode(msg.data, proto.LogTailReply)
    except msgspec.DecodeError as e:
        raise NoAnswer(
            f"the agent of host {host} answered something unreadable: {e}", 502
        ) from None
