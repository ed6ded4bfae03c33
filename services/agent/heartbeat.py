"""The host's heartbeat: its record in KV `lls_hosts`, written every `agent.heartbeat_s`:
GPUs (NVML or simulated, telemetry.py) with what our instances claim and measurably hold,
CPU and RAM, the store's files, the instances running, and a llama-server build still on
its way. Warns once per store file of a model that will run without a chat template."""

from __future__ import annotations

import asyncio
import logging

import msgspec

import proto
from lls import chat_templates
from lls.bus import Bus
from lls.config import Config, store_filename_of
from services.agent.blocking import BlockingPool
from services.agent.instance import Instance
from services.agent.llama_binary import LlamaBinary
from services.agent.runtime import Runtime
from services.agent.store import Store
from services.agent.telemetry import Claim, Telemetry, cpu_count, host_memory

log = logging.getLogger(__name__)


class Heartbeat:
    """Builds and writes this host's HostRecord."""

    def __init__(
        self,
        config: Config,
        host: str,
        bus: Bus,
        runtime: Runtime,
        telemetry: Telemetry,
        store: Store,
        *,
        instances: dict[str, Instance],
        binary: LlamaBinary,
        pool: BlockingPool,
    ):
        self.config = config
        self.cfg = config.agent
        self.host = host
        self.bus = bus
        self.runtime = runtime
        self.telemetry = telemetry
        self.store = store
        self.instances = instances  # Lifecycle's, shared
        self.binary = binary
        self.pool = pool
        self.started_at = proto.now()
        self._template_warned: set[str] = set()  # store files warned of (no chat template)

    async def send(self) -> None:
        models = self.config.models
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
        gpus = [] if self.binary.cpu_only else await self.pool.call(self.telemetry.gpus, claims)
        measured = await self.pool.call(
            self.telemetry.measure, gpus, [c for c in claims if c.ctx_size >= 0]
        )
        files = await self.pool.call(self.store.scan)
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
            build=await self.pool.call(self.binary.build),
        )
        async with asyncio.timeout(5):
            await self.bus.put(self.bus.hosts, self.host, rec)

    def _warn_templates(self, files: list[proto.FileInfo]) -> None:
        """Once per store file, where its header was read: a configured model whose GGUF
        has no chat template, and none is configured (llama-server would use ChatML)."""
        models = self.config.models
        for f in files:
            m = models.get(f.model)
            has = f.gguf.has_chat_template if f.gguf is not None else None
            if m is None or not chat_templates.missing(m.chat_template, has):
                continue
            if f.filename not in self._template_warned:
                self._template_warned.add(f.filename)
                log.warning("%s", chat_templates.warning(f.model))
