"""The bus is closed: identities, per-role permissions and TLS on a real nats-server.

Every denial is shown two ways: the action fails, and the server's own error names the
subject it refused (so a test cannot pass by timing out for another reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import nats.errors
import pytest
import yaml
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError

import proto
from conftest import ROOT, NatsServer, free_port, require
from lls import auth
from lls.aio import wait_event
from lls.bus import Bus, connect, kv_snapshot, watch_kv
from lls.config import ConfigError, NatsTls, parse
from lls.consume import consume, durable_config

CMDS = proto.CMDS_STREAM


@pytest.fixture
async def as_user(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Callable[[str], Awaitable[Bus]]]:
    """as_user(user) -> a Bus connected as that identity (hosts get theirs on demand)."""
    caplog.set_level(logging.WARNING, logger="lls.bus")
    opened: list[Bus] = []

    async def open_as(user: str) -> Bus:
        for p in auth.PER_HOST:
            if user.startswith(p + "-"):
                nats_server.add_host(user[len(p) + 1 :])
        creds = auth.identity_file(nats_server.auth, user)
        for attempt in range(3):
            try:
                bus = await connect(nats_server.url, user, creds=creds)
                break
            except TimeoutError:
                # A connection made while the server applies the SIGHUP reload (a new host's
                # identities) once had no answer to its first request (CI): connect again.
                if attempt == 2:
                    raise
        opened.append(bus)
        return bus

    yield open_as
    for bus in opened:
        await bus.close()


async def refused(
    action: Awaitable[object], subject: str, caplog: pytest.LogCaptureFixture, kind: str = "publish"
) -> None:
    """The server reports a permissions violation for `subject`, and `action` did not succeed
    (a denied request gets no reply: it is cancelled once the server has said why)."""
    want = f'permissions violation for {kind} to "{subject}"'.lower()
    task = asyncio.ensure_future(action)
    deadline = time.monotonic() + 5
    while want not in caplog.text.lower():
        assert time.monotonic() < deadline, f"no violation for {subject}:\n{caplog.text}"
        if task.done() and task.exception() is None:
            pytest.fail(f"{subject}: allowed")
        await asyncio.sleep(0.02)
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    assert task.cancelled() or task.exception() is not None, f"{subject}: allowed"


async def pending(bus: Bus, subject: str) -> int:
    """Messages waiting on a command subject (read by the operator)."""
    info = await bus.js.stream_info(CMDS, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


# ------------------------------------------------------------------ who gets in


async def test_no_credentials_and_a_wrong_password_are_refused(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(auth.ENV_CREDS)
    t0 = time.monotonic()
    with pytest.raises(PermissionError, match="no credentials"):
        await connect(nats_server.url, "outsider")
    forged = tmp_path / "forged.json"
    forged.write_text('{"user": "placer", "password": "guess"}')
    with pytest.raises(PermissionError, match="placer"):
        await connect(nats_server.url, "outsider", creds=forged)
    assert time.monotonic() - t0 < 10  # refused promptly, not after the 30 s deadline


def test_identity_files_are_private_and_the_server_knows_each_one(
    nats_server: NatsServer,
) -> None:
    nats_server.add_host("gpu-a")
    assert stat.S_IMODE(nats_server.auth.stat().st_mode) == 0o700
    users = {p.stem for p in nats_server.auth.glob("*.json")}
    assert users == {"gateway", "placer", "ui", "cli", "agent-gpu-a", "downloader-gpu-a"}
    for path in [*nats_server.auth.glob("*.json"), nats_server.auth / auth.SERVER_CONF]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# ------------------------------------------------------------------ what each may do


async def test_gateway_publishes_demand_but_cannot_command_agents(
    as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await as_user("gateway")
    await gw.emit(proto.Demand(model="m", gateway_id="g1"))  # what it is for
    await gw.put(gw.activity, "g1", proto.LeaseRecord(holder="g1", ts=1.0))
    assert (await kv_snapshot(gw, gw.instances, proto.InstanceRecord)) == {}
    subject = proto.cmd_agent("h1")
    cmd = proto.StopInstance(cmd_id="c1", instance_id="x-0123abcd")
    await refused(gw.command(subject, cmd), subject, caplog)
    await refused(gw.put(gw.instances, "x", b"{}"), f"$KV.{proto.KV_INSTANCES}.x", caplog)
    assert await pending(bus, subject) == 0


async def test_an_agent_consumes_only_its_own_commands_and_commands_nobody(
    as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    a = await as_user("agent-A")
    await as_user("agent-B")  # host B exists too
    for host in ("A", "B"):
        await bus.command(
            proto.cmd_agent(host), proto.StopInstance(cmd_id=f"c-{host}", instance_id="x")
        )

    own = proto.cmd_agent("A")
    sub = await a.js.pull_subscribe(
        own, durable="agent-A", stream=CMDS, config=durable_config("agent-A", own)
    )
    [msg] = await sub.fetch(1, timeout=5)
    assert proto.decode(msg.data, proto.AgentCommand).cmd_id == "c-A"
    await msg.ack()
    await sub.unsubscribe()

    other = proto.cmd_agent("B")
    js = a.nc.jetstream(timeout=1)
    # B's durable, or its own durable name pointed at B's subject: both refused.
    await refused(
        js.pull_subscribe(other, durable="agent-B", stream=CMDS),
        f"$JS.API.CONSUMER.INFO.{CMDS}.agent-B",
        caplog,
    )
    await refused(
        js.add_consumer(CMDS, durable_config("agent-A2", other).evolve(name="agent-A2")),
        f"$JS.API.CONSUMER.CREATE.{CMDS}.agent-A2.{other}",
        caplog,
    )
    # Listening in on the subject, or on every command, is refused too.
    await a.nc.subscribe("lls.cmd.>")
    await a.nc.flush()
    await refused(asyncio.sleep(5), "lls.cmd.>", caplog, kind="subscription")
    assert await pending(bus, other) == 1  # B's command is still there for B

    for subject in (other, own, proto.cmd_download("B"), proto.cmd_inspect()):
        await refused(
            a.command(subject, proto.StopInstance(cmd_id="forged", instance_id="x")),
            subject,
            caplog,
        )


async def test_an_agent_writes_its_own_host_records_only(
    as_user, caplog: pytest.LogCaptureFixture
) -> None:
    a = await as_user("agent-A")
    record = proto.encode(proto.LeaseRecord(holder="A", ts=1.0))
    await a.hosts.put("A", record)
    await refused(a.hosts.put("B", record), f"$KV.{proto.KV_HOSTS}.B", caplog)
    await refused(a.leases.put("placer", record), f"$KV.{proto.KV_LEASES}.placer", caplog)
    await refused(a.emit(proto.Demand(model="m", gateway_id="g")), "lls.evt.demand", caplog)
    # instance records are keyed <host>.<instance id>: its own host's only
    await a.instances.put(proto.instance_key("A", "m-0000000a"), record)
    other = proto.instance_key("B", "m-0000000b")
    await refused(a.instances.put(other, record), f"$KV.{proto.KV_INSTANCES}.{other}", caplog)


async def test_no_identity_can_empty_a_bucket_with_a_rollup(as_user, bus: Bus) -> None:
    await bus.hosts.put("B", proto.encode(proto.LeaseRecord(holder="B", ts=1.0)))
    a = await as_user("agent-A")
    record = proto.encode(proto.LeaseRecord(holder="A", ts=1.0))
    with pytest.raises(Exception, match="(?i)rollup"):
        await a.js.publish(f"$KV.{proto.KV_HOSTS}.A", record, headers={"Nats-Rollup": "all"})
    assert (await bus.hosts.get("B")).value  # host B's record is still there


async def test_a_downloader_takes_its_downloads_and_shared_inspections_only(
    as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    d = await as_user("downloader-A")
    for subject in (proto.cmd_download("A"), proto.cmd_inspect()):
        durable = "downloader-A" if "download" in subject else "inspector"
        await d.js.pull_subscribe(
            subject, durable=durable, stream=CMDS, config=durable_config(durable, subject)
        )
    js = d.nc.jetstream(timeout=1)
    await refused(
        js.pull_subscribe(proto.cmd_download("B"), durable="downloader-B", stream=CMDS),
        f"$JS.API.CONSUMER.INFO.{CMDS}.downloader-B",
        caplog,
    )
    await d.put(d.models, "m", proto.LeaseRecord(holder="x", ts=1.0))
    await refused(d.put(d.hosts, "A", b"{}"), f"$KV.{proto.KV_HOSTS}.A", caplog)


async def test_the_ui_only_reads(as_user, bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    await bus.put(bus.hosts, "A", proto.LeaseRecord(holder="A", ts=1.0))
    await bus.emit(proto.Demand(model="m", gateway_id="g"))
    ui = await as_user("ui")
    assert set(await kv_snapshot(ui, ui.hosts, proto.LeaseRecord)) == {"A"}
    assert (await ui.hosts.get("A")).value
    watcher = await ui.hosts.watchall()
    assert (await watcher.updates(timeout=5)).key == "A"
    await watcher.stop()
    events = await ui.js.subscribe(
        proto.EVENTS_SUBJECTS, stream=proto.EVENTS_STREAM, ordered_consumer=True
    )
    assert (await events.next_msg(timeout=5)).subject == "lls.evt.demand"
    await events.unsubscribe()

    await refused(ui.hosts.put("A", b"{}"), f"$KV.{proto.KV_HOSTS}.A", caplog)
    await refused(ui.emit(proto.Demand(model="m", gateway_id="g")), "lls.evt.demand", caplog)
    await refused(
        ui.command(proto.cmd_agent("A"), proto.StopInstance(cmd_id="x", instance_id="x")),
        proto.cmd_agent("A"),
        caplog,
    )
    await refused(
        ui.js.delete_stream(proto.EVENTS_STREAM),
        f"$JS.API.STREAM.DELETE.{proto.EVENTS_STREAM}",
        caplog,
    )


async def test_only_the_ui_and_the_operator_ask_agents_for_log_tails(
    as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """Agent A answers requests on its own host's log subject only; the UI asks; the
    gateway (and every other service) may not."""
    a = await as_user("agent-A")
    await as_user("agent-B")  # host B exists too

    async def answer(msg) -> None:  # noqa: ANN001
        await msg.respond(b"tail of " + msg.data)

    await a.nc.subscribe(proto.logs("A"), cb=answer)
    await a.nc.flush()
    ui = await as_user("ui")
    assert (await ui.nc.request(proto.logs("A"), b"x", timeout=5)).data == b"tail of x"
    assert (await bus.nc.request(proto.logs("A"), b"y", timeout=5)).data == b"tail of y"
    # Answering is no right to publish into the asker's inbox otherwise.
    inbox = auth.Identity("ui", "").inbox_prefix + ".forged"
    await a.nc.publish(inbox, b"forged")
    await a.nc.flush()
    await refused(asyncio.sleep(5), inbox, caplog)

    for user in ("gateway", "placer", "downloader-A"):
        caplog.clear()  # each refusal is its own
        other = await as_user(user)
        await refused(other.nc.request(proto.logs("A"), b"z", timeout=5), proto.logs("A"), caplog)
    # Agent A can neither listen on host B's log subject nor on every host's.
    for subject in (proto.logs("B"), proto.logs("*"), "lls.logs.>"):
        caplog.clear()
        await a.nc.subscribe(subject)
        await a.nc.flush()
        await refused(asyncio.sleep(5), subject, caplog, kind="subscription")


async def test_inboxes_are_private(as_user, caplog: pytest.LogCaptureFixture) -> None:
    # With the shared _INBOX.>, any identity could read every other one's replies.
    a = await as_user("agent-A")
    for subject in ("_INBOX.>", "_INBOX_gateway.>"):
        await a.nc.subscribe(subject)
    await a.nc.flush()
    await refused(asyncio.sleep(5), "_INBOX_gateway.>", caplog, kind="subscription")
    assert 'subscription to "_inbox.>"' in caplog.text.lower()


async def test_services_bind_streams_the_placer_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the placer and the operator may create streams: the others wait for them."""
    monkeypatch.delenv(auth.ENV_CREDS, raising=False)  # restored after (start() sets it)
    srv = NatsServer(tmp_path / "nats")
    srv.declared = True  # a bare server: nothing declared yet
    srv.start()
    try:
        creds = srv.auth
        gateway = asyncio.create_task(
            connect(srv.url, "gateway", creds=auth.identity_file(creds, "gateway"))
        )
        await asyncio.sleep(1.5)
        assert not gateway.done()  # waiting, not failing and not creating
        placer = await connect(srv.url, "placer", creds=auth.identity_file(creds, "placer"))
        gw = await asyncio.wait_for(gateway, 10)
        assert await gw.js.stream_info(proto.CMDS_STREAM)
        await gw.close()
        await placer.close()
    finally:
        srv.stop()


# ------------------------------------------------------------------ which consumers each may create

HOSTS_KV, INSTANCES_KV = f"KV_{proto.KV_HOSTS}", f"KV_{proto.KV_INSTANCES}"


def _filter(stream: str) -> str:
    """The subjects of one of our streams (a bucket's are `$KV.<bucket>.>`)."""
    if stream == proto.EVENTS_STREAM:
        return proto.EVENTS_SUBJECTS
    if stream == CMDS:
        return proto.CMDS_SUBJECTS
    return f"$KV.{stream[len('KV_') :]}.>"


def _hostile_targets(source: str) -> list[str]:
    """Host A's command subject and a key of a bucket other than `source` (a delivery into
    the consumer's own stream is refused by the server as a cycle, whoever asks)."""
    bucket = proto.KV_INSTANCES if source == HOSTS_KV else proto.KV_HOSTS
    return [proto.cmd_agent("A"), f"$KV.{bucket}.A.x"]


async def _put_something(bus: Bus, stream: str) -> None:
    """One message in `stream`, so that a consumer of it would have something to deliver."""
    if stream == proto.EVENTS_STREAM:
        await bus.emit(proto.Demand(model="m", gateway_id="g"))
    else:
        await bus.kv[stream[len("KV_") :]].put("k", proto.encode(proto.LeaseRecord("h", 1.0)))


async def _wait_for(check: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def _watch_once(bus: Bus, bucket: str) -> None:
    """lls.bus.watch_kv on `bucket` until its first record arrives."""
    seen = asyncio.Event()
    stop = asyncio.Event()
    watch = asyncio.create_task(
        watch_kv(
            bus, bus.kv[bucket], proto.LeaseRecord, lambda *_: seen.set(), lambda _k: None, stop
        )
    )
    try:
        assert await wait_event(seen, 5), f"no record from {bucket}"
    finally:
        stop.set()
        await watch


@pytest.mark.parametrize("user", ["gateway", "placer", "ui", "agent-A", "downloader-A"])
async def test_each_service_follows_the_streams_its_code_watches_and_no_other(
    user: str, as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    b = await as_user(user)
    watched = auth.WATCHES[auth.role_of(user)]
    for stream in watched:  # with the code the services use (lls.bus.watch_kv, the ui feed)
        await _put_something(bus, stream)
        if stream == proto.EVENTS_STREAM:
            sub = await b.js.subscribe(_filter(stream), stream=stream, ordered_consumer=True)
            assert (await sub.next_msg(timeout=5)).subject == proto.evt("demand")
            await sub.unsubscribe()
            continue
        await _watch_once(b, stream[len("KV_") :])
    js = b.nc.jetstream(timeout=1)
    for stream in sorted(set(auth.DECLARED) - set(watched)):  # nor even an ordered consumer
        caplog.clear()
        follow = js.subscribe(_filter(stream), stream=stream, ordered_consumer=True)
        await refused(follow, f"$JS.API.CONSUMER.CREATE.{stream}", caplog)


@pytest.mark.parametrize("user", ["agent-B", "gateway", "ui", "downloader-A", "placer"])
async def test_no_identity_can_aim_a_consumer_at_commands_or_buckets(
    user: str, as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    await as_user("agent-A")  # host A, with its command durable and a command waiting in it
    own = proto.cmd_agent("A")
    await bus.js.add_consumer(CMDS, durable_config("agent-A", own).evolve(name="agent-A"))
    await bus.command(own, proto.StopInstance(cmd_id="real", instance_id="x-0123abcd"))
    b = await as_user(user)
    js = b.nc.jetstream(timeout=1)
    watched = auth.WATCHES[auth.role_of(user)]

    # On a stream it does not follow: no consumer at all, named or not, push or pull.
    for stream in sorted(set(auth.DECLARED) - set(watched)):
        for target in _hostile_targets(stream):
            caplog.clear()
            push = ConsumerConfig(deliver_subject=target, ack_policy=AckPolicy.NONE)
            await refused(
                js.add_consumer(stream, push), f"$JS.API.CONSUMER.CREATE.{stream}", caplog
            )
        caplog.clear()
        named = ConsumerConfig(name="evil", filter_subject=_filter(stream), deliver_subject=own)
        subject = f"$JS.API.CONSUMER.CREATE.{stream}.evil.{_filter(stream)}"
        await refused(js.add_consumer(stream, named), subject, caplog)

    # On a stream it follows: no named and no durable consumer, whatever its shape.
    source = watched[0]
    target = _hostile_targets(source)[1]
    caplog.clear()
    named = ConsumerConfig(name="evil", filter_subject=_filter(source), deliver_subject=target)
    subject = f"$JS.API.CONSUMER.CREATE.{source}.evil.{_filter(source)}"
    await refused(js.add_consumer(source, named), subject, caplog)
    caplog.clear()
    durable = ConsumerConfig(durable_name="evil", deliver_subject=target)
    subject = f"$JS.API.CONSUMER.DURABLE.CREATE.{source}.evil"
    await refused(js.add_consumer(source, durable), subject, caplog)

    # Nor delete, drain or ack host A's command consumer.
    for subject in (
        f"$JS.API.CONSUMER.DELETE.{CMDS}.agent-A",
        f"$JS.API.CONSUMER.MSG.NEXT.{CMDS}.agent-A",
    ):
        caplog.clear()
        await refused(b.nc.request(subject, b"", timeout=1), subject, caplog)
    caplog.clear()
    await b.nc.publish(f"$JS.ACK.{CMDS}.agent-A.1.1.1.1.0", b"+ACK")
    await b.nc.flush()
    await refused(asyncio.sleep(5), f"$JS.ACK.{CMDS}.agent-A.1.1.1.1.0", caplog)

    # What it can create is the ordered consumer of its watches, whose delivery subject is in
    # the request body where permissions cannot look. Such a consumer delivers only to a
    # subscriber of exactly that subject, and no service identity may subscribe there.
    targets = _hostile_targets(source)
    for target in targets:
        caplog.clear()
        await b.nc.subscribe(target)
        await b.nc.flush()
        await refused(asyncio.sleep(5), target, caplog, kind="subscription")
    await _put_something(bus, source)
    stored = {
        s: (await bus.js.stream_info(s)).state.messages for s in (CMDS, HOSTS_KV, INSTANCES_KV)
    }
    for target in targets:
        await js.add_consumer(
            source, ConsumerConfig(deliver_subject=target, ack_policy=AckPolicy.NONE)
        )
    if auth.role_of(user) in auth.PER_HOST:  # its own command durable, made a push consumer
        mine = b.nc.jetstream(timeout=1)
        durable_name = "agent-B" if user == "agent-B" else "downloader-A"
        mine_subject = proto.cmd_agent("B") if user == "agent-B" else proto.cmd_download("A")
        push = durable_config(durable_name, mine_subject).evolve(name=durable_name)
        with pytest.raises(BadRequestError, match="cycle"):  # into commands: the server says no
            await mine.add_consumer(CMDS, push.evolve(deliver_subject=own))
        await mine.add_consumer(CMDS, push.evolve(deliver_subject=targets[1]))  # inert too
    await asyncio.sleep(1.5)  # deliveries arrive in milliseconds when someone listens
    after = {s: (await bus.js.stream_info(s)).state.messages for s in stored}
    assert after == stored  # nothing went into the commands or any bucket
    info = await bus.js.consumer_info(CMDS, "agent-A")
    assert info.num_pending == 1  # host A's command is there for host A, and only that


async def test_a_delivery_keeps_its_source_subject_so_it_is_never_a_command(
    as_user, bus: Bus
) -> None:
    """The positive control of the above, and the fact the receivers rely on: given a
    listener on the exact subject (only the operator may be one), a delivery arrives within
    a moment, but under its source subject: stored in the command stream it is no command
    for any host, and a handler can tell it from a message published there."""
    await as_user("agent-A")
    gw = await as_user("gateway")
    key = proto.instance_key("A", "m-0000000a")
    forged = proto.StopInstance(cmd_id="forged", instance_id="x-0123abcd")
    await bus.instances.put(key, proto.encode(forged))
    got: list[str] = []

    async def on_msg(msg) -> None:  # noqa: ANN001
        got.append(msg.subject)

    await bus.nc.subscribe(proto.cmd_agent("A"), cb=on_msg)
    await bus.nc.flush()
    push = ConsumerConfig(deliver_subject=proto.cmd_agent("A"), ack_policy=AckPolicy.NONE)
    await gw.js.add_consumer(INSTANCES_KV, push)
    await _wait_for(lambda: bool(got), "the delivery to the operator's listener")
    source = f"$KV.{proto.KV_INSTANCES}.{key}"
    assert got == [source]
    info = await bus.js.stream_info(CMDS, subjects_filter=">")
    assert info.state.subjects == {source: 1}
    assert await pending(bus, proto.cmd_agent("A")) == 0


async def test_the_command_loop_ignores_deliveries_aimed_at_its_inbox(
    as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever learns the inbox of an agent's pull subscription could aim a consumer's
    deliveries at it; the agent handles only what comes from its own durable."""
    a = await as_user("agent-A")
    own = proto.cmd_agent("A")
    subs: list = []
    pull = a.js.pull_subscribe

    async def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - to learn the inbox
        subs.append(await pull(*args, **kwargs))
        return subs[-1]

    a.js.pull_subscribe = spy  # type: ignore[method-assign]
    handled: list[str] = []

    async def handle(msg) -> None:  # noqa: ANN001
        handled.append(proto.decode(msg.data, proto.AgentCommand).cmd_id)
        await msg.ack()

    stop = asyncio.Event()
    loop = asyncio.create_task(consume(a, "agent-A", own, handle, stop, stream=CMDS))
    try:
        await _wait_for(lambda: bool(subs), "the command loop's subscription")
        forged = proto.StopInstance(cmd_id="forged", instance_id="x-0123abcd")
        await bus.hosts.put("Z", proto.encode(forged))
        aim = ConsumerConfig(
            filter_subject=f"$KV.{proto.KV_HOSTS}.Z",
            deliver_subject=subs[0]._deliver,  # noqa: SLF001
            ack_policy=AckPolicy.NONE,
        )
        await bus.js.add_consumer(HOSTS_KV, aim)
        await _wait_for(
            lambda: f"ignored a message from $JS.ACK.{HOSTS_KV}." in caplog.text, "the forgery"
        )
        await bus.command(own, proto.StopInstance(cmd_id="real", instance_id="x-0123abcd"))
        await _wait_for(lambda: bool(handled), "the real command")
    finally:
        stop.set()
        await loop
    assert handled == ["real"]


# ------------------------------------------------------------------ operating it


async def test_adding_a_host_reloads_the_server_and_prints_no_secret(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    running = await connect(nats_server.url, "gw", creds=nats_server.auth / "gateway.json")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"nats": {"url": nats_server.url, "credentials_dir": str(nats_server.auth)}})
    )
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "lls.cli", "--config", str(cfg), "hosts", "add", "gpu-b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    ident = auth.load_identity(nats_server.auth / "agent-gpu-b.json")
    assert "reloaded" in r.stdout and str(nats_server.auth / "agent-gpu-b.json") in r.stdout
    assert ident.password not in r.stdout + r.stderr
    bus = await connect(nats_server.url, "agent", creds=nats_server.auth / "agent-gpu-b.json")
    await bus.hosts.put("gpu-b", b"{}")
    await bus.close()
    # The reload kept everyone else connected.
    await running.emit(proto.Demand(model="m", gateway_id="g"))
    assert running.reconnects == 0
    await running.close()


async def test_rotating_a_password_locks_out_the_old_one(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    old = tmp_path / "old.json"
    old.write_bytes((nats_server.auth / "gateway.json").read_bytes())
    running = await connect(nats_server.url, "gateway", creds=old)
    auth.rotate(nats_server.auth, ["gateway"])
    assert auth.reload_server(nats_server.auth)
    deadline = time.monotonic() + 5
    while not running.nc.is_closed:  # the server drops it; it cannot log in again
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    with pytest.raises(PermissionError):
        await connect(nats_server.url, "gateway", creds=old)
    bus = await connect(nats_server.url, "gateway", creds=nats_server.auth / "gateway.json")
    await bus.close()


def test_a_service_without_its_identity_says_how_to_get_one(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.ENV_CREDS)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"nats": {"url": nats_server.url, "credentials_dir": str(tmp_path)}})
    )
    r = subprocess.run(
        [sys.executable, "-m", "services.agent", "--config", str(cfg), "--host-id", "gpu-c"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "agent-gpu-c" in r.stderr and "lls hosts add gpu-c" in r.stderr


@pytest.mark.nats  # make run starts its own server
def test_make_runs_embedded_server_requires_credentials(tmp_path: Path) -> None:
    """`make run`: identities are created on first start, and outsiders are refused."""
    store = tmp_path / "nats"
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "nats": {"url": "embedded", "port": port, "store_dir": str(store)},
                "gateway": {"port": free_port(), "ui_url": f"http://127.0.0.1:{free_port()}"},
                "agent": {"host_id": "solo", "runtime": "process", "store": str(tmp_path / "m")},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != auth.ENV_CREDS}
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lls.run", "--config", str(cfg)],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        creds = store / "auth"
        deadline = time.monotonic() + 60
        while "gateway:" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert {p.stem for p in creds.glob("*.json")} >= {"agent-solo", "downloader-solo", "ui"}

        async def probe() -> None:
            url = f"nats://127.0.0.1:{port}"
            with pytest.raises(PermissionError):
                await connect(url, "outsider", deadline_s=5)
            bus = await connect(url, "cli", creds=creds / "cli.json")
            try:  # the agent got in with its own identity and heartbeats
                until = time.monotonic() + 30
                while "solo" not in await kv_snapshot(bus, bus.hosts, proto.HostRecord):
                    assert time.monotonic() < until, log.read_text()
                    await asyncio.sleep(0.5)
            finally:
                await bus.close()

        asyncio.run(probe())
        text = log.read_text(errors="replace")
        for path in creds.glob("*.json"):
            assert auth.load_identity(path).password not in text  # never printed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require("openssl", subprocess.run(["which", "openssl"], capture_output=True).returncode == 0)
    folder = tmp_path_factory.mktemp("tls")
    cert, key = auth.make_tls(folder, ["localhost", "127.0.0.1"])
    rogue = tmp_path_factory.mktemp("rogue")
    rogue_cert, rogue_key = auth.make_tls(rogue, ["127.0.0.1"])
    return {
        "ca": folder / "ca.pem",
        "cert": cert,
        "key": key,
        "rogue_ca": rogue / "ca.pem",
        "rogue_cert": rogue_cert,
        "rogue_key": rogue_key,
    }


async def test_tls_verifies_the_server_and_requires_client_certificates(
    tmp_path: Path, certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.ENV_CREDS, raising=False)  # restored after (start() sets it)
    tls = NatsTls(ca=str(certs["ca"]), cert=str(certs["cert"]), key=str(certs["key"]))
    srv = NatsServer(tmp_path / "nats", tls=msgspec.structs.replace(tls, verify_client=True))
    srv.start()
    try:
        creds = srv.creds
        bus = await connect(srv.url, "t", creds=creds, tls=tls)
        await bus.close()
        for name, bad in {
            "no CA: the system's do not know ours": None,
            "no client certificate": NatsTls(ca=str(certs["ca"])),
            "a server we do not trust": NatsTls(
                ca=str(certs["rogue_ca"]), cert=str(certs["cert"]), key=str(certs["key"])
            ),
            "a client certificate from another CA": NatsTls(
                ca=str(certs["ca"]), cert=str(certs["rogue_cert"]), key=str(certs["rogue_key"])
            ),
        }.items():
            t0 = time.monotonic()
            with pytest.raises(PermissionError, match="SSL"):
                await connect(srv.url, "t", creds=creds, tls=bad, deadline_s=10)
            assert time.monotonic() - t0 < 5, name  # said at once, not retried to the deadline
    finally:
        srv.stop()


def test_tls_config_is_checked_naming_the_key(tmp_path: Path, certs: dict[str, Path]) -> None:
    ok = {"ca": str(certs["ca"]), "cert": str(certs["cert"]), "key": str(certs["key"])}
    parse({"nats": {"tls": ok}})
    for tls, key in [
        ({**ok, "ca": str(tmp_path / "missing.pem")}, "nats.tls.ca"),
        ({"ca": ok["ca"], "cert": ok["cert"]}, "nats.tls"),
        ({"ca": ok["ca"]}, "nats.tls.cert"),  # the embedded server needs one
        ({**ok, "verfy_client": True}, "verfy_client"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse({"nats": {"tls": tls}})
    parse({"nats": {"url": "nats://h:4222", "tls": {"ca": ok["ca"]}}})  # a client may go certless
    with pytest.raises(ConfigError, match="nats.url"):
        parse({"nats": {"url": "http://h:4222"}})


def test_subjects_match_as_nats_matches_them() -> None:
    from lls.bus import subject_matches

    assert subject_matches("lls.evt.demand", "lls.evt.demand")
    assert subject_matches("lls.evt.download.*", "lls.evt.download.completed")
    assert not subject_matches("lls.evt.download.*", "lls.evt.download.a.b")
    assert subject_matches("lls.evt.>", "lls.evt.a.b")
    assert not subject_matches("lls.evt.>", "lls.evt")
    assert not subject_matches("lls.evt.stop.requested", "$KV.lls_instances.A.m-1")


async def test_a_record_relayed_onto_a_services_subject_is_not_taken_as_its_message(
    as_user, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """The read-only ui may watch the instances bucket, and a watch is a push consumer whose
    delivery subject NATS permissions cannot see: aimed at the placer's stop.requested, a
    genuine instance record would decode as StopRequested(model=...). Bus.subscribe hands a
    handler only what was published on its subject; the relayed copy keeps its own."""
    agent = await as_user("agent-A")
    rec = proto.InstanceRecord(
        instance_id="m-0000000a",
        model="m",
        host="A",
        state=proto.InstanceState.READY,
        created=1.0,
        updated=1.0,
    )
    await agent.instances.put(proto.instance_key("A", "m-0000000a"), proto.encode(rec))
    placer = await as_user("placer")
    got: list[str] = []

    async def on_stop(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.subject)

    await placer.subscribe(proto.evt("stop.requested"), cb=on_stop)
    await placer.nc.flush()
    ui = await as_user("ui")
    config = ConsumerConfig(deliver_subject=proto.evt("stop.requested"), ack_policy=AckPolicy.NONE)
    await ui.js.add_consumer(f"KV_{proto.KV_INSTANCES}", config)
    for _ in range(50):  # delivered within milliseconds when it is delivered at all
        if "dropped a message" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "dropped a message on $KV" in caplog.text
    await bus.emit(proto.StopRequested(model="m", requested_by="cli"))  # a real one counts
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.05)
    assert got == [proto.evt("stop.requested")]


async def test_only_the_placer_moves_raft_leaders_and_no_one_hears_the_probe(
    as_user, caplog: pytest.LogCaptureFixture
) -> None:
    # services/placer/stream_leaders.py: the placer keeps the leaders on its own server; a
    # host or the edge could otherwise move them around to cost elections.
    stepdowns = [
        f"$JS.API.STREAM.LEADER.STEPDOWN.{proto.EVENTS_STREAM}",
        f"$JS.API.STREAM.LEADER.STEPDOWN.KV_{proto.KV_LEASES}",
        f"$JS.API.CONSUMER.LEADER.STEPDOWN.{CMDS}.agent-A",
    ]
    for user in ("gateway", "ui", "agent-A", "downloader-A"):
        b = await as_user(user)
        for subject in stepdowns:
            caplog.clear()
            await refused(b.nc.request(subject, b"{}", timeout=5), subject, caplog)
        caplog.clear()
        await b.nc.subscribe(proto.PROBE)
        await b.nc.flush()
        await refused(asyncio.sleep(5), proto.PROBE, caplog, kind="subscription")
    placer = await as_user("placer")
    for subject in stepdowns:  # answered (one server: nothing to step down), not refused
        reply = json.loads((await placer.nc.request(subject, b"{}", timeout=5)).data)
        assert "type" in reply, reply
    # Every identity may probe its server: the answer is the server's own "no responders".
    with pytest.raises(nats.errors.NoRespondersError):
        await placer.nc.request(proto.PROBE, b"", timeout=2)
