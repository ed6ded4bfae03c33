"""Each instance's lifecycle: one task per instance that alone writes its record after launch
(starting -> ready -> stopping -> stopped, or failed), so a crash watcher and a stop never
race. A commanded start checks its record, resolves its GPUs, file and chat template, waits
for the llama-server build if one runs, launches (another port when the one picked was taken)
and waits for /health; an adopted instance only waits for /health. While ready, a crash
marks it failed; a stop saves its slots (warm swaps), stops the server and records it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Literal

import httpx

import proto
from lls import chat_templates
from lls.config import AgentConfig, Config, launch_fingerprint
from proto import InstanceState, StartInstance
from services.agent import slot_cache
from services.agent.blocking import BlockingPool
from services.agent.instance import Instance
from services.agent.llama_binary import LlamaBinary
from services.agent.records import Records
from services.agent.runtime import LaunchError, LaunchSpec, Runtime, local_url_host, pick_port
from services.agent.slot_calls import SLOT_SAVE_S, SLOT_SAVE_SHUTDOWN_S, SlotCalls
from services.agent.store import Store
from services.agent.telemetry import Telemetry

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL
STOP_WAIT_S = STOP_GRACE_S + 20.0  # a stop command waits this long for the instance to end
HEALTH_POLL_S = 0.02  # a start is noticed fast: a swap waits on it
WATCH_POLL_S = 1.0
BIND_ATTEMPTS = 3  # another process may grab the port between our probe and the server's bind


def http_threads(max_in_flight: int) -> int:
    """HTTP threads for an instance: every connection the gateways may hold open to it
    (two gateways at their per-model limit), plus a few for health checks and tokenizing."""
    return 2 * max_in_flight + 8


class Lifecycle:
    """The instances this agent runs (`instances`, by id) and the task that runs each."""

    def __init__(
        self,
        config: Config,
        bind: str,
        runtime: Runtime,
        telemetry: Telemetry,
        store: Store,
        *,
        records: Records,
        slots: SlotCalls,
        binary: LlamaBinary,
        pool: BlockingPool,
        http: httpx.AsyncClient,
    ):
        self.config = config
        self.cfg: AgentConfig = config.agent
        self.bind = bind
        self.runtime = runtime
        self.telemetry = telemetry
        self.store = store
        self.records = records
        self.slots = slots
        self.binary = binary
        self.pool = pool
        self.http = http
        self.instances: dict[str, Instance] = {}
        self.shutting_down = False  # the agent's own shutdown: shorter slot saves

    def spawn(self, inst: Instance) -> None:
        """Run `inst` in a task of its own; it is in `instances` until that task ends."""
        self.instances[inst.instance_id] = inst
        inst.task = asyncio.create_task(self._run(inst), name=f"instance {inst.instance_id}")

    def tasks(self) -> list[asyncio.Task[None]]:
        """The running instances' lifecycle tasks."""
        return [i.task for i in self.instances.values() if i.task is not None]

    async def _run(self, inst: Instance) -> None:
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
                    await self.pool.call(self.runtime.stop, inst.handle, STOP_GRACE_S)
            await self.records.set(
                inst, InstanceState.FAILED, reason=f"agent error: {e}", endpoint=None
            )
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

    # ------------------------------------------------------------ a commanded start

    async def _start(self, inst: Instance) -> bool:
        """Launch a commanded instance and wait for it: False when it failed or must not run,
        True when it is ready or a stop came first."""
        cmd = inst.cmd
        assert cmd is not None
        mine = await self._placed_here(inst, cmd)
        if mine is None:
            return False
        resolved = await self._resolve(inst, cmd)
        if resolved is None:
            return False
        uuids, builtin, template_file = resolved
        why = await self.binary.await_build(inst)
        if inst.stop_reason is not None:
            return True
        if why is not None:
            await self.records.set(inst, InstanceState.FAILED, reason=why, endpoint=None)
            return False
        await self.records.set(
            inst,
            InstanceState.STARTING,
            reason=f"launching llama-server ({self.runtime.name} runtime)",
            endpoint=None,
            log_tail="",
            ready_at=None,
        )
        deadline = time.monotonic() + self.cfg.start_timeout
        mcfg = self.config.models[cmd.model]  # refusal() made sure it is ours
        slot_dir = await self.slots.dir_ready()
        if slot_dir:
            inst.slot_key = slot_cache.cache_key(
                cmd.filename, mine, self.runtime.program, cmd.n_gpu_layers
            )
        spec = LaunchSpec(
            instance_id=inst.instance_id,
            model=cmd.model,
            filename=cmd.filename,
            port=0,  # picked per attempt (_launch)
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
            http_threads=http_threads(self.config.gateway.max_in_flight),
            slot_dir=slot_dir,
            slot_key=inst.slot_key,
            cpu_compute=self.binary.cpu_compute(cmd.n_gpu_layers),
            chat_template=builtin,
            chat_template_file=template_file,
        )
        return await self._launch(inst, spec, deadline)

    async def _placed_here(self, inst: Instance, cmd: StartInstance) -> str | None:
        """The model config's launch fingerprint when the record says to start it here; None
        (refused, or failed) when not."""
        rec = await self.records.get(inst.instance_id)
        if rec is None:
            # the placer writes the record before it commands a start: without one, this is a
            # start for an instance that was purged, or that nobody placed
            why = "no instance record (the placer creates it before a start)"
            log.info("not starting %s: %s", inst.instance_id, why)
            await self.records.refuse("start", inst.instance_id, inst.model, why, cmd.cmd_id)
            return None
        if rec.state in proto.END_STATES or rec.state == InstanceState.STOPPING:
            # a redelivered start for an instance that already ended: the placer decides retries
            log.info("not starting %s: its record is %s", inst.instance_id, rec.state.value)
            return None
        mine = launch_fingerprint(self.config.models[cmd.model])  # refusal(): ours
        if rec.config_fp and rec.config_fp != mine:
            # placed for another version of the model's config: one side has not reloaded yet
            why = (
                f"the placer placed it for a different config of {cmd.model} than this agent's "
                "(reload every service's config: SIGHUP or `lls reload`)"
            )
            await self.records.set(inst, InstanceState.FAILED, reason=why)
            return None
        return mine

    async def _resolve(
        self, inst: Instance, cmd: StartInstance
    ) -> tuple[tuple[str, ...], str, str] | None:
        """The GPUs' UUIDs, and the chat template as a built-in name or a file written into
        the store, once the model file is found there; None when one fails (recorded)."""
        try:
            uuids = self.telemetry.uuids(cmd.gpus)
            self._model_file(cmd.filename)
        except ValueError as e:
            await self.records.set(inst, InstanceState.FAILED, reason=str(e))
            return None
        builtin, template_file = "", ""
        if chat_templates.kind(cmd.chat_template) == "builtin":
            builtin = cmd.chat_template
        elif cmd.chat_template:  # Jinja text: into a file this agent names, in its store
            try:
                template_file = await self.pool.call(
                    chat_templates.write_template, self.store.root, cmd.chat_template
                )
            except OSError as e:
                why = f"cannot write the chat template into the store: {e}"
                await self.records.set(inst, InstanceState.FAILED, reason=why)
                return None
        return uuids, builtin, template_file

    async def _launch(self, inst: Instance, spec: LaunchSpec, deadline: float) -> bool:
        """Launch on a free port and wait for /health; on another port when the server could
        not bind the one picked (taken between our probe and its bind)."""
        for attempt in range(BIND_ATTEMPTS):
            if inst.stop_reason is not None:
                return True
            try:
                inst.port = pick_port(self.cfg.port_range, self._ports_taken(inst))
                spec = dataclasses.replace(spec, port=inst.port)
                inst.handle = await self.pool.call(self.runtime.launch, spec)
            except LaunchError as e:
                await self.records.set(inst, InstanceState.FAILED, reason=str(e))
                return False
            finally:
                inst.launched.set()
            outcome = await self._until_healthy(inst, deadline)
            if outcome == "exited" and attempt + 1 < BIND_ATTEMPTS:
                tail = await self.pool.call(self.runtime.log_tail, inst.handle)
                if "couldn't bind" in tail:
                    log.warning("%s: port %s was taken; another port", inst.instance_id, inst.port)
                    await self.pool.call(self.runtime.release, inst.handle)
                    inst.handle = None
                    continue
            return await self._settle(inst, outcome, "")
        return False  # not reached: the last attempt always settles

    # ------------------------------------------------------------ health, watch, stop

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
            restored = await self.slots.restore(inst) if inst.slot_key else None
            await self.mark_ready(inst, ready_reason)
            if restored is not None:
                await self.records.emit(restored)
            return True
        tail = await self.pool.call(self.runtime.log_tail, h)
        if outcome == "timeout":
            reason = (
                f"llama-server did not answer /health with 200 within "
                f"{self.cfg.start_timeout:g} s; killed"
            )
            await self.pool.call(self.runtime.stop, h, STOP_GRACE_S)
        else:
            code = await self.pool.call(self.runtime.exit_code, h)
            what = "with code unknown" if code == -1 else f"with code {code}"
            reason = f"llama-server exited {what} before it was ready"
            await self.pool.call(self.runtime.release, h)
        inst.handle = None
        await self.records.set(
            inst, InstanceState.FAILED, reason=reason, log_tail=tail, endpoint=None
        )
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
            if await self.pool.call(self.runtime.exit_code, h) is not None:
                return "exited"
            try:
                if (await self.http.get(url)).status_code == 200:
                    return "ready"
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                return "timeout"
            await inst.pause(HEALTH_POLL_S)

    async def _watch(self, inst: Instance) -> None:
        """While ready: return on a stop request; a crash marks the instance failed."""
        while not await inst.pause(WATCH_POLL_S):
            h = inst.handle
            assert h is not None
            code = await self.pool.call(self.runtime.exit_code, h)
            if code is None:
                continue
            tail = await self.pool.call(self.runtime.log_tail, h)
            await self.pool.call(self.runtime.release, h)
            inst.handle = None
            what = "with code unknown" if code == -1 else f"with code {code}"
            log.warning("%s: llama-server exited %s", inst.instance_id, what)
            await self.records.set(
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
            await self.records.set(inst, InstanceState.STOPPING, reason=reason)
        if inst.handle is not None:
            saved = None
            if inst.slot_key:  # after STOPPING: no new request changes what is saved
                budget = SLOT_SAVE_SHUTDOWN_S if self.shutting_down else SLOT_SAVE_S
                saved = await self.slots.save(inst, budget, reason)
            # Nothing running (a drained or idle instance, slots saved): SIGKILL at once, as
            # SIGTERM only adds llama-server's ~110 ms shutdown to every swap; else a grace.
            grace = 0.0 if await self.slots.idle(inst) else STOP_GRACE_S
            await self.pool.call(self.runtime.stop, inst.handle, grace)
            inst.handle = None
            if inst.slot_key:  # a save cut short may have left its temporary file
                await self.pool.call(self.slots.after_save, inst.instance_id)
            if saved is not None:  # after the stop: a slow bus never holds the memory
                await self.records.emit(saved)
        if not inst.quiet:
            await self.records.set(inst, InstanceState.STOPPED, reason=reason, endpoint=None)

    async def mark_ready(self, inst: Instance, reason: str) -> None:
        slots = await self.slots.n_slots(inst)  # what the gateways admit to it at once
        await self.records.set(
            inst,
            InstanceState.READY,
            endpoint=f"http://{self.cfg.advertise_host}:{inst.port}",
            ready_at=proto.now(),
            reason=reason,
            log_tail="",
            slots=slots,
        )

    def _ports_taken(self, inst: Instance) -> set[int]:
        return {i.port for i in self.instances.values() if i is not inst and i.port is not None}
