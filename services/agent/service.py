"""The agent: one per host. Heartbeats telemetry into KV hosts, runs llama-server instances on
command, owns their InstanceRecords from STARTING on, and on restart adopts what an earlier
agent left running (or stops what nobody wants any more).

Each instance has one lifecycle task that alone writes its record after launch
(starting -> ready -> stopping -> stopped, or failed), so a crash watcher and a stop never
race. Commands are handled in bounded concurrent tasks, so a slow start never blocks a stop.

Defence in depth: whoever can publish on the command subject cannot make this host run
anything its config does not say. A start names a configured model and a placement only;
the argv comes from the model's config, the file must be that model's file in the store, the
instance id must have the project's format. Anything else is refused with a CommandRefused
event and nothing runs. Every server requires the API key the placer issued for it, which
comes with its start command alone (lls.instance_key); a start without one is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

import proto
from lls import build_status, chat_templates, instance_key
from lls.aio import wait_event
from lls.bus import kv_snapshot
from lls.config import (
    AgentConfig,
    Config,
    launch_fingerprint,
    slots_of,
    store_filename_of,
)
from lls.consume import consume
from lls.fence import Fence
from lls.paths import CPU, UNKNOWN, choose_llama_server
from lls.service import ServiceContext
from proto import InstanceRecord, InstanceState, StartInstance, StopInstance, lifecycle
from services.agent import slot_cache
from services.agent.image import ImageError
from services.agent.runtime import (
    Handle,
    LaunchError,
    LaunchSpec,
    Runtime,
    bind_host,
    local_url_host,
    pick_port,
)
from services.agent.runtime_process import ProcessRuntime
from services.agent.store import Store
from services.agent.telemetry import Claim, Telemetry, cpu_count, host_memory

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_COMMANDS = 16  # commands handled at once (each in its own task)
LAUNCH_ACK_S = 20.0  # a start is acked once launched, at the latest after this (< ack_wait)
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL
STOP_WAIT_S = STOP_GRACE_S + 20.0  # a stop command waits this long for the instance to end
HEALTH_POLL_S = 0.02  # a start is noticed fast: a swap waits on it
WATCH_POLL_S = 1.0
RECONCILE_EVERY_S = 5.0
BIND_ATTEMPTS = 3  # another process may grab the port between our probe and the server's bind
NOT_FOUND_AFTER_RESTART = "agent restarted; instance process not found"
LOG_PENDING_MAX = 32  # log tail requests waiting for an answer; more are dropped
# Warm swaps (slot_cache): deadlines for all of one instance's slot saves and restores. A stop
# waits STOP_WAIT_S for the instance to end: the save plus STOP_GRACE_S fit well inside it.
SLOT_SAVE_S = 10.0
SLOT_SAVE_SHUTDOWN_S = 3.0  # the agent's own shutdown waits STOP_GRACE_S + 5 s in all
SLOT_RESTORE_S = 10.0
# A start that arrives while `make run` still builds llama-server waits for the build (a few
# minutes on 2 cores), looking at its status file this often.
BUILD_WAIT_S = 3600.0
BUILD_POLL_S = 1.0


def http_threads(max_in_flight: int) -> int:
    """HTTP threads for an instance: every connection the gateways may hold open to it
    (two gateways at their per-model limit), plus a few for health checks and tokenizing."""
    return 2 * max_in_flight + 8


class StartupError(RuntimeError):
    """The agent cannot run as configured (e.g. runtime docker without an engine)."""


class SlotError(RuntimeError):
    """llama-server answered a slot save or restore with an error."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class Instance:
    instance_id: str
    model: str
    gpus: tuple[int, ...]
    memory_mib: int
    cmd: StartInstance | None = None  # None for an adopted instance
    handle: Handle | None = None
    port: int | None = None
    state: InstanceState = InstanceState.STARTING
    stop_reason: str | None = None
    quiet: bool = False  # stop without writing the record (it is no longer ours)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    launched: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # slot_cache.cache_key of how it was launched; "" = no warm swap (cache off, adopted)
    slot_key: str = ""
    slots: int = 0  # its server's slots (requests at once), read when it became ready
    # Its llama-server's API key: from the start command, or (adopted) from the server's own
    # environment; "" = not known (no slot saves or /props for it, requests still work)
    api_key: str = ""

    def request_stop(self, reason: str, quiet: bool = False) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.quiet = reason, quiet
            self.stop_event.set()


def run_dir_for(store: Path, host_id: str, cluster_id: str) -> Path:
    """Where the process runtime keeps state files: next to the store, per stack and host id
    (two stacks sharing a store never see each other's servers)."""
    return store.parent / "run" / cluster_id / host_id


def choose_runtime(
    cfg: AgentConfig, host_id: str, store: Path, telemetry: Telemetry, cluster_id: str
) -> Runtime:
    """auto: Docker when an engine answers (and an image can be had), else processes."""
    chosen = choose_llama_server(cfg.llama_server, gpus=telemetry.has_nvidia)
    binary, backend = (chosen.path, chosen.backend) if chosen else (None, UNKNOWN)
    run_dir = run_dir_for(store, host_id, cluster_id)
    process = ProcessRuntime(host_id, store, run_dir, binary, cluster_id, backend)
    if cfg.runtime == "process":
        return process
    from services.agent.runtime_docker import DockerRuntime, engine

    client = engine()
    if client is None:
        if cfg.runtime == "docker":
            raise StartupError(
                "agent.runtime is 'docker' but no Docker engine answers (is dockerd running, "
                "and may this user reach its socket? DOCKER_HOST selects another engine)"
            )
        log.info("no Docker engine answers; using the process runtime")
        return process
    try:
        return DockerRuntime.create(
            client, host_id, store, cfg.image, telemetry.has_nvidia, binary, cluster_id, backend
        )
    except ImageError as e:
        if cfg.runtime == "docker":
            raise StartupError(str(e)) from None
        log.warning("%s; using the process runtime", e)
        return process


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


class Agent:
    def __init__(
        self,
        ctx: ServiceContext,
        runtime: Runtime,
        telemetry: Telemetry,
        store: Store,
    ):
        self.ctx = ctx
        self.bus = ctx.bus
        self.cfg = ctx.cfg.agent
        self.host = ctx.host_id
        self.bind = bind_host(self.cfg.advertise_host, self.cfg.bind_host)
        self.runtime = runtime
        self.telemetry = telemetry
        # A CPU-only llama-server cannot use this host's GPUs: offer none, so the placer puts
        # instances in RAM (-ngl 0) and accounts them there, instead of on GPUs they never use.
        self.cpu_only = telemetry.has_nvidia and runtime.backend.endswith(CPU)
        if self.cpu_only:
            log.warning(
                "this host has %d NVIDIA GPU(s) but its llama-server is a CPU build (%s): "
                "instances run on the CPU and the GPUs are not offered. For the GPUs, build "
                "the CUDA one (scripts/build-llama-server.sh --cuda, needs the CUDA toolkit), "
                "set agent.llama_server to a CUDA build, or use runtime: docker (README: GPU "
                "hosts)",
                telemetry.gpu_count,
                runtime.program,
            )
        self.store = store
        self.started_at = proto.now()
        self.instances: dict[str, Instance] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        # runtime calls block (docker stop waits its grace): a pool of their own, so a few
        # slow stops never delay health polls
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="agent-rt")
        self._http = httpx.AsyncClient(timeout=2.0)
        self._logs_sub: Subscription | None = None
        self.slot_dir = slot_cache.cache_dir(self.cfg.slot_cache_dir, store.root, self.host)
        self._shutting_down = False
        self.fence = Fence()  # the highest placer epoch seen: older commands are refused
        self._template_warned: set[str] = set()  # store files warned of (no chat template)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------ main loop

    async def serve(self) -> None:
        bg: list[asyncio.Task[None]] = []
        try:
            try:
                await self._call(slot_cache.prepare, self.slot_dir, self.cfg.slot_cache_mib)
            except OSError as e:  # the cache is an optimisation: never a reason not to run
                log.warning("slot cache folder %s: %s", self.slot_dir, e)
            await self._adopt()
            await self._emit(
                proto.HostJoined(
                    host_id=self.host, gpus=self.telemetry.gpu_count, runtime=self.runtime.name
                )
            )
            await self._heartbeat()
            await self._serve_logs()
            bg = [
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self._consume(), name="commands"),
                asyncio.create_task(self.fence.follow(self.bus, self.ctx.stop), name="lease"),
            ]
            await self.ctx.stop.wait()
        except BaseException:
            # killed without a stop request (cancelled: a test's stand-in for kill -9) or
            # broken: leave the instances running for the next agent to adopt
            await self._cancel(bg + list(self._handlers) + self._lifecycles())
            await self._close()
            raise
        await self._shutdown(bg)

    def _lifecycles(self) -> list[asyncio.Task[None]]:
        return [i.task for i in self.instances.values() if i.task is not None]

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def _shutdown(self, bg: list[asyncio.Task[None]]) -> None:
        """Stop taking commands, stop every instance (marked stopped), say goodbye."""
        log.info("stopping %d instance(s)", len(self.instances))
        self._shutting_down = True
        await self._cancel(bg[1:] + list(self._handlers))
        for inst in self.instances.values():
            inst.request_stop("agent shutting down")
        tasks = self._lifecycles()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S + 5)
            stuck = [i for i in self.instances.values() if i.task in pending]
            await self._cancel(list(pending))
            for inst in stuck:  # kill outright, whatever held them up
                if inst.handle is not None:
                    with contextlib.suppress(Exception):
                        await self._call(self.runtime.stop, inst.handle, 0.5)
                await self._set(inst, InstanceState.STOPPED, reason="agent shutting down")
        await self._cancel(bg[:1])
        self.instances.clear()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._heartbeat()
        await self._close()

    def _warn_templates(self, files: list[proto.FileInfo]) -> None:
        """Once per store file, where its header was read: a configured model whose GGUF
        has no chat template, and none is configured (llama-server would use ChatML)."""
        models = self.ctx.cfg.models
        for f in files:
            m = models.get(f.model)
            has = f.gguf.has_chat_template if f.gguf is not None else None
            if m is None or not chat_templates.missing(m.chat_template, has):
                continue
            if f.filename not in self._template_warned:
                self._template_warned.add(f.filename)
                log.warning("%s", chat_templates.warning(f.model))

    async def _close(self) -> None:
        if self._logs_sub is not None:
            with contextlib.suppress(Exception):
                await self._logs_sub.unsubscribe()
        await self._http.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.telemetry.close()

    # ------------------------------------------------------------ heartbeat and reconcile

    async def _heartbeat(self) -> None:
        models = self.ctx.cfg.models
        claims = [
            Claim(
                i.gpus,
                i.memory_mib,
                i.handle.pid if i.handle else None,
                instance_id=i.instance_id,
                model=i.model,
                # what its argv got (from this config); a model no longer configured is not
                # reported: what it was started with is unknown
                ctx_size=models[i.model].ctx_size if i.model in models else -1,
            )
            for i in self.instances.values()
        ]
        gpus = [] if self.cpu_only else await self._call(self.telemetry.gpus, claims)
        measured = await self._call(
            self.telemetry.measure, gpus, [c for c in claims if c.ctx_size >= 0]
        )
        files = await self._call(self.store.scan)
        # a store name carries a hash of the model's source: report the configured model it
        # holds; a file no model names now (an old source) keeps its name's stem
        owners = {store_filename_of(m, mcfg): m for m, mcfg in models.items()}
        files = [
            msgspec.structs.replace(f, model=owners[f.filename]) if f.filename in owners else f
            for f in files
        ]
        self._warn_templates(files)
        total, free = host_memory()
        rec = proto.HostRecord(
            host_id=self.host,
            ts=proto.now(),
            started_at=self.started_at,
            runtime=self.runtime.name,
            gpus=gpus,
            cpu_count=cpu_count(),
            ram_total_mib=total,
            ram_free_mib=free,
            ram_reserve_mib=self.cfg.ram_reserve_mib,
            files=files,
            instances=sorted(self.instances),
            advertise_host=self.cfg.advertise_host,
            port_range=self.cfg.port_range,
            measured=measured,
            build=await self._call(self._build),
        )
        async with asyncio.timeout(5):
            await self.bus.put(self.bus.hosts, self.host, rec)

    async def _heartbeat_loop(self) -> None:
        next_reconcile = time.monotonic() + RECONCILE_EVERY_S
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                await self._heartbeat()
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + RECONCILE_EVERY_S
                    await self._reconcile()
            except Exception as e:  # noqa: BLE001 - NATS away for a moment: try again
                log.warning("heartbeat failed: %s", e)

    async def _reconcile(self) -> None:
        """Stop ready instances whose record says nobody wants them any more (marked lost
        while this host was unreachable, or deleted); say again that a ready one is ready
        when its record missed it (the write was lost while the bus was away)."""
        for inst in list(self.instances.values()):
            if inst.state != InstanceState.READY or inst.stop_reason is not None:
                continue
            rec = await self._get(inst.instance_id)
            if rec is None or rec.state in proto.END_STATES or rec.host not in (None, self.host):
                why = "no record" if rec is None else f"record is {rec.state.value} on {rec.host}"
                log.warning("stopping %s: %s; nobody wants it", inst.instance_id, why)
                inst.request_stop(f"{why}; nobody wants it", quiet=True)
            elif rec.state in (InstanceState.PENDING, InstanceState.STARTING):
                log.warning(
                    "%s is ready but its record says %s: recording it again",
                    inst.instance_id,
                    rec.state.value,
                )
                await self._mark_ready(inst, "ready (recorded again after the bus was away)")

    async def _mark_ready(self, inst: Instance, reason: str) -> None:
        slots = await self._n_slots(inst)  # what the gateways admit to it at once
        await self._set(
            inst,
            InstanceState.READY,
            endpoint=f"http://{self.cfg.advertise_host}:{inst.port}",
            ready_at=proto.now(),
            reason=reason,
            log_tail="",
            slots=slots,
        )

    # ------------------------------------------------------------ log tails

    async def _serve_logs(self) -> None:
        """Answer LogTailRequests on this host's subject (core NATS: nats-py subscribes again
        after a reconnect). Requests are answered one at a time, and few wait: a flood
        overflows the pending bound and is dropped, not queued."""
        self._logs_sub = await self.bus.subscribe(
            proto.logs(self.host), cb=self._answer_log, pending_msgs_limit=LOG_PENDING_MAX
        )

    async def _answer_log(self, msg: Msg) -> None:
        if not msg.reply:
            return
        reply = await self.log_tail(msg.data)
        try:
            await msg.respond(proto.encode(reply))
        except Exception as e:  # noqa: BLE001 - the asker is gone or the bus away
            log.warning("cannot answer a log tail request: %s", e)

    async def log_tail(self, data: bytes) -> proto.LogTailReply:
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
            got, truncated = await self._call(
                self.runtime.log_lines, handle, lines, proto.LOG_TAIL_MAX_BYTES
            )
        except Exception as e:  # noqa: BLE001 - say why instead of leaving the asker waiting
            log.warning("%s: cannot read its log: %s", iid, e)
            return proto.LogTailError(instance_id=iid, code="unavailable", reason=str(e)[:500])
        return proto.LogTail(instance_id=iid, lines=got, truncated=truncated)

    # ------------------------------------------------------------ commands

    async def _consume(self) -> None:
        await consume(
            self.bus,
            f"agent-{self.host}",
            proto.cmd_agent(self.host),
            self._handle,
            self.ctx.stop,
            stream=proto.CMDS_STREAM,
            tasks=self._handlers,
            concurrency=MAX_COMMANDS,
        )

    async def _handle(self, msg: Any) -> None:
        try:
            cmd = proto.decode(msg.data, proto.AgentCommand)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            # e.g. a start carrying `args`: commands carry model and placement, never flags
            log.error("refusing a malformed command: %s", e)
            loose = _loose_fields(msg.data)
            await self._refuse(
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
                await self._refuse(kind, cmd.instance_id, model, stale, cmd.cmd_id)
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
            await self._refuse("start", cmd.instance_id, cmd.model, why, cmd.cmd_id)
            await self._fail_refused(cmd, why)
            return
        if cmd.instance_id in self.instances:
            log.info("start %s: already running here", cmd.instance_id)
            return
        inst = Instance(cmd.instance_id, cmd.model, tuple(cmd.gpus), cmd.memory_mib, cmd=cmd)
        inst.api_key = cmd.api_key  # refusal() checked its form
        self._spawn(inst)
        await wait_event(inst.launched, LAUNCH_ACK_S)

    async def _refuse(
        self, command: str, instance_id: str, model: str, reason: str, cmd_id: str
    ) -> None:
        log.warning("refused %s command for %r (%s): %s", command, instance_id, model, reason)
        await self._emit(
            proto.CommandRefused(
                host=self.host,
                command=command,
                instance_id=instance_id[:200],
                model=model[:200],
                reason=reason,
                cmd_id=cmd_id[:200],
            )
        )

    async def _fail_refused(self, cmd: StartInstance, why: str) -> None:
        """A well-formed id whose record says it is placed here and waits for this start (a
        placer whose config differs from ours): fail it, so waiting requests hear why now."""
        if not proto.INSTANCE_ID_RE.fullmatch(cmd.instance_id):
            return
        rec = await self._get(cmd.instance_id)
        waiting = (InstanceState.PENDING, InstanceState.DOWNLOADING, InstanceState.STARTING)
        if rec is None or rec.host != self.host or rec.model != cmd.model:
            return
        if rec.state in waiting and cmd.instance_id not in self.instances:
            await self._transition(
                cmd.instance_id, rec.model, InstanceState.FAILED, reason=f"agent refused: {why}"
            )

    async def stop(self, cmd: StopInstance) -> None:
        if not proto.INSTANCE_ID_RE.fullmatch(cmd.instance_id):
            why = f"instance id {cmd.instance_id!r} does not have the project's id format"
            await self._refuse("stop", cmd.instance_id, "", why, cmd.cmd_id)
            return
        reason = cmd.reason or "stop requested"
        inst = self.instances.get(cmd.instance_id)
        if inst is not None:
            inst.request_stop(reason)
            if inst.task is not None:
                await asyncio.wait({inst.task}, timeout=STOP_WAIT_S)
            return
        rec = await self._get(cmd.instance_id)  # not running here: just settle its record
        live = proto.LIVE_STATES | {InstanceState.STOPPING}
        if rec is not None and rec.state in live and rec.host in (None, self.host):
            await self._transition(cmd.instance_id, rec.model, InstanceState.STOPPED, reason=reason)

    # ------------------------------------------------------------ instance lifecycle

    def _spawn(self, inst: Instance) -> None:
        self.instances[inst.instance_id] = inst
        inst.task = asyncio.create_task(self._lifecycle(inst), name=f"instance {inst.instance_id}")

    async def _lifecycle(self, inst: Instance) -> None:
        try:
            ok = await self._start(inst) if inst.handle is None else await self._readopt(inst)
            if ok:
                await self._watch(inst)
            if ok and inst.stop_reason is not None:
                await self._stop(inst)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("instance %s", inst.instance_id)
            if inst.handle is not None:
                with contextlib.suppress(Exception):
                    await self._call(self.runtime.stop, inst.handle, STOP_GRACE_S)
            await self._set(inst, InstanceState.FAILED, reason=f"agent error: {e}", endpoint=None)
        finally:
            inst.launched.set()
            if self.instances.get(inst.instance_id) is inst:
                del self.instances[inst.instance_id]

    def _model_file(self, filename: str) -> Path:
        rel = Path(filename)  # store_filename(): one plain name (checked again: cheap)
        if rel.is_absolute() or len(rel.parts) != 1 or filename in (".", ".."):
            raise ValueError(f"bad model filename {filename!r}: must be a name in the store")
        path = self.store.root / rel
        if not path.is_file():
            raise ValueError(f"model file {filename} is not in the store {self.store.root}")
        return path

    async def _start(self, inst: Instance) -> bool:
        cmd = inst.cmd
        assert cmd is not None
        rec = await self._get(inst.instance_id)
        if rec is None:
            # the placer writes the record before it commands a start: without one, this is a
            # start for an instance that was purged, or that nobody placed
            why = "no instance record (the placer creates it before a start)"
            log.info("not starting %s: %s", inst.instance_id, why)
            await self._refuse("start", inst.instance_id, inst.model, why, cmd.cmd_id)
            return False
        if rec.state in proto.END_STATES or rec.state == InstanceState.STOPPING:
            # a redelivered start for an instance that already ended: the placer decides retries
            log.info("not starting %s: its record is %s", inst.instance_id, rec.state.value)
            return False
        mine = launch_fingerprint(self.ctx.cfg.models[cmd.model])  # refusal(): ours
        if rec.config_fp and rec.config_fp != mine:
            # placed for another version of the model's config: one side has not reloaded yet
            why = (
                f"the placer placed it for a different config of {cmd.model} than this agent's "
                "(reload every service's config: SIGHUP or `lls reload`)"
            )
            await self._set(inst, InstanceState.FAILED, reason=why)
            return False
        try:
            uuids = self.telemetry.uuids(cmd.gpus)
            self._model_file(cmd.filename)
        except ValueError as e:
            await self._set(inst, InstanceState.FAILED, reason=str(e))
            return False
        builtin, template_file = "", ""
        if chat_templates.kind(cmd.chat_template) == "builtin":
            builtin = cmd.chat_template
        elif cmd.chat_template:  # Jinja text: into a file this agent names, in its store
            try:
                template_file = await self._call(
                    chat_templates.write_template, self.store.root, cmd.chat_template
                )
            except OSError as e:
                why = f"cannot write the chat template into the store: {e}"
                await self._set(inst, InstanceState.FAILED, reason=why)
                return False
        why = await self._await_build(inst)
        if inst.stop_reason is not None:
            return True
        if why is not None:
            await self._set(inst, InstanceState.FAILED, reason=why, endpoint=None)
            return False
        await self._set(
            inst,
            InstanceState.STARTING,
            reason=f"launching llama-server ({self.runtime.name} runtime)",
            endpoint=None,
            log_tail="",
            ready_at=None,
        )
        deadline = time.monotonic() + self.cfg.start_timeout
        mcfg = self.ctx.cfg.models[cmd.model]  # refusal() made sure it is ours
        slot_dir = await self._slot_dir_ready()
        if slot_dir:
            inst.slot_key = slot_cache.cache_key(
                cmd.filename, mine, self.runtime.program, cmd.n_gpu_layers
            )
        for attempt in range(BIND_ATTEMPTS):
            if inst.stop_reason is not None:
                return True
            try:
                inst.port = pick_port(self.cfg.port_range, self._ports_taken(inst))
                spec = LaunchSpec(
                    instance_id=inst.instance_id,
                    model=cmd.model,
                    filename=cmd.filename,
                    port=inst.port,
                    bind_host=self.bind,
                    # from this agent's config, never from the command
                    ctx_size=mcfg.ctx_size,
                    n_gpu_layers=cmd.n_gpu_layers,
                    gpus=tuple(cmd.gpus),
                    gpu_uuids=uuids,
                    embeddings=mcfg.embeddings,
                    args=tuple(mcfg.args),
                    memory_mib=cmd.memory_mib,
                    api_key=inst.api_key,
                    http_threads=http_threads(self.ctx.cfg.gateway.max_in_flight),
                    slot_dir=slot_dir,
                    slot_key=inst.slot_key,
                    cpu_compute=self._cpu_compute(cmd.n_gpu_layers),
                    chat_template=builtin,
                    chat_template_file=template_file,
                )
                inst.handle = await self._call(self.runtime.launch, spec)
            except LaunchError as e:
                await self._set(inst, InstanceState.FAILED, reason=str(e))
                return False
            finally:
                inst.launched.set()
            outcome = await self._until_healthy(inst, deadline)
            if outcome == "exited" and attempt + 1 < BIND_ATTEMPTS:
                tail = await self._call(self.runtime.log_tail, inst.handle)
                if "couldn't bind" in tail:
                    log.warning("%s: port %s was taken; another port", inst.instance_id, inst.port)
                    await self._call(self.runtime.release, inst.handle)
                    inst.handle = None
                    continue
            return await self._settle(inst, outcome, "")
        return False  # not reached: the last attempt always settles

    def _has_binary(self) -> bool:
        """Whether the runtime has its llama-server. A process runtime that started before
        `make run`'s build finished takes the built binary once it is there (lls.paths)."""
        rt = self.runtime
        if not isinstance(rt, ProcessRuntime) or rt.has_binary():
            return True
        chosen = choose_llama_server(self.cfg.llama_server, gpus=self.telemetry.has_nvidia)
        if chosen is None or not os.access(chosen.path, os.X_OK):
            return False
        rt.use(chosen.path, chosen.backend)
        self.cpu_only = self.telemetry.has_nvidia and chosen.backend.endswith(CPU)
        log.info("llama-server is there now: %s (%s)", chosen.path, chosen.backend)
        return True

    def _build(self) -> proto.BuildProgress | None:
        """The llama-server build this host waits for, if its binary is not there yet."""
        return None if self._has_binary() else build_status.current()

    async def _await_build(self, inst: Instance) -> str | None:
        """Hold a start while this host's llama-server is being built, its record saying how
        far the build is (the gateway passes that on to the requests waiting for it). None
        to go on: the binary is there, a stop was requested, or no build runs (the launch
        then says what is missing); else why the start failed (a failed build names its log).
        """
        deadline = time.monotonic() + BUILD_WAIT_S
        said: tuple[str, int] | None = None
        while (build := await self._call(self._build)) is not None:
            if build.stage in (build_status.FAILED, build_status.STOPPED):
                return build.message
            if time.monotonic() >= deadline:
                return (
                    f"the llama-server build did not finish in {BUILD_WAIT_S:g} s; see {build.log}"
                )
            if (build.stage, build.percent // 10) != said:  # each stage, each 10%: the host
                said = (build.stage, build.percent // 10)  # record has the rest (heartbeat)
                await self._set(inst, InstanceState.STARTING, reason=build.message, endpoint=None)
            if await self._pause(inst, BUILD_POLL_S):
                return None
        return None

    def _cpu_compute(self, n_gpu_layers: int) -> bool:
        """Whether an instance computes on the CPU: no layers offloaded, simulated GPUs (no
        GPU to offload to), or a binary built without a GPU backend. Left to its default
        thread count (every core) there, two busy instances spin against each other at
        llama.cpp's barriers: 190 ms a token instead of 0.1 ms in a swap storm."""
        return (
            n_gpu_layers == 0
            or self.telemetry.simulated is not None
            or self.runtime.backend.rsplit("/", 1)[-1] == "cpu"
        )

    async def _readopt(self, inst: Instance) -> bool:
        deadline = time.monotonic() + self.cfg.start_timeout
        outcome = await self._until_healthy(inst, deadline)
        return await self._settle(inst, outcome, "adopted after an agent restart")

    async def _settle(self, inst: Instance, outcome: str, ready_reason: str) -> bool:
        """Turn the outcome of waiting for /health into READY or FAILED."""
        h = inst.handle
        assert h is not None
        if outcome == "stopped":
            return True
        if outcome == "ready":
            # warm swap: before READY, so the first request finds it; the event after it
            restored = await self._restore_slots(inst) if inst.slot_key else None
            await self._mark_ready(inst, ready_reason)
            if restored is not None:
                await self._emit(restored)
            return True
        tail = await self._call(self.runtime.log_tail, h)
        if outcome == "timeout":
            reason = (
                f"llama-server did not answer /health with 200 within "
                f"{self.cfg.start_timeout:g} s; killed"
            )
            await self._call(self.runtime.stop, h, STOP_GRACE_S)
        else:
            code = await self._call(self.runtime.exit_code, h)
            what = "with code unknown" if code == -1 else f"with code {code}"
            reason = f"llama-server exited {what} before it was ready"
            await self._call(self.runtime.release, h)
        inst.handle = None
        await self._set(inst, InstanceState.FAILED, reason=reason, log_tail=tail, endpoint=None)
        return False

    async def _until_healthy(
        self, inst: Instance, deadline: float
    ) -> Literal["ready", "exited", "timeout", "stopped"]:
        h = inst.handle
        assert h is not None
        url = f"http://{local_url_host(self.bind)}:{h.port}/health"  # public: no key needed
        while True:
            if inst.stop_reason is not None:
                return "stopped"
            if await self._call(self.runtime.exit_code, h) is not None:
                return "exited"
            try:
                if (await self._http.get(url)).status_code == 200:
                    return "ready"
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                return "timeout"
            await self._pause(inst, HEALTH_POLL_S)

    async def _watch(self, inst: Instance) -> None:
        """While ready: return on a stop request; a crash marks the instance failed."""
        while not await self._pause(inst, WATCH_POLL_S):
            h = inst.handle
            assert h is not None
            code = await self._call(self.runtime.exit_code, h)
            if code is None:
                continue
            tail = await self._call(self.runtime.log_tail, h)
            await self._call(self.runtime.release, h)
            inst.handle = None
            what = "with code unknown" if code == -1 else f"with code {code}"
            log.warning("%s: llama-server exited %s", inst.instance_id, what)
            await self._set(
                inst,
                InstanceState.FAILED,
                reason=f"llama-server exited unexpectedly {what}",
                log_tail=tail,
                endpoint=None,
            )
            return

    async def _stop(self, inst: Instance) -> None:
        reason = inst.stop_reason or "stop requested"
        if not inst.quiet:
            await self._set(inst, InstanceState.STOPPING, reason=reason)
        if inst.handle is not None:
            saved = None
            if inst.slot_key:  # after STOPPING: no new request changes what is saved
                budget = SLOT_SAVE_SHUTDOWN_S if self._shutting_down else SLOT_SAVE_S
                saved = await self._save_slots(inst, budget, reason)
            await self._call(self.runtime.stop, inst.handle, STOP_GRACE_S)
            inst.handle = None
            if inst.slot_key:  # a save cut short may have left its temporary file
                await self._call(self._after_save, inst.instance_id)
            if saved is not None:  # after the stop: a slow bus never holds the memory
                await self._emit(saved)
        if not inst.quiet:
            await self._set(inst, InstanceState.STOPPED, reason=reason, endpoint=None)

    # ------------------------------------------------------------ warm swaps

    async def _slot_dir_ready(self) -> str:
        """The slot cache folder, made if need be; "" when warm swaps are off (or the folder
        cannot be made: the instance then simply starts and stops cold)."""
        if not self.cfg.slot_cache_mib:
            return ""
        try:
            await self._call(lambda: self.slot_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
        except OSError as e:
            log.warning("slot cache folder %s: %s; warm swaps off", self.slot_dir, e)
            return ""
        return str(self.slot_dir)

    async def _slot_call(
        self, inst: Instance, method: str, path: str, timeout: float, body: Any = None
    ) -> Any:
        """An authenticated call to the instance's llama-server; its JSON answer."""
        h = inst.handle
        if h is None:
            raise SlotError(0, "the instance has no server")
        url = f"http://{local_url_host(self.bind)}:{h.port}{path}"
        key = inst.api_key
        if not key:
            raise SlotError(0, "its API key is not known (adopted from a server without one)")
        r = await self._http.request(
            method,
            url,
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=max(0.1, timeout),
        )
        if r.status_code != 200:
            try:
                message = str(r.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise SlotError(r.status_code, message)
        return r.json()

    async def _n_slots(self, inst: Instance) -> int:
        """How many slots the server has: known once it was ready, else its own word (GET
        /props: total_slots; GET /slots where /props does not say), else what the model's
        -np says (llama-server's own default when it has none)."""
        if inst.slots:
            return inst.slots
        for path in ("/props", "/slots"):
            try:
                ans = await self._slot_call(inst, "GET", path, 2.0)
            except (httpx.HTTPError, SlotError, ValueError) as e:
                log.info("%s: GET %s: %s", inst.instance_id, path, e)
                continue
            n = ans.get("total_slots") if isinstance(ans, dict) else len(ans)
            if isinstance(n, int) and n > 0:
                inst.slots = min(n, slot_cache.MAX_SLOTS)
                return inst.slots
        mcfg = self.ctx.cfg.models.get(inst.model)
        return slots_of(mcfg) if mcfg is not None else 1

    async def _save_slots(
        self, inst: Instance, budget_s: float, why: str
    ) -> proto.SlotCacheChanged | None:
        """Save every slot that holds tokens, within `budget_s`; the event to emit, if any.
        Never raises: the stop goes on whatever happens here."""
        folder, t0 = self.slot_dir, time.monotonic()
        saved = tokens = nbytes = 0
        errors: list[str] = []
        try:
            async with asyncio.timeout(budget_s):
                for slot in await self._slots_to_save(inst):
                    temp = slot_cache.temp_file(inst.instance_id, slot)
                    left = budget_s - (time.monotonic() - t0)
                    try:
                        ans = await self._slot_call(
                            inst, "POST", f"/slots/{slot}?action=save", left, {"filename": temp}
                        )
                        n, written = int(ans.get("n_saved", 0)), int(ans.get("n_written", 0))
                    except (httpx.HTTPError, SlotError, ValueError, TypeError) as e:
                        errors.append(f"slot {slot}: {e or type(e).__name__}")
                        continue
                    if n <= 0:  # an empty slot: nothing worth a file
                        await self._call(slot_cache.discard, folder, temp)
                        continue
                    final = slot_cache.slot_file(inst.slot_key, slot)
                    try:
                        await self._call(slot_cache.commit, folder, temp, final)
                    except OSError as e:
                        errors.append(f"slot {slot}: {e}")
                        continue
                    saved, tokens, nbytes = saved + 1, tokens + n, nbytes + written
        except TimeoutError:
            errors.append(f"the {budget_s:g} s deadline passed")
        except Exception as e:  # noqa: BLE001 - a save must never hold up the stop
            errors.append(f"agent error: {e}")
        took = round(time.monotonic() - t0, 3)
        if not saved and not errors:
            log.info("%s: no slot holds tokens; nothing saved", inst.instance_id)
            return None
        stage = "saved" if saved else "failed"
        reason = why + (f"; not saved: {'; '.join(errors)}" if errors else "")
        (log.warning if errors else log.info)(
            "%s: slot cache %s: %d slot(s), %d tokens, %d bytes in %.3f s (%s)",
            inst.instance_id,
            stage,
            saved,
            tokens,
            nbytes,
            took,
            reason,
        )
        return self._slot_event(inst, stage, saved, tokens, nbytes, took, reason)

    async def _slots_to_save(self, inst: Instance) -> list[int]:
        """The slots worth a file (slot_cache.worth_saving), else every slot it has."""
        try:
            ids = slot_cache.worth_saving(await self._slot_call(inst, "GET", "/slots", 2.0))
        except (httpx.HTTPError, SlotError, ValueError) as e:
            log.info("%s: GET /slots: %s", inst.instance_id, e)
            ids = None
        return ids if ids is not None else list(range(await self._n_slots(inst)))

    def _after_save(self, instance_id: str) -> None:
        """Once the server is gone: its unfinished temporary files, then the size bound."""
        names = [f.name for f in slot_cache.scan(self.slot_dir)]
        slot_cache.discard(self.slot_dir, *slot_cache.temps_of(instance_id, names))
        slot_cache.prune(self.slot_dir, self.cfg.slot_cache_mib)

    async def _restore_slots(self, inst: Instance) -> proto.SlotCacheChanged | None:
        """Slot i from file i of this launch's key, within SLOT_RESTORE_S; the event to emit,
        if any. A failure leaves the instance cold, never unready. Files are kept after a
        restore (README: Warm swaps)."""
        folder, t0 = self.slot_dir, time.monotonic()
        try:
            names = [f.name for f in await self._call(slot_cache.scan, folder)]
        except OSError as e:
            log.warning("%s: slot cache unreadable: %s", inst.instance_id, e)
            return None
        if not slot_cache.restorable(inst.slot_key, names, slot_cache.MAX_SLOTS):
            return None  # nothing saved for this launch: no /slots call, no event
        restored = tokens = nbytes = 0
        errors: list[str] = []
        try:
            async with asyncio.timeout(SLOT_RESTORE_S):
                files = slot_cache.restorable(inst.slot_key, names, await self._n_slots(inst))
                for slot, name in sorted(files.items()):
                    if inst.stop_reason is not None:
                        break
                    left = SLOT_RESTORE_S - (time.monotonic() - t0)
                    try:
                        ans = await self._slot_call(
                            inst, "POST", f"/slots/{slot}?action=restore", left, {"filename": name}
                        )
                    except SlotError as e:
                        errors.append(f"slot {slot}: {e}")
                        if 400 <= e.status < 500:  # unreadable for this server: it stays so
                            await self._call(slot_cache.discard, folder, name)
                        continue
                    except (httpx.HTTPError, ValueError) as e:
                        errors.append(f"slot {slot}: {e or type(e).__name__}")
                        continue
                    await self._call(slot_cache.touch, folder, name)
                    restored += 1
                    tokens += int(ans.get("n_restored", 0))
                    nbytes += int(ans.get("n_read", 0))
        except TimeoutError:
            errors.append(f"the {SLOT_RESTORE_S:g} s deadline passed")
        except Exception as e:  # noqa: BLE001 - a restore must never keep it from READY
            errors.append(f"agent error: {e}")
        took = round(time.monotonic() - t0, 3)
        if not restored and not errors:
            return None
        stage = "restored" if restored else "failed"
        reason = "; ".join(errors) if errors else ""
        (log.warning if errors else log.info)(
            "%s: slot cache %s: %d slot(s), %d tokens, %d bytes in %.3f s %s",
            inst.instance_id,
            stage,
            restored,
            tokens,
            nbytes,
            took,
            reason,
        )
        return self._slot_event(inst, stage, restored, tokens, nbytes, took, reason)

    def _slot_event(
        self,
        inst: Instance,
        stage: str,
        slots: int,
        tokens: int,
        nbytes: int,
        seconds: float,
        reason: str,
    ) -> proto.SlotCacheChanged:
        return proto.SlotCacheChanged(
            model=inst.model,
            host=self.host,
            instance_id=inst.instance_id,
            stage=stage,
            slots=slots,
            tokens=tokens,
            bytes=nbytes,
            seconds=seconds,
            reason=reason[:1000],
        )

    @staticmethod
    async def _pause(inst: Instance, seconds: float) -> bool:
        """Sleep, waking early on a stop request; True if a stop was requested."""
        return await wait_event(inst.stop_event, seconds)

    def _ports_taken(self, inst: Instance) -> set[int]:
        return {i.port for i in self.instances.values() if i is not inst and i.port is not None}

    # ------------------------------------------------------------ adoption

    async def _adopt(self) -> None:
        """Reconcile KV with what really runs for this host id, before taking commands."""
        handles = await self._call(self.runtime.discover)
        records = await self._all_records()
        unwanted = []
        for h in handles:
            rec = records.get(h.instance_id)
            if (
                rec is None
                or rec.state not in proto.LIVE_STATES
                or rec.host not in (None, self.host)
            ):
                why = "no record" if rec is None else f"record is {rec.state.value}"
                log.info("stopping %s left by an earlier agent: %s", h.instance_id, why)
                unwanted.append(self._call(self.runtime.stop, h, STOP_GRACE_S))
                continue
            log.info("adopting %s (%s) on port %d", h.instance_id, rec.model, h.port)
            inst = Instance(
                h.instance_id, rec.model, tuple(rec.gpus), rec.memory_mib, handle=h, port=h.port
            )
            inst.state = rec.state
            inst.api_key = h.api_key  # from its server's environment (the runtime read it)
            if not h.api_key:
                log.warning("%s: its API key cannot be read back; no slot saves", h.instance_id)
            if self.cfg.slot_cache_mib and slot_cache.is_key(h.slot_key):
                inst.slot_key = h.slot_key  # launched with saving on: it saves when it stops
            inst.launched.set()
            self._spawn(inst)
        await asyncio.gather(*unwanted, return_exceptions=True)
        for iid, rec in records.items():
            if rec.host != self.host or iid in self.instances:
                continue
            if rec.state in (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING):
                log.warning("%s: %s", iid, NOT_FOUND_AFTER_RESTART)
                await self._transition(
                    iid,
                    rec.model,
                    InstanceState.FAILED,
                    reason=NOT_FOUND_AFTER_RESTART,
                    endpoint=None,
                )
            elif rec.state == InstanceState.STOPPING:
                await self._transition(iid, rec.model, InstanceState.STOPPED, reason=rec.reason)

    # ------------------------------------------------------------ records and events

    async def _get(self, instance_id: str) -> InstanceRecord | None:
        try:
            entry = await self.bus.instances.get(proto.instance_key(self.host, instance_id))
        except KeyNotFoundError:  # deleted keys too
            return None
        if not entry.value:
            return None
        try:
            return proto.decode(entry.value, InstanceRecord)
        except msgspec.ValidationError:
            log.warning("unreadable instance record %s", instance_id)
            return None

    async def _all_records(self) -> dict[str, InstanceRecord]:
        records = await kv_snapshot(self.bus, self.bus.instances, InstanceRecord, timeout=60)
        return {r.instance_id: r for r in records.values()}

    async def _update(
        self, instance_id: str, state: InstanceState, mutate: Callable[[InstanceRecord], None]
    ) -> tuple[InstanceRecord, int] | str:
        """Compare-and-set this host's record of `instance_id` into `state`: the record and
        its new revision, or why the lifecycle refuses it (proto/lifecycle.py). A lost race
        reads again and asks again, so a newer decision of the placer (stopping, lost) is
        never overwritten, and a purged record is never created again."""
        kv, key = self.bus.instances, proto.instance_key(self.host, instance_id)
        for _ in range(20):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # deleted keys too
                entry = None
            old = proto.decode(entry.value, InstanceRecord) if entry and entry.value else None
            why = lifecycle.refusal(lifecycle.AGENT, old.state if old else None, state)
            if why is not None:
                return why
            assert old is not None and entry is not None  # the agent never creates a record
            rec = msgspec.structs.replace(old, state=state)
            mutate(rec)
            rec.updated = proto.now()
            try:
                return rec, await kv.update(key, proto.encode(rec), last=entry.revision)
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.01)  # someone wrote in between: read again
        raise RuntimeError(f"instance record {instance_id}: too much write contention")

    async def _transition(
        self, instance_id: str, model: str, state: InstanceState, **fields: Any
    ) -> None:
        def mutate(r: InstanceRecord) -> None:
            r.host = self.host
            for k, v in fields.items():
                setattr(r, k, v)

        try:
            async with asyncio.timeout(10):
                done = await self._update(instance_id, state, mutate)
        except Exception as e:  # noqa: BLE001 - the bus is away; the lifecycle goes on
            log.error("cannot record %s %s: %s", instance_id, state.value, e)
            return
        if isinstance(done, str):  # the placer decided otherwise; its command follows
            log.info("not recording %s (%s) %s: %s", instance_id, model, state.value, done)
            return
        rec, rev = done
        await self.bus.emit_record(
            proto.InstanceChanged(
                instance_id=instance_id,
                model=rec.model,
                state=state,
                host=self.host,
                endpoint=rec.endpoint,
                reason=rec.reason,
                record=rec,
                revision=rev,
            )
        )

    async def _set(self, inst: Instance, state: InstanceState, **fields: Any) -> None:
        inst.state = state
        if state == InstanceState.STARTING:
            fields["gpus"] = list(inst.gpus)
            fields["binary"], fields["backend"] = self.runtime.program, self.runtime.backend
            if inst.memory_mib:  # keep what the placer reserved when the command has none
                fields["memory_mib"] = inst.memory_mib
        log.info(
            "%s (%s): %s %s", inst.instance_id, inst.model, state.value, fields.get("reason", "")
        )
        await self._transition(inst.instance_id, inst.model, state, **fields)

    async def _emit(self, event: proto.Event) -> None:
        try:
            await self.bus.emit(event)
        except Exception as e:  # noqa: BLE001 - events are best effort; KV holds the state
            log.warning("cannot emit %s: %s", type(event).__name__, e)


async def create_agent(ctx: ServiceContext) -> Agent:
    cfg = ctx.cfg.agent
    if not proto.HOST_ID_RE.fullmatch(ctx.host_id):  # --host-id bypasses the config's check
        raise StartupError(
            f"host id {ctx.host_id!r} (--host-id or agent.host_id): 1 to 64 letters, digits, "
            "'-' and '_' only"
        )
    store = ctx.cfg.store_dir().absolute()  # docker bind mounts need absolute paths
    store.mkdir(parents=True, exist_ok=True)
    cluster = ctx.cfg.cluster_id()
    telemetry = await asyncio.to_thread(Telemetry, ctx.host_id, cfg.gpus)
    runtime = await asyncio.to_thread(choose_runtime, cfg, ctx.host_id, store, telemetry, cluster)
    log.info(
        "agent %s (cluster %s): %s runtime, %d GPU(s)%s, store %s",
        ctx.host_id,
        cluster,
        runtime.name,
        telemetry.gpu_count,
        " (simulated)" if telemetry.simulated is not None else "",
        store,
    )
    return Agent(ctx, runtime, telemetry, Store(store))


async def run(ctx: ServiceContext) -> None:
    agent = await create_agent(ctx)
    await agent.serve()
