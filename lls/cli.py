"""`lls`: an operator's view of the system, Ollama-like.

lls ps                 instances with host, GPUs, state and idle time; pending requests;
                       live gateways' warnings (open to the network with no API keys);
                       models whose GGUF has no chat template and none is configured
lls load MODEL         start MODEL now and wait until it is ready (stored request: a placer
                       that starts within --timeout still carries it out); --pin keeps
                       it loaded (no idle stop, no eviction) until unpinned or stopped
lls unpin MODEL        end the pin; the idle timeout applies again
lls stop MODEL         stop MODEL's instances and wait until none is left (same; ends a pin)
lls pull MODEL         download MODEL's file to a host's store, with a progress bar
lls hosts add HOST     NATS identities for a new GPU host (and what to copy there)
lls usage              requests and tokens per API key and model (the gateway's /metrics)
lls reload             every service of `make run` re-reads the config file (SIGHUP)
lls events             the event history: --since 1h, --model M, --kind swap, --follow
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from prometheus_client.parser import text_string_to_metric_families

import proto
from lls import auth, chat_templates
from lls.bus import Bus, connect, kv_snapshot, new_id
from lls.config import Config, ConfigError, load, store_filename_of
from lls.run import pid_file


def fmt_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


async def _records(bus: Bus, bucket, typ):  # type: ignore[no-untyped-def]
    return list((await kv_snapshot(bus, bucket, typ)).values())


# A gateway reports every second; one silent this long has stopped (its record stays behind).
GATEWAY_LIVE_S = 10.0


async def cmd_ps(bus: Bus, cfg: Config, args: argparse.Namespace) -> int:
    recs = await _records(bus, bus.instances, proto.InstanceRecord)
    acts = await _records(bus, bus.activity, proto.ActivityReport)
    last_used: dict[str, float] = {}
    for rep in acts:
        for iid, a in rep.instances.items():
            last_used[iid] = max(last_used.get(iid, 0), a.last_used)
    if not args.all:
        recs = [r for r in recs if r.state not in proto.END_STATES]
    rows = [tuple("MODEL INSTANCE HOST GPUS STATE BACKEND MEMORY IDLE BINARY REASON".split())]
    now = time.time()
    for r in sorted(recs, key=lambda r: (r.model, r.created)):
        used = last_used.get(r.instance_id, r.ready_at or r.updated)
        idle = fmt_age(now - used) if r.state == proto.InstanceState.READY else "-"
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
    wants = await _records(bus, bus.desired, proto.DesiredModel)
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
    hosts = await _records(bus, bus.hosts, proto.HostRecord)
    infos = await _records(bus, bus.models, proto.ModelInfo)
    headers = [(f.model, f.gguf) for h in hosts for f in h.files]
    headers += [
        (i.model, i.gguf)
        for i in infos
        if i.model in cfg.models and cfg.models[i.model].url == i.url
    ]
    configured = {name: m.chat_template for name, m in cfg.models.items()}
    return sorted(chat_templates.warnings(configured, headers).values())


async def _wait_events(bus: Bus, subject: str, until, wait_s: float) -> int:  # type: ignore[no-untyped-def]
    """Feed events on `subject` to `until(event)` (returns an exit code or None) until done."""
    queue: asyncio.Queue[proto.Event] = asyncio.Queue(maxsize=1000)

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        try:
            queue.put_nowait(proto.decode(msg.data, proto.Event))
        except (msgspec.ValidationError, asyncio.QueueFull):
            pass

    sub = await bus.subscribe(subject, cb=on_msg)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"\nerror: no result within {wait_s:.0f} s", file=sys.stderr)
                return 1
            try:
                async with asyncio.timeout(left):
                    ev = await queue.get()
            except TimeoutError:
                continue
            code = until(ev)
            if code is not None:
                return code
    finally:
        await sub.unsubscribe()


PICKUP_S = 30.0  # a request no placer took up this long fails (is a placer running?)
POLL_S = 0.25  # how often the request's record is read back


async def _store_request(
    bus: Bus, model: str, wanted: str, deadline_s: float, pinned: bool | None = None
) -> str:
    """Write `wanted` as the model's request in KV desired (compare-and-set over whatever is
    there: the latest request wins); returns its request id. `pinned` None keeps the pin
    that is there; a stop always ends it."""
    key = proto.kv_key(model)
    now = time.time()
    want = proto.DesiredModel(
        model=model,
        wanted=wanted,
        since=now,
        by="cli",
        request_id=f"cli-{new_id()}",
        reason=f"lls {'load' if wanted == proto.WANT_RUN else 'stop'}",
        until=now + deadline_s,
    )
    if wanted == proto.WANT_STOP:
        pinned = False
    for _ in range(10):
        try:
            try:
                entry = await bus.desired.get(key)
            except KeyNotFoundError:
                entry = None
            old = proto.decode(entry.value, proto.DesiredModel) if entry and entry.value else None
            keep = pinned if pinned is not None else bool(old and old.pinned)
            want.pinned, want.pinned_by = keep, "cli" if keep else ""
            if keep and pinned is None and old:
                want.pinned_by = old.pinned_by
            if entry is None:
                await bus.desired.create(key, proto.encode(want))
            else:
                await bus.desired.update(key, proto.encode(want), last=entry.revision)
            return want.request_id
        except KeyWrongLastSequenceError:
            continue  # written meanwhile: ours goes over the newer one
    raise RuntimeError(f"could not store the request for {model}: KV desired keeps changing")


async def _read_request(bus: Bus, model: str) -> tuple[proto.DesiredModel | None, int]:
    try:
        entry = await bus.desired.get(proto.kv_key(model))
    except KeyNotFoundError:
        return None, 0
    if not entry.value:
        return None, entry.revision or 0
    return proto.decode(entry.value, proto.DesiredModel), entry.revision or 0


async def _withdraw(bus: Bus, model: str, request_id: str, why: str) -> proto.DesiredModel | None:
    """Give up our pending request (it must not start or stop the model after we reported
    failure); returns the record as it stands when a placer finished it meanwhile."""
    for _ in range(5):
        want, rev = await _read_request(bus, model)
        if want is None or want.request_id != request_id:
            return None  # superseded by a newer request: that one is not ours to withdraw
        if not want.wanted:
            return want  # done after all: report what happened
        done = msgspec.structs.replace(want, wanted="", outcome=f"withdrawn: {why}")
        done.done_at = time.time()
        try:
            await bus.desired.update(proto.kv_key(model), proto.encode(done), last=rev)
            return None
        except KeyWrongLastSequenceError:
            continue
    return None


async def _request(
    bus: Bus, model: str, wanted: str, timeout: float, on_event, pinned: bool | None = None
) -> int:  # type: ignore[no-untyped-def]
    """Store the request, then follow it until the placer says it is done (its outcome in
    the record), printing the model's events meanwhile (`on_event`), within `timeout`.
    A request that no placer took up, or that did not finish in time, is withdrawn."""
    queue: asyncio.Queue[proto.Event] = asyncio.Queue(maxsize=1000)

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        try:
            queue.put_nowait(proto.decode(msg.data, proto.Event))
        except (msgspec.ValidationError, asyncio.QueueFull):
            pass

    verb, done_word = ("start", "started") if wanted == proto.WANT_RUN else ("stop", "stopped")
    sub = await bus.subscribe("lls.evt.>", cb=on_msg)  # before the request: miss nothing
    finished = False
    request_id = ""
    try:
        request_id = await _store_request(bus, model, wanted, timeout, pinned)
        start = time.monotonic()
        pickup = min(PICKUP_S, timeout)
        said_waiting = False
        failure = ""
        while True:
            while not queue.empty():
                on_event(queue.get_nowait())
            want, _rev = await _read_request(bus, model)
            if want is None or want.request_id != request_id:
                finished = True
                who = f"{want.by}'s {want.wanted or 'request'}" if want else "its removal"
                print(
                    f"error: the request to {verb} {model} was replaced by {who}", file=sys.stderr
                )
                return 1
            if not want.wanted:
                finished = True
                await asyncio.sleep(0.2)  # the last instance events, sent beside the record
                while not queue.empty():
                    on_event(queue.get_nowait())
                return _report(model, want.outcome)
            waited = time.monotonic() - start
            if not want.seen_by and waited >= pickup:
                failure = (
                    f"error: no placer acted on the request within {pickup:.0f} s: is a placer "
                    f"running? (request withdrawn: {model} was not {done_word})"
                )
                break
            if waited >= timeout:
                failure = (
                    f"error: {model} did not {verb} within {timeout:.0f} s (request withdrawn; "
                    "see lls ps and lls events)"
                )
                break
            if not want.seen_by and waited >= 3 and not said_waiting:
                said_waiting = True
                print(f"{model}: no placer has taken the request yet; waiting", flush=True)
            await asyncio.sleep(POLL_S)
        done = await _withdraw(bus, model, request_id, f"the asker gave up after {waited:.0f} s")
        finished = True
        if done is not None:  # a placer finished it just now after all
            return _report(model, done.outcome)
        print(failure, file=sys.stderr)
        return 1
    finally:
        await sub.unsubscribe()
        if request_id and not finished:  # interrupted (Ctrl-C): leave nothing pending behind
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await _withdraw(bus, model, request_id, "the asker was interrupted")


def _report(model: str, outcome: str) -> int:
    """The placer's outcome of a request: 0 when it was carried out."""
    if outcome.startswith(("ready", "stopped")):
        print(f"{model}: {outcome}")
        return 0
    print(f"error: {model}: {outcome or 'no outcome recorded'}", file=sys.stderr)
    return 1


async def cmd_load(bus: Bus, cfg: Config, args: argparse.Namespace) -> int:
    """Store a request to run the model; the placer starts it (now, or as soon as one runs)
    and records the outcome once an instance is READY. Without --pin, its idle timeout stops
    it later as usual; with it, the model stays loaded until `lls unpin` or `lls stop`."""
    model = args.model

    def on_event(ev: proto.Event) -> None:
        if isinstance(ev, proto.InstanceChanged) and ev.model == model:
            print(f"{model}: {ev.state.value} {ev.reason}".rstrip(), flush=True)
        elif isinstance(ev, proto.DownloadProgress) and ev.model == model:
            _progress(ev)

    pinned = True if args.pin else None
    return await _request(bus, model, proto.WANT_RUN, args.timeout, on_event, pinned)


async def cmd_unpin(bus: Bus, cfg: Config, args: argparse.Namespace) -> int:
    """End a model's pin (compare-and-set); it stays running until its idle timeout."""
    key = proto.kv_key(args.model)
    for _ in range(10):
        want, rev = await _read_request(bus, args.model)
        if want is None or not want.pinned:
            print(f"{args.model}: not pinned")
            return 0
        unpinned = msgspec.structs.replace(want, pinned=False, pinned_by="")
        try:
            await bus.desired.update(key, proto.encode(unpinned), last=rev)
        except KeyWrongLastSequenceError:
            continue
        print(f"{args.model}: unpinned; its idle timeout applies again")
        return 0
    print(f"error: could not unpin {args.model}: KV desired keeps changing", file=sys.stderr)
    return 1


async def cmd_stop(bus: Bus, cfg: Config, args: argparse.Namespace) -> int:
    """Store a request to stop the model; the placer stops its live instances (now, or as
    soon as one runs) and records the outcome once none is left."""
    model = args.model
    shown: set[tuple[str, str]] = set()  # the placer and the agent both say "stopping"

    def on_event(ev: proto.Event) -> None:
        if (
            isinstance(ev, proto.InstanceChanged)
            and ev.model == model
            and ev.state in (proto.InstanceState.STOPPING, proto.InstanceState.STOPPED)
            and (ev.instance_id, ev.state.value) not in shown
        ):
            shown.add((ev.instance_id, ev.state.value))
            print(f"{model}: {ev.instance_id} on {ev.host} {ev.state.value}", flush=True)

    return await _request(bus, model, proto.WANT_STOP, args.timeout, on_event)


def _progress(ev: proto.DownloadProgress) -> None:
    if ev.total:
        done = ev.bytes / ev.total
        bar = "#" * int(done * 30)
        eta = f" ETA {fmt_age(ev.eta_s)}" if ev.eta_s is not None else ""
        line = (
            f"\r{ev.model} [{bar:<30}] {done:6.1%} {ev.bytes / 1e6:,.1f}/{ev.total / 1e6:,.1f} MB "
            f"{ev.rate_bps / 1e6:.1f} MB/s{eta}"
        )
    else:
        line = f"\r{ev.model} {ev.bytes / 1e6:,.1f} MB {ev.rate_bps / 1e6:.1f} MB/s"
    print(line, end="", flush=True)


async def cmd_pull(bus: Bus, cfg: Config, args: argparse.Namespace) -> int:
    model = args.model
    host = args.host
    if not host:
        hosts = await _records(bus, bus.hosts, proto.HostRecord)
        alive = sorted(h.host_id for h in hosts if time.time() - h.ts < 10)
        if not alive:
            print("error: no host is heartbeating; start an agent first", file=sys.stderr)
            return 1
        host = alive[0]

    def until(ev: proto.Event) -> int | None:
        if isinstance(ev, proto.DownloadProgress) and ev.model == model:
            _progress(ev)
        elif isinstance(ev, proto.DownloadCompleted) and ev.model == model:
            how = f" (reused {ev.reused})" if ev.reused else ""
            print(f"\n{model}: {ev.size / 1e6:,.1f} MB in {ev.host}'s store{how}")
            return 0
        elif isinstance(ev, proto.DownloadFailed) and ev.model == model:
            print(f"\nerror: {ev.reason}", file=sys.stderr)
            return 1
        return None

    mcfg = cfg.models[model]
    task = asyncio.create_task(_wait_events(bus, "lls.evt.download.>", until, args.timeout))
    await asyncio.sleep(0.1)
    await bus.command(
        proto.cmd_download(host),
        proto.DownloadFile(
            cmd_id=f"pull-{new_id()}",
            model=model,
            url=mcfg.url,
            filename=store_filename_of(model, mcfg),
            sha256=mcfg.sha256,
        ),
    )
    return await task


def usage_rows(metrics_text: str) -> list[tuple[str, ...]]:
    """Per key and model, from the gateway's /metrics: requests, those refused by the key's
    limits (429), prompt and completion tokens."""
    table: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "lls_key_requests_total":
                row = table.setdefault((s.labels["key"], s.labels["model"]), [0.0] * 4)
                row[0] += s.value
                if s.labels.get("code") == "429":
                    row[1] += s.value
            elif s.name == "lls_tokens_total":
                row = table.setdefault((s.labels["key"], s.labels["model"]), [0.0] * 4)
                row[2 if s.labels.get("kind") == "prompt" else 3] += s.value
    return [(k, m, *(f"{v:.0f}" for v in row)) for (k, m), row in sorted(table.items())]


def gateway_url(cfg: Config) -> str:
    host = cfg.gateway.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    return f"http://{host}:{cfg.gateway.port}"


def cmd_usage(cfg: Config, args: argparse.Namespace) -> int:
    base = (args.gateway or gateway_url(cfg)).rstrip("/")
    # /metrics needs an admin key when keys are set: --key, $LLS_API_KEY, else the config's
    key = args.key or os.environ.get("LLS_API_KEY", "")
    key = key or next((k.key for k in cfg.gateway.api_keys if k.admin), "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(f"{base}/metrics", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        print(f"error: cannot reach the gateway at {base}: {e}", file=sys.stderr)
        return 2
    if r.status_code in (401, 403):
        print(f"error: {base}/metrics needs an admin key (--key or $LLS_API_KEY)", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"error: {base}/metrics answered {r.status_code}", file=sys.stderr)
        return 1
    rows = usage_rows(r.text)
    if not rows:
        print("no requests counted yet (counters start when the gateway starts)")
        return 0
    rows.insert(0, ("KEY", "MODEL", "REQUESTS", "REFUSED", "PROMPT_TOKENS", "COMPLETION_TOKENS"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_reload(cfg: Config, args: argparse.Namespace) -> int:
    """SIGHUP to `make run` (lls.run), which passes it to every service. The config was
    loaded before this runs, so a bad one is refused here already, naming the key."""
    path = pid_file(cfg)
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        print(
            f"error: no `make run` found ({path} names no running process). Services run "
            "apart reload on SIGHUP: send it to each (e.g. `docker kill -s HUP NAME`)",
            file=sys.stderr,
        )
        return 1
    if b"lls.run" not in cmdline:  # a stale pid file whose pid was taken by another process
        print(f"error: process {pid} from {path} is not `make run`", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"reloading {args.config}: every service re-reads it (see their logs and events)")
    return 0


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


COMMANDS = {
    "ps": cmd_ps,
    "load": cmd_load,
    "unpin": cmd_unpin,
    "stop": cmd_stop,
    "pull": cmd_pull,
    "events": cmd_events,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lls", description="Operate a llama-scheduler cluster.")
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--nats", default="", help="NATS URL (default: the config's, or :4222)")
    ap.add_argument(
        "--nats-creds",
        default="",
        help="identity file (default: $LLS_NATS_CREDS, else nats.credentials_dir/cli.json)",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    ps = sub.add_parser("ps", help="list instances")
    ps.add_argument("-a", "--all", action="store_true", help="include stopped and failed ones")
    for name, helptext in (
        ("load", "start a model now and wait until it is ready"),
        ("stop", "stop a model's instances and wait until they are stopped"),
        ("pull", "download a model's file"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model")
        p.add_argument(
            "--timeout",
            type=float,
            default=60 if name == "stop" else 600,
            help="seconds to wait for the outcome; then the request is withdrawn and the "
            f"exit code is 1 (also when no placer took it up within {PICKUP_S:.0f} s)"
            if name != "pull"
            else "seconds to wait for the download",
        )
        if name == "pull":
            p.add_argument("--host", default="", help="host id (default: the first alive host)")
        if name == "load":
            p.add_argument(
                "--pin",
                action="store_true",
                help="keep it loaded (never idle-stopped or evicted) until lls unpin or lls stop",
            )
    unpin = sub.add_parser("unpin", help="end a model's pin (lls load --pin)")
    unpin.add_argument("model")
    hosts = sub.add_parser("hosts", help="manage GPU hosts' NATS identities")
    hosts_sub = hosts.add_subparsers(dest="hosts_command", required=True)
    hosts_sub.add_parser("add", help="create agent-HOST and downloader-HOST").add_argument("host")
    sub.add_parser("reload", help="every service re-reads the config file")
    ev = sub.add_parser("events", help="the event history (placements, swaps, replicas...)")
    ev.add_argument("--since", default="1h", help="how far back: 90s, 10m, 1h, 2d (default 1h)")
    ev.add_argument("--model", dest="only_model", default="", help="only this model's events")
    ev.add_argument("--kind", default="", help="only kinds starting with this, e.g. swap")
    ev.add_argument("-f", "--follow", action="store_true", help="then keep printing new ones")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    use = sub.add_parser("usage", help="requests and tokens per API key and model")
    use.add_argument("--gateway", default="", help="gateway URL (default: the config's)")
    use.add_argument(
        "--key", default="", help="admin API key (default: $LLS_API_KEY, else the config's)"
    )
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.command == "usage":  # the gateway's /metrics: no bus needed
        raise SystemExit(cmd_usage(cfg, args))
    if args.command == "reload":  # a signal to this machine's `make run`: no bus needed
        raise SystemExit(cmd_reload(cfg, args))
    if args.command == "hosts":  # files only: no bus needed
        try:
            print(auth.add_host(auth.credentials_dir(cfg), args.host, cfg.nats.tls))
        except (auth.AuthError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        return
    try:
        creds = auth.resolve(cfg, "cli", args.nats_creds)
    except auth.AuthError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(args, "model", None) and args.model not in cfg.models:
        raise SystemExit(f"error: model {args.model!r} is not in {args.config}")
    url = args.nats or (
        cfg.nats.url if cfg.nats.url != "embedded" else f"nats://127.0.0.1:{cfg.nats.port}"
    )

    async def go() -> int:
        try:
            bus = await connect(
                url,
                "cli",
                creds=creds,
                tls=cfg.nats.tls,
                deadline_s=10,
                limits=cfg.nats.limits,
                replicas=cfg.nats.replicas,
            )
        except Exception as e:  # noqa: BLE001
            print(f"error: cannot reach NATS at {url}: {e}", file=sys.stderr)
            return 2
        try:
            return await COMMANDS[args.command](bus, cfg, args)
        finally:
            await bus.close()

    raise SystemExit(asyncio.run(go()))


if __name__ == "__main__":
    main()
