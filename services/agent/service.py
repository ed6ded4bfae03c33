"""The agent: one per host. Heartbeats telemetry into KV hosts, runs llama-server instances on
command, owns their InstanceRecords from STARTING on, and on restart adopts what an earlier
agent left running (or stops what nobody wants any more).

This module is the wiring: it builds the parts, adopts, subscribes, runs the heartbeat loop
and shuts down. The parts (collaborators, not mixins: DESIGN.md):

    commands.py       start and stop commands: validation, refusal, idempotence, epochs
    lifecycle.py      each instance's task: launch, /health, watch, stop
    reconcile.py      adoption after a restart; ready instances checked against KV
    records.py        instance record compare-and-set writes and the agent's events
    heartbeat.py      the host record: telemetry (telemetry.py), measured memory, files
    slot_calls.py     warm swaps: slot saves and restores (pure parts: slot_cache.py)
    log_tails.py      answers for the end of an instance's log
    llama_binary.py   the llama-server build waited for; CPU or GPU build
    runtime_choice.py Docker or processes (runtime*.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx

import proto
from lls.fence import Fence
from lls.service import ServiceContext
from proto import InstanceState
from services.agent.blocking import BlockingPool
from services.agent.commands import Commands
from services.agent.heartbeat import Heartbeat
from services.agent.lifecycle import STOP_GRACE_S, Lifecycle
from services.agent.llama_binary import LlamaBinary
from services.agent.log_tails import LogTails
from services.agent.reconcile import Reconciler
from services.agent.records import Records
from services.agent.runtime import Runtime, bind_host
from services.agent.runtime_choice import StartupError, choose_runtime
from services.agent.slot_calls import SlotCalls
from services.agent.store import Store
from services.agent.telemetry import Telemetry

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 5.0


class Agent:
    """The parts of the agent, built once and handed to each other, and the run that wires
    them to the bus."""

    def __init__(
        self,
        ctx: ServiceContext,
        runtime: Runtime,
        telemetry: Telemetry,
        store: Store,
    ):
        self.ctx = ctx
        self.bus = bus = ctx.bus
        self.cfg = ctx.cfg.agent
        self.host = host = ctx.host_id
        bind = bind_host(self.cfg.advertise_host, self.cfg.bind_host)
        self.runtime = runtime
        self.telemetry = telemetry
        self.store = store
        # runtime calls block (docker stop waits its grace): a pool of their own, so a few
        # slow stops never delay health polls
        self.pool = pool = BlockingPool()
        self._http = httpx.AsyncClient(timeout=2.0)
        self.records = records = Records(bus, host, runtime)
        self.binary = binary = LlamaBinary(self.cfg, runtime, telemetry, records, pool)
        self.slots = slots = SlotCalls(ctx.cfg, host, bind, store.root, self._http, pool)
        self.lifecycle = lc = Lifecycle(
            ctx.cfg,
            bind,
            runtime,
            telemetry,
            store,
            records=records,
            slots=slots,
            binary=binary,
            pool=pool,
            http=self._http,
        )
        self.reconciler = Reconciler(
            self.cfg, host, runtime, records=records, lifecycle=lc, pool=pool
        )
        self.heartbeat = Heartbeat(
            ctx.cfg,
            host,
            bus,
            runtime,
            telemetry,
            store,
            instances=lc.instances,
            binary=binary,
            pool=pool,
        )
        self.log_tails = LogTails(bus, host, runtime, lc.instances, pool)
        self.fence = Fence()  # the highest placer epoch seen: older commands are refused
        self.commands = Commands(ctx, fence=self.fence, records=records, lifecycle=lc)

    # ------------------------------------------------------------ main loop

    async def serve(self) -> None:
        bg: list[asyncio.Task[None]] = []
        try:
            await self.slots.prepare()
            await self.reconciler.adopt()
            await self.records.emit(
                proto.HostJoined(
                    host_id=self.host, gpus=self.telemetry.gpu_count, runtime=self.runtime.name
                )
            )
            await self.heartbeat.send()
            await self.log_tails.serve()
            bg = [
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self.commands.run(), name="commands"),
                asyncio.create_task(self.fence.follow(self.bus, self.ctx.stop), name="lease"),
            ]
            await self.ctx.stop.wait()
        except BaseException:
            # killed without a stop request (cancelled: a test's stand-in for kill -9) or
            # broken: leave the instances running for the next agent to adopt
            await self._cancel(bg + list(self.commands.handlers) + self.lifecycle.tasks())
            await self._close()
            raise
        await self._shutdown(bg)

    async def _heartbeat_loop(self) -> None:
        next_reconcile = time.monotonic() + RECONCILE_EVERY_S
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                await self.heartbeat.send()
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + RECONCILE_EVERY_S
                    await self.reconciler.reconcile()
            except Exception as e:  # noqa: BLE001 - NATS away for a moment: try again
                log.warning("heartbeat failed: %s", e)

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def _shutdown(self, bg: list[asyncio.Task[None]]) -> None:
        """Stop taking commands, stop every instance (marked stopped), say goodbye."""
        log.info("stopping %d instance(s)", len(self.lifecycle.instances))
        self.lifecycle.shutting_down = True
        await self._cancel(bg[1:] + list(self.commands.handlers))
        for inst in self.lifecycle.instances.values():
            inst.request_stop("agent shutting down")
        tasks = self.lifecycle.tasks()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S + 5)
            stuck = [i for i in self.lifecycle.instances.values() if i.task in pending]
            await self._cancel(list(pending))
            for inst in stuck:  # kill outright, whatever held them up
                if inst.handle is not None:
                    with contextlib.suppress(Exception):
                        await self.pool.call(self.runtime.stop, inst.handle, 0.5)
                await self.records.set(inst, InstanceState.STOPPED, reason="agent shutting down")
        await self._cancel(bg[:1])
        self.lifecycle.instances.clear()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.heartbeat.send()
        await self._close()

    async def _close(self) -> None:
        await self.log_tails.close()
        await self._http.aclose()
        self.pool.shutdown()
        self.telemetry.close()


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
