"""Connecting to NATS: the Bus (publish helpers, the health probe, records refused) and
reading its KV buckets (kv_snapshot, watch_kv). The streams and buckets are declared by
lls/streams.py; commands are consumed by lls/consume.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

import proto
from lls import auth
from lls.aio import wait_event
from lls.config import NatsLimits, NatsTls, expand, nats_servers
from lls.streams import bind

log = logging.getLogger(__name__)
T = TypeVar("T")
MsgHandler = Callable[[Msg], Awaitable[None]]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest (one token at least)."""
    want, got = pattern.split("."), subject.split(".")
    for i, tok in enumerate(want):
        if tok == ">":
            return len(got) > i
        if i >= len(got) or (tok != "*" and tok != got[i]):
            return False
    return len(got) == len(want)


PROBE_EVERY_S = 1.0
LEADERLESS_RETRY_S = 0.25  # a stream's writes retried this long while it has no leader
WATCH_HEARTBEAT_S = 1.0  # a KV watch's idle heartbeat: two missed and it is set up again
PROBE_TIMEOUT_S = 1.0
# A server cut off by the network sends nothing, not even a close: without pings nats-py
# notices only after its default 2 minutes x 2. With these it moves to another server of
# the cluster within about 6 s.
PING_INTERVAL_S = 2
MAX_OUTSTANDING_PINGS = 3
# The event of a KV write must land (the log rebuilds the state from it): one that cannot be
# published now is retried in the background this long, under one message id.
EVENT_RETRY_S = 120.0
MAX_PENDING_EVENTS = 10_000

MAX_REFUSALS_KEPT = 10_000  # (bucket, key, reason) reported once each; forgotten past this
MAX_REFUSAL_EVENTS = 100  # record.refused events on their way at once; more are only logged


class _JetStream(JetStreamContext):
    """nats-py's JetStream context, whose KV watches notice a lost server sooner (subscribe)
    and whose publishes (KV writes included) ride out a stream's raft leader moving
    (services/placer/stream_leaders.py): for about 20 ms no server takes that stream's
    writes ("no responders"), so a publish is tried again for LEADERLESS_RETRY_S before the
    error is its caller's. No responders means no server stored it: trying again cannot
    store a message twice."""

    async def publish(  # type: ignore[override]
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Any:
        deadline = time.monotonic() + LEADERLESS_RETRY_S
        while True:
            try:
                return await super().publish(subject, payload, timeout, stream, headers, **kw)
            except NoStreamResponseError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.02)

    async def subscribe(self, subject: str, *args: Any, **kw: Any) -> Any:
        """nats-py's subscribe; an ordered consumer (every KV watch) gets idle heartbeats
        every WATCH_HEARTBEAT_S instead of 5 s. nats-py sets such a consumer up again after
        two heartbeats missed: a watch whose consumer was on a NATS server that is gone is
        then replaced in about 2 s, not 10 s (and tried again as often until it is)."""
        if kw.get("ordered_consumer") and not kw.get("idle_heartbeat"):
            kw["idle_heartbeat"] = WATCH_HEARTBEAT_S
        return await super().subscribe(subject, *args, **kw)


class Bus:
    """A NATS connection with the project's streams, buckets and publish helpers."""

    def __init__(self, nc: Client, js: JetStreamContext, kv: dict[str, KeyValue], name: str = ""):
        self.nc = nc
        self.js = js
        self.kv = kv
        self.name = name  # the connection's name: the service, in what it reports
        # Bumped on every reconnect, and when the server answers again after a silence.
        # Push consumers (KV watchers, ordered consumers) do not survive a NATS server
        # restart in nats-py, nor a server frozen long enough to drop their ephemeral
        # consumers: watchers compare this and re-subscribe.
        self.reconnects = 0
        self.silent_since: float | None = None  # monotonic: since when the server is silent
        self.back_at = time.time()  # when the server last answered again after a silence
        self._probe: asyncio.Task[None] | None = None
        self._retrying: set[asyncio.Task[None]] = set()  # record events not yet published
        self._refused: set[tuple[str, str, str]] = set()  # records reported as ignored
        self._reporting: set[asyncio.Task[None]] = set()

    def start_probe(self) -> None:
        """Ask the server something every PROBE_EVERY_S: nats-py goes on saying "connected"
        to a frozen server for minutes, so this is how services learn that the bus is away
        (`silent_since`) and back (`reconnects` bumped)."""
        if self._probe is None:
            self._probe = asyncio.create_task(self._watch_health(), name="bus probe")

    async def _watch_health(self) -> None:
        while not self.nc.is_closed:
            t0 = time.monotonic()
            try:
                await self._ask_server()
            except Exception as e:  # noqa: BLE001 - any failure: the bus did not answer
                if self.silent_since is None:
                    log.warning("the message bus (NATS) does not answer: %r", e)
                    self.silent_since = t0
            else:
                if self.silent_since is not None:
                    log.info("the message bus (NATS) answers again")
                    self.silent_since = None
                    self.back_at = time.time()
                    self.reconnects += 1  # its watches may be gone: set them up again
            await asyncio.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - t0)))

    async def _ask_server(self) -> None:
        """One round trip to the server this client is attached to (proto.PROBE)."""
        if not self.nc.is_connected:
            raise ConnectionError("not connected")
        # A request, never nc.flush(timeout): a flush that times out leaves a cancelled
        # future among nats-py's PONG waiters, and the PONG that comes after a freeze then
        # raises inside its reader, after which every request on the connection timed out.
        try:
            await self.nc.request(proto.PROBE, b"", timeout=PROBE_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            return  # the server's own answer: it is there

    def server_name(self) -> str:
        """The name of the NATS server this client is attached to now ("" if unknown)."""
        info = getattr(self.nc, "_server_info", None) or {}
        return str(info.get("server_name", ""))

    @property
    def hosts(self) -> KeyValue:
        return self.kv[proto.KV_HOSTS]

    @property
    def instances(self) -> KeyValue:
        return self.kv[proto.KV_INSTANCES]

    @property
    def activity(self) -> KeyValue:
        return self.kv[proto.KV_ACTIVITY]

    @property
    def leases(self) -> KeyValue:
        return self.kv[proto.KV_LEASES]

    @property
    def models(self) -> KeyValue:
        return self.kv[proto.KV_MODELS]

    @property
    def desired(self) -> KeyValue:
        return self.kv[proto.KV_DESIRED]

    @property
    def instance_keys(self) -> KeyValue:
        """Readable by the placer, the gateways and the operator only (lls/auth.py)."""
        return self.kv[proto.KV_INSTANCE_KEYS]

    def refuse_record(self, bucket: str, key: str, reason: str) -> None:
        """Report a KV record this service ignores: a WARNING and a `record.refused` event,
        once per record and reason (a forger rewriting it is not news each time)."""
        seen = (bucket, key, reason)
        if seen in self._refused:
            return
        if len(self._refused) >= MAX_REFUSALS_KEPT:
            self._refused.clear()
        self._refused.add(seen)
        log.warning("ignoring %s record %s: %s", bucket, key, reason)
        if len(self._reporting) >= MAX_REFUSAL_EVENTS:
            return
        event = proto.RecordRefused(
            bucket=bucket, key=key[:300], reason=reason[:1000], service=self.name
        )
        task = asyncio.ensure_future(self._report(event))
        self._reporting.add(task)
        task.add_done_callback(self._reporting.discard)

    async def _report(self, event: proto.RecordRefused) -> None:
        try:
            await self.emit(event)
        except Exception as e:  # noqa: BLE001 - the log line is the record that counts
            log.warning("cannot report an ignored record: %r", e)

    async def subscribe(self, subject: str, cb: MsgHandler, **kw: Any) -> Subscription:
        """A core-NATS subscription whose handler sees only messages published on `subject`.
        A JetStream consumer that anyone allowed to watch a stream can create may aim its
        deliveries at any subject (the delivery target is in the request body, which NATS
        permissions do not see); a delivered copy keeps its source subject (`$KV...`,
        `lls.cmd...`), so it is dropped here instead of being decoded as, say, a
        StopRequested (docs/security.md, "Consumers")."""

        async def guarded(msg: Msg) -> None:
            if not subject_matches(subject, msg.subject):
                log.warning("dropped a message on %s delivered to %s", msg.subject, subject)
                return
            await cb(msg)

        return await self.nc.subscribe(subject, cb=guarded, **kw)

    async def emit(self, event: proto.Event, msg_id: str | None = None) -> None:
        """Append a domain event to the event stream (`msg_id`: the server drops a second
        copy with the same id within the stream's duplicate window)."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.js.publish(event.subject(), proto.encode(event), timeout=5, headers=headers)

    async def emit_record(self, event: proto.InstanceChanged) -> None:
        """The event of a record's write, which must not be lost: tried now, and if the bus
        does not take it, again in the background for EVENT_RETRY_S. Its message id is the
        record's revision, so a publish that landed but timed out is not stored twice, and a
        late one is harmless: the log keeps the highest revision per instance."""
        msg_id = f"{event.instance_id}@{event.revision}"
        try:
            await self.emit(event, msg_id)
        except Exception as e:  # noqa: BLE001 - the bus is away or failing over: retry
            if len(self._retrying) >= MAX_PENDING_EVENTS:
                log.error(
                    "event of %s lost: %d others wait to be published", msg_id, MAX_PENDING_EVENTS
                )
                return
            log.warning("event of %s not published (%r); retrying", msg_id, e)
            task = asyncio.create_task(self._emit_later(event, msg_id))
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)

    async def _emit_later(self, event: proto.Event, msg_id: str) -> None:
        deadline = time.monotonic() + EVENT_RETRY_S
        pause = 0.5
        while True:
            await asyncio.sleep(pause)
            try:
                await self.emit(event, msg_id)
                log.info("event of %s published after a retry", msg_id)
                return
            except Exception as e:  # noqa: BLE001
                if time.monotonic() + pause > deadline:
                    log.error(
                        "event of %s lost after %.0f s of retries: %r", msg_id, EVENT_RETRY_S, e
                    )
                    return
                pause = min(pause * 2, 5.0)

    async def command(
        self, subject: str, cmd: proto.AgentCommand | proto.DownloaderCommand | proto.InspectModel
    ) -> None:
        """Send a command; a resend with the same cmd_id inside the dedup window is dropped.

        Dedup is per leader epoch: a new leader's resend of a deposed one's cmd_id (which the
        agent may have refused as stale) must not be dropped as a duplicate."""
        msg_id = f"{cmd.cmd_id}@{cmd.epoch}" if cmd.epoch else cmd.cmd_id
        await self.js.publish(
            subject, proto.encode(cmd), timeout=5, headers={"Nats-Msg-Id": msg_id}
        )

    async def put(self, bucket: KeyValue, key: str, record: object) -> int:
        return await bucket.put(proto.kv_key(key), proto.encode(record))  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._retrying:  # a last chance for events the bus did not take yet
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await asyncio.gather(*self._retrying, return_exceptions=True)
            for task in self._retrying:
                task.cancel()
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        try:
            async with asyncio.timeout(5):
                await self.nc.drain()
        except Exception:  # closing anyway
            await self.nc.close()


async def connect(
    url: str,
    name: str,
    *,
    creds: str | Path | None = None,
    tls: NatsTls | None = None,
    deadline_s: float = 30.0,
    limits: NatsLimits | None = None,
    replicas: int | None = None,
) -> Bus:
    """Connect as the identity in `creds` (default: the file named by $LLS_NATS_CREDS; none:
    no credentials) and bind the streams and buckets: the placer and the operator create or
    update them, every other identity waits for them (it may not create them).

    `url` may list several servers of one NATS cluster, comma-separated (seeds, tried in the
    order listed: nats-py learns the rest from the cluster and fails over between them).
    `replicas` (the config's `nats.replicas`) is how many servers hold each stream and
    bucket; None keeps what exists.

    Retries an unreachable server until `deadline_s`; a refused identity fails at once.
    """
    creds = creds or os.environ.get(auth.ENV_CREDS) or None
    ident = auth.load_identity(creds) if creds else None
    nc = Client()
    buses: list[Bus] = []
    refusals: list[str] = []

    async def on_state(state: str) -> None:
        if state == "reconnected" and buses:
            buses[0].reconnects += 1
        if not (nc.is_closed or nc.is_draining):  # our own close is not news
            log.warning("%s: nats %s", name, state)

    async def on_error(e: Exception) -> None:
        if "authorization violation" in str(e).lower():
            refusals.append(str(e))
        elif isinstance(e, ssl.SSLError):  # an untrusted certificate: retrying will not help
            refusals.extend([str(e)] * 4)
        await _log_error(e)

    options: dict[str, Any] = {}
    if ident is not None:
        options = {
            "user": ident.user,
            "password": ident.password,
            "inbox_prefix": ident.inbox_prefix,
        }
    if tls is not None:
        options["tls"] = tls_context(tls)
    connecting = asyncio.ensure_future(
        nc.connect(
            nats_servers(url),
            name=name,
            connect_timeout=5,
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            # In the order listed: a host's own node first, so that losing another host's
            # node costs this client nothing (nats-py shuffles them otherwise).
            dont_randomize=True,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=functools.partial(on_state, "disconnected"),
            reconnected_cb=functools.partial(on_state, "reconnected"),
            **options,
        )
    )
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline_s
    # nats-py retries a refused login forever; give a just-reloaded server a moment, then
    # say so instead of timing out silently.
    while not connecting.done() and len(refusals) < 4 and loop.time() < until:
        await asyncio.wait([connecting], timeout=0.1)
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        who = ident.user if ident else "no credentials"
        if refusals:
            raise PermissionError(f"NATS at {url} refused us ({who}): {refusals[-1]}")
        raise TimeoutError(f"NATS at {url} not reachable within {deadline_s:.0f} s")
    connecting.result()
    js = _JetStream(nc, timeout=10)
    declare = ident is None or ident.may_declare
    kv = await bind(js, declare, limits or NatsLimits(), replicas, until)
    buses.append(Bus(nc, js, kv, name))
    return buses[0]


def tls_context(tls: NatsTls) -> ssl.SSLContext:
    """Verify the server against the configured CA; present our certificate if we have one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(expand(tls.ca)))
    if tls.cert:
        ctx.load_cert_chain(str(expand(tls.cert)), str(expand(tls.key)))
    return ctx


def new_id() -> str:
    return uuid.uuid4().hex[:12]


async def _log_error(e: Exception) -> None:
    log.warning("nats: %s", e)


NO_MESSAGE = 10037  # JetStream's error code for "no message found"


async def kv_snapshot(bus: Bus, kv: KeyValue, typ: type[T], timeout: float = 10.0) -> dict[str, T]:
    """Every current record of a bucket (key -> decoded record), read in one pass.

    nats-py's `kv.keys()` decides "no more keys" from a race between the consumer's info and
    the messages already on their way, so a busy server can make it come back short or empty
    (the agent then took live instances for strangers). This reads the bucket's stream in
    sequence order, one stored message at a time (`next_by_subj`), to its end: a key's latest
    revision stays at or after the cursor until it is read (a write moves it to the end), so
    no key that exists throughout is missed, and a deletion read later drops its key.

    No consumer: an identity that only reads records needs no right to create one, and so
    no way to aim one's deliveries elsewhere (docs/security.md, "Consumers").
    A record whose body does not belong under its key (proto.key_mismatch) is reported and
    left out.
    """
    bucket = kv._name  # noqa: SLF001 - nats-py keeps the bucket name only here
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    out: dict[str, T] = {}
    seq = 1
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"reading KV {bucket}: not done within {timeout:.0f} s")
        try:
            async with asyncio.timeout(min(left, 2.0)):
                msg = await bus.js.get_msg(stream, seq=seq, subject=prefix + ">", next=True)
        except NotFoundError as e:
            if e.err_code == NO_MESSAGE:  # past the last message: done
                return out
            raise
        except (TimeoutError, nats.errors.TimeoutError):
            continue  # a slow or failing-over server: ask again until the deadline
        seq = msg.seq + 1
        key = (msg.subject or "")[len(prefix) :]
        op = msg.headers.get("KV-Operation") if msg.headers else None
        if op in ("DEL", "PURGE") or not msg.data:
            out.pop(key, None)
            continue
        try:
            rec = proto.decode(msg.data, typ)
        except msgspec.DecodeError as e:
            log.warning("ignoring bad %s record %s: %s", bucket, key, e)
            continue
        if (why := proto.key_mismatch(key, rec)) is not None:
            bus.refuse_record(bucket, key, why)  # read as if absent
            out.pop(key, None)
            continue
        out[key] = rec


async def watch_kv(
    bus: Bus,
    kv: KeyValue,
    typ: type,
    on_put: Callable[[str, Any, int], None],
    on_delete: Callable[[str], None],
    stop: asyncio.Event,
    on_initial_done: Callable[[], None] | None = None,
) -> None:
    """Mirror a KV bucket into callbacks until `stop`: every current value, then each change.

    `on_put(key, record, revision)` gets the decoded record and its revision (for `update`).
    A record whose body does not belong under its key (proto.key_mismatch) is reported and
    passed on as a deletion of that key.

    Re-establishes the watch after errors and after a reconnect (a restarted NATS server has
    forgotten the watch), replaying current values, so the caller's view converges to the
    bucket's state.
    """
    while not stop.is_set():
        try:
            generation = bus.reconnects
            watcher = await kv.watchall()
            try:
                while not stop.is_set() and bus.reconnects == generation:
                    try:
                        entry = await watcher.updates(timeout=1.0)
                    except (TimeoutError, nats.errors.TimeoutError):
                        continue
                    if entry is None:  # end of the initial values
                        if on_initial_done:
                            on_initial_done()
                        continue
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        on_delete(entry.key)
                        continue
                    try:
                        rec = proto.decode(entry.value, typ)
                    except msgspec.ValidationError as e:
                        log.warning("ignoring bad %s record %s: %s", kv._name, entry.key, e)
                        continue
                    if (why := proto.key_mismatch(entry.key, rec)) is not None:
                        # read as if deleted: whatever the key held before is not trusted now
                        bus.refuse_record(kv._name, entry.key, why)
                        on_delete(entry.key)
                        continue
                    on_put(entry.key, rec, entry.revision)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        except Exception as e:  # noqa: BLE001 - keep watching through bus trouble
            if stop.is_set():
                return
            log.warning("watch of %s failed (%s); retrying", getattr(kv, "_name", "kv"), e)
            await wait_event(stop, 1.0)
