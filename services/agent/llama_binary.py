"""The llama-server this host runs: whether it is there yet, and whether it computes on the
CPU. A process runtime that started before `make run`'s build finished takes the built
binary once it is there; until then a start waits for the build (lls/build_status), its
record saying how far the build is, and the heartbeat carries the build's stage."""

from __future__ import annotations

import logging
import os
import time

import proto
from lls import build_status
from lls.config import AgentConfig
from lls.paths import CPU, choose_llama_server
from proto import InstanceState
from services.agent.blocking import BlockingPool
from services.agent.instance import Instance
from services.agent.records import Records
from services.agent.runtime import Runtime
from services.agent.runtime_process import ProcessRuntime
from services.agent.telemetry import Telemetry

log = logging.getLogger(__name__)

# A start that arrives while `make run` still builds llama-server waits for the build (a few
# minutes on 2 cores), looking at its status file this often.
BUILD_WAIT_S = 3600.0
BUILD_POLL_S = 1.0


class LlamaBinary:
    """The runtime's llama-server: its build awaited, its kind (CPU or GPU) known."""

    def __init__(
        self,
        cfg: AgentConfig,
        runtime: Runtime,
        telemetry: Telemetry,
        records: Records,
        pool: BlockingPool,
    ):
        self.cfg = cfg
        self.runtime = runtime
        self.telemetry = telemetry
        self.records = records
        self.pool = pool
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

    def build(self) -> proto.BuildProgress | None:
        """The llama-server build this host waits for, if its binary is not there yet."""
        return None if self._has_binary() else build_status.current()

    async def await_build(self, inst: Instance) -> str | None:
        """Hold a start while this host's llama-server is being built, its record saying how
        far the build is (the gateway passes that on to the requests waiting for it). None
        to go on: the binary is there, a stop was requested, or no build runs (the launch
        then says what is missing); else why the start failed (a failed build names its log).
        """
        deadline = time.monotonic() + BUILD_WAIT_S
        said: tuple[str, int] | None = None
        while (build := await self.pool.call(self.build)) is not None:
            if build.stage in (build_status.FAILED, build_status.STOPPED):
                return build.message
            if time.monotonic() >= deadline:
                return (
                    f"the llama-server build did not finish in {BUILD_WAIT_S:g} s; see {build.log}"
                )
            if (build.stage, build.percent // 10) != said:  # each stage, each 10%: the host
                said = (build.stage, build.percent // 10)  # record has the rest (heartbeat)
                await self.records.set(
                    inst, InstanceState.STARTING, reason=build.message, endpoint=None
                )
            if await inst.pause(BUILD_POLL_S):
                return None
        return None

    def cpu_compute(self, n_gpu_layers: int) -> bool:
        """Whether an instance computes on the CPU: no layers offloaded, simulated GPUs (no
        GPU to offload to), or a binary built without a GPU backend. Left to its default
        thread count (every core) there, two busy instances spin against each other at
        llama.cpp's barriers: 190 ms a token instead of 0.1 ms in a swap storm."""
        return (
            n_gpu_layers == 0
            or self.telemetry.simulated is not None
            or self.runtime.backend.rsplit("/", 1)[-1] == "cpu"
        )
