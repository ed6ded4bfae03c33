"""`lls load`, `lls stop`, `lls unpin` and `lls pull`: ask the cluster for something and
follow it to its outcome. Load and stop are stored requests (KV desired) that a placer
carries out, now or once one runs; pull is a download command to one host's downloader."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

import proto
from lls.bus import Bus, new_id
from lls.cli_views import fmt_age, records
from lls.config import Config, store_filename_of

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


async def cmd_pull(bus: Bus, cfg: Config, args: argparse.Namespace) -> int:
    model = args.model
    host = args.host
    if not host:
        hosts = await records(bus, bus.hosts, proto.HostRecord)
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
