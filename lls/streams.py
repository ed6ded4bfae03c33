"""Declaring the streams and KV buckets of proto/ (idempotently), with their size limits
and replicas: the placer and the operator create or update them, every other identity
waits for them (lls/auth.py: it may not create them)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

import proto
from lls.config import NatsLimits

log = logging.getLogger(__name__)

STREAMS = [
    StreamConfig(
        name=proto.EVENTS_STREAM,
        subjects=[proto.EVENTS_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        max_age=proto.EVENTS_MAX_AGE_S,
        max_msgs=proto.EVENTS_MAX_MSGS,
        storage=StorageType.FILE,
    ),
    StreamConfig(
        name=proto.CMDS_STREAM,
        subjects=[proto.CMDS_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=proto.CMD_DEDUP_WINDOW_S,
        max_age=3600,
        storage=StorageType.FILE,
    ),
]
BUCKETS = [
    KeyValueConfig(bucket=proto.KV_HOSTS, history=1),
    KeyValueConfig(bucket=proto.KV_INSTANCES, history=1),
    KeyValueConfig(bucket=proto.KV_ACTIVITY, history=1, ttl=30),
    KeyValueConfig(bucket=proto.KV_LEASES, history=1),
    KeyValueConfig(bucket=proto.KV_MODELS, history=1),
    KeyValueConfig(bucket=proto.KV_DESIRED, history=1),
    KeyValueConfig(bucket=proto.KV_INSTANCE_KEYS, history=1),
]


async def bind(
    js: JetStreamContext, declare: bool, limits: NatsLimits, replicas: int | None, until: float
) -> dict[str, KeyValue]:
    """Every stream and bucket, bucket name -> its KeyValue: created or updated where this
    identity may `declare` them, else waited for until `until` (the event loop's clock)."""
    for cfg in STREAMS:
        if declare:
            await _ensure_stream(js, cfg, limits, replicas)
        else:
            await _await_stream(js, cfg.name, until)
    kv = {}
    for cfg in BUCKETS:
        if declare:
            kv[cfg.bucket] = await _ensure_bucket(js, cfg, limits, replicas)
        else:
            await _await_stream(js, f"KV_{cfg.bucket}", until)
            kv[cfg.bucket] = await js.key_value(cfg.bucket)
    return kv


async def _await_stream(js: JetStreamContext, name: str, until: float) -> None:
    """Wait for a stream this identity may not create (the placer or `lls` creates it)."""
    loop = asyncio.get_running_loop()
    warned = False
    while True:
        try:
            await js.stream_info(name)
            return
        except NotFoundError:
            if loop.time() >= until:
                raise TimeoutError(f"stream {name} does not exist; start the placer") from None
            if not warned:
                log.info("waiting for stream %s (the placer creates it)", name)
                warned = True
            await asyncio.sleep(0.5)


DEFAULT_LIMITS = NatsLimits(
    events_max_bytes=1 << 30,
    events_max_age_days=7.0,
    commands_max_bytes=256 << 20,
    bucket_max_bytes=64 << 20,
    max_msg_bytes=1 << 20,
)


def size_limits(stream: str, limits: NatsLimits) -> dict[str, Any]:
    """The size fields of `stream` (a KV bucket's is KV_<bucket>) that `limits` sets; the
    ones it leaves out (None) are not there, so what the server has stays."""
    size = {
        proto.EVENTS_STREAM: limits.events_max_bytes,
        proto.CMDS_STREAM: limits.commands_max_bytes,
    }.get(stream, limits.bucket_max_bytes)
    out: dict[str, Any] = {"max_bytes": size, "max_msg_size": limits.max_msg_bytes}
    if stream == proto.EVENTS_STREAM and limits.events_max_age_days is not None:
        out["max_age"] = limits.events_max_age_days * 86400.0  # seconds, as nats-py takes it
    return {k: v for k, v in out.items() if v is not None}


def _with_defaults(limits: NatsLimits) -> NatsLimits:
    given = msgspec.structs.asdict(limits)
    return NatsLimits(
        **{k: v if v is not None else getattr(DEFAULT_LIMITS, k) for k, v in given.items()}
    )


def _replicas(replicas: int | None) -> dict[str, Any]:
    return {} if replicas is None else {"num_replicas": replicas}


async def _ensure_stream(
    js: JetStreamContext, cfg: StreamConfig, limits: NatsLimits, replicas: int | None = None
) -> None:
    """Create the stream with the configured limits (defaults where unset); an existing one
    keeps its limits (an operator may have set them on purpose) except those the config sets."""
    try:
        info = await js.stream_info(cfg.name)
    except NotFoundError:
        made = {**size_limits(cfg.name, _with_defaults(limits)), **_replicas(replicas)}
        try:
            await js.add_stream(dataclasses.replace(cfg, **made))
            return
        except BadRequestError:  # another service created it meanwhile
            info = await js.stream_info(cfg.name)
    changes = {**size_limits(cfg.name, limits), **_replicas(replicas)}
    await _apply(js, info.config, changes, subjects=cfg.subjects)


async def _apply(
    js: JetStreamContext, cur: StreamConfig, changes: dict[str, Any], **ours: Any
) -> None:
    wanted = {**changes, **ours}
    if any(getattr(cur, k) != v for k, v in wanted.items()):
        log.info("stream %s: setting %s", cur.name, wanted)
        await js.update_stream(dataclasses.replace(cur, **wanted))


async def _ensure_bucket(
    js: JetStreamContext, cfg: KeyValueConfig, limits: NatsLimits, replicas: int | None = None
) -> KeyValue:
    stream = f"KV_{cfg.bucket}"
    try:
        kv = await js.key_value(cfg.bucket)
    except Exception:
        made = size_limits(stream, _with_defaults(limits))
        sized = dataclasses.replace(
            cfg,
            max_bytes=made["max_bytes"],
            max_value_size=made["max_msg_size"],
            replicas=replicas or 1,
        )
        try:
            kv = await js.create_key_value(sized)
        except BadRequestError:
            kv = await js.key_value(cfg.bucket)
    # No roll-ups: permissions see subjects, not headers, so an identity allowed one key
    # could otherwise empty the whole bucket with `Nats-Rollup: all` (we never purge).
    info = await js.stream_info(stream)
    changes = {**size_limits(stream, limits), **_replicas(replicas)}
    await _apply(js, info.config, changes, allow_rollup_hdrs=False)
    return kv
