"""Runtime selection: Docker when an engine answers and an image can be had, else plain
processes; `agent.runtime` can insist on either (a start-up error says why it cannot)."""

from __future__ import annotations

import logging
from pathlib import Path

from lls.config import AgentConfig
from lls.paths import UNKNOWN, choose_llama_server
from services.agent.image import ImageError
from services.agent.runtime import Runtime
from services.agent.runtime_process import ProcessRuntime
from services.agent.telemetry import Telemetry

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The agent cannot run as configured (e.g. runtime docker without an engine)."""


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
