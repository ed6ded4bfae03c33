"""`lls ps` and `lls events`: what runs now, and what happened (the event history)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import sys
import time

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

import proto
from lls import chat_templates
from lls.bus import Bus, kv_snapshot
from lls.config import Config


def fmt_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def idle_text(
    rec: proto.InstanceRecord, last_used: float | None, horizon: float, now: float
) -> str:
    """How long a READY instance has been idle, for `lls ps`. Gateways list only what they
    used within their report's `horizon` (compact reports): one none lists has been idle
    at least that long, since when they do not say."""
    if rec.state != proto.InstanceState.READY:
        return "-"
    since = rec.ready_at or rec.updated
    if last_used is None and 0 < horizon < now - since:
        return f"over {fmt_age(horizon)}"
    return fmt_age(now - (last_used if last_used is not None else since))


async def records(bus: Bus, bucket, typ):  # type: ignore[no-untyped-def]
    return list((await kv_snapshot(bus, bucket, typ)).values())


# A gateway reports every second; one silent this long has stopped (its record stays behind).
GATEWAY_LIVE_S = 10.0


async def cmd_ps(bus: Bus, cfg: Config, args: argparse.Namespace) -> int:
    recs = await records(bus, bus.instances, proto.InstanceRecord)
    acts = await records(bus, bus.activity, proto.ActivityReport)
    last_used: dict[str, float] = {}
    horizon = max((rep.horizon for rep in acts), default=0.0)  # compact reports: see below
    for rep in acts:
        for iid, a in rep.instances.items():
            last_used[iid] = max(last_used.get(iid, 0), a.last_used)
    if not args.all:
        recs = [r for r in recs if r.state not in proto.END_STATES]
    rows = [tuple("MODEL INSTANCE HOST GPUS STATE BACKEND MEMORY IDLE BINARY REASON".split())]
    now = time.time()
    for r in sorted(recs, key=lambda r: (r.model, r.created)):
        idle = idle_text(r, last_used.get(r.instance_id), horizon, now)
        gpus = ",".join(map(str, r.gpus)) or "cpu"
        rows.append(
            (
                r.model,
                r.instance_id,
                r.host or "-",
                gpus,
                r.state.value,
                r.backend or "-",  # empty until the agent starts it (or an older agent)
                f"{r.memory_mib} MiB",
                idle,
                r.binary or "-",
                r.reason[:60],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    wants = await records(bus, bus.desired, proto.DesiredModel)
    for w in sorted((w for w in wants if w.wanted), key=lambda w: w.model):
        who = f"taken up by {w.seen_by}" if w.seen_by else "no placer has taken it up yet"
        print(f"request: {w.wanted} {w.model} (by {w.by}, {fmt_age(now - w.since)} ago; {who})")
    for w in sorted((w for w in wants if w.pinned), key=lambda w: w.model):
        print(f"pinned: {w.model} (by {w.pinned_by or '?'}; lls unpin {w.model})")
    for rep in sorted(acts, key=lambda r: r.gateway_id):
        if now - rep.ts < GATEWAY_LIVE_S:  # e.g. open to the network with no API keys
            for warning in rep.warnings:
                print(f"warning: gateway {rep.gateway_id}: {warning}")
    for line in await _template_warnings(bus, cfg):
        print(f"warning: {line}")
    return 0


async def _template_warnings(bus: Bus, cfg: Config) -> list[str]:
    """Configured models whose GGUF (in a host's store, or read from its source) has no chat
    template while none is configured."""
    hosts = await records(bus, bus.hosts, proto.HostRecord)
    infos = await records(bus, bus.models, proto.ModelInfo)
    headers = [(f.model, f.gguf) for h in hosts for f in h.files]
    headers += [
        (i.model, i.gguf)
        for i in infos
        if i.model in cfg.models and cfg.models[i.model].url == i.url
    ]
    configured = {name: m.chat_template for name, m in cfg.models.items()}
    return sorted(chat_templates.warnings(configured, headers).values())


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in '90s', '10m', '1h30m', '2d' (ValueError otherwise)."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a duration like 90s, 10m, 1h or 2d: {text!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


_QUIET_FIELDS = frozenset({"ts", "v", "kind", "model"})


def event_line(ev: proto.Event) -> str:
    """One event as one line: time, kind, model, then its other fields."""
    kind = ev.subject().removeprefix("lls.evt.")
    when = datetime.datetime.fromtimestamp(ev.ts).strftime("%Y-%m-%d %H:%M:%S")
    fields = []
    for name in ev.__struct_fields__:
        value = getattr(ev, name)
        if name in _QUIET_FIELDS or value in (None, "", [], {}):
            continue
        if isinstance(value, float):
            value = f"{value:.3g}"
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        elif hasattr(value, "value"):  # an enum
            value = value.value
        fields.append(f"{name}={value}")
    return f"{when}  {kind:<20} {getattr(ev, 'model', '-'):<16} {' '.join(fields)}".rstrip()


def event_matches(ev: proto.Event, model: str, kind: str) -> bool:
    """--model: the event's model (or an instance or host id naming it); --kind: a prefix of
    its subject's kind, e.g. "swap" or "instance.ready"."""
    if kind and not ev.subject().removeprefix("lls.evt.").startswith(kind):
        return False
    return not model or getattr(ev, "model", None) == model


async def cmd_events(bus: Bus, _cfg: Config, args: argparse.Namespace) -> int:
    """Print the event history from --since on, oldest first; with --follow, then live."""
    try:
        since_s = parse_duration(args.since)
    except ValueError as e:
        print(f"error: --since: {e}", file=sys.stderr)
        return 2
    start = datetime.datetime.fromtimestamp(time.time() - since_s, datetime.UTC)
    queue: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue(maxsize=10_000)

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        await queue.put((msg.data, msg.metadata.num_pending))

    sub = await bus.js.subscribe(
        proto.EVENTS_SUBJECTS,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.BY_START_TIME,
        config=ConsumerConfig(opt_start_time=start.isoformat().replace("+00:00", "Z")),
    )
    shown = 0
    try:
        while True:
            try:
                # an empty history (or the end of it) shows as a second of silence
                async with asyncio.timeout(None if args.follow else 1.0):
                    data, pending = await queue.get()
            except TimeoutError:
                return 0
            try:
                ev = proto.decode(data, proto.Event)
            except msgspec.ValidationError:
                continue  # a kind this CLI does not know (a newer service)
            if event_matches(ev, args.only_model, args.kind):
                print(msgspec.json.encode(ev).decode() if args.json else event_line(ev))
                shown += 1
            if not args.follow and pending == 0:
                return 0
    finally:
        await sub.unsubscribe()
        if not shown and not args.follow:
            print(f"no events in the last {args.since}", file=sys.stderr)
