"""A model's state in words, from the gateway's watched views: why a request waits (503
bodies, a waiting stream's comments), one word for /v1/models, and the GGUF facts /api/show
gives. Pure functions over the views, except `header_of`, which reads the bus (never on the
request path)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import proto
from lls.bus import Bus, kv_snapshot
from lls.config import Config, store_filename_of
from proto import InstanceRecord, InstanceState

log = logging.getLogger(__name__)


def describe(
    model: str, instances: Iterable[InstanceRecord], hosts: Mapping[str, proto.HostRecord]
) -> str:
    """Where a model's wait stands, in words."""
    instances = list(instances)
    live = [r for r in instances if r.model == model and r.state in proto.LIVE_STATES]
    if not live:
        yielding = sorted(
            r.model for r in instances if r.state == InstanceState.DRAINING and r.drain_for == model
        )
        if yielding:
            return f"waiting for {', '.join(yielding)} to finish their requests and yield"
        return "no instance placed yet (waiting for room)"
    r = max(live, key=lambda r: r.updated)
    where = f" on {r.host}" if r.host else ""
    if r.state == InstanceState.DRAINING:
        return f"instance {r.instance_id} is yielding to {r.drain_for}; queued for its next turn"
    return f"instance {r.instance_id} is {r.state.value}{where}{build_stage(r, hosts)}"


def build_stage(r: InstanceRecord, hosts: Mapping[str, proto.HostRecord]) -> str:
    """The build's stage, when a starting instance's host still builds llama-server (its
    heartbeat says so: HostRecord.build), after a "; "; else ""."""
    host = hosts.get(r.host or "")
    if r.state != InstanceState.STARTING or host is None or host.build is None:
        return ""
    return f"; {host.build.message}"


def state_of(model: str, instances: Iterable[InstanceRecord], ready: bool, failed: bool) -> str:
    """One word: ready, starting, downloading, failed, or stopped. `failed`: a placement or
    start failure for the model is still fresh."""
    if ready:
        return "ready"
    live = [r for r in instances if r.model == model and r.state in proto.LIVE_STATES]
    if live:
        return max(live, key=lambda r: r.updated).state.value
    return "failed" if failed else "stopped"


async def header_of(
    bus: Bus, cfg: Config, model: str
) -> tuple[proto.GgufSummary | None, int | None]:
    """A model's GGUF summary and size: from a host's store, else as read from its source
    (KV models)."""
    filename = store_filename_of(model, cfg.models[model])
    try:
        hosts = await kv_snapshot(bus, bus.hosts, proto.HostRecord, timeout=2)
        for host in hosts.values():
            for f in host.files:
                if f.filename == filename and f.gguf is not None:
                    return f.gguf, f.size
        entry = await bus.models.get(proto.kv_key(model))
        info = proto.decode(entry.value, proto.ModelInfo) if entry.value else None
    except Exception as e:  # noqa: BLE001 - no facts is an answer too (KeyNotFound, timeouts)
        log.debug("no header for %s: %r", model, e)
        return None, None
    m = cfg.models.get(model)  # a reload may have removed it meanwhile
    if info is None or m is None or info.url != m.url:
        return None, None
    return info.gguf, info.size
