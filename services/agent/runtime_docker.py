"""Docker runtime: llama-server in a container on the host network, store mounted read-only.

Containers carry labels (lls.cluster, lls.host, lls.instance, lls.model, lls.port, lls.store),
which is how a restarted agent finds its own: same cluster id, host id and store, nothing else
on the engine (another stack on the same machine has another cluster id).

Containers are hardened: no new privileges, every capability dropped (llama-server binds an
unprivileged port and reads a world-readable file: it needs none), a pids limit and rotated
logs. The API key is passed in the environment (LLAMA_API_KEY), not in the command line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import docker
import docker.errors
from docker.types import DeviceRequest, LogConfig

import proto
from lls.paths import CPU, CUDA, UNKNOWN
from services.agent.image import ensure_image, is_local_build, knows_fit, official_image
from services.agent.runtime import (
    LOG_TAIL_LINES,
    Handle,
    LaunchError,
    LaunchSpec,
    bounded_tail,
    build_argv,
    tail_lines,
)

log = logging.getLogger(__name__)

MODELS_DIR = "/models"
OUTSIDE_DIR = "/lls-model"  # where a store file that links outside the store is mounted
SLOTS_DIR = "/lls-slots"  # the host's slot cache folder (warm swaps), read-write
# threads count too: llama-server runs about two per core (compute + HTTP); a fork bomb stops here
PIDS_LIMIT = 4096
LOG_MAX_SIZE, LOG_MAX_FILES = "20m", "3"


def engine(timeout_s: float = 10):  # noqa: ANN201 - docker.DockerClient
    """A client for the local Docker engine if one answers, else None."""
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
        return client
    except Exception as e:  # noqa: BLE001 - no engine, no socket, no permission...
        log.debug("no Docker engine: %s", e)
        return None


def container_name(host_id: str, instance_id: str, cluster_id: str = "") -> str:
    scope = f"{cluster_id}-" if cluster_id else ""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"lls-{scope}{host_id}-{instance_id}")


def container_env(c) -> dict[str, str]:  # noqa: ANN001 - docker Container
    """A container's environment as its config says (an adopted server's API key is read back
    from here, so it is never written anywhere else)."""
    env = (c.attrs.get("Config") or {}).get("Env") or []
    return dict(e.split("=", 1) for e in env if isinstance(e, str) and "=" in e)


def hardening() -> dict[str, object]:
    """containers.run() options that take from llama-server what it does not need."""
    return {
        "security_opt": ["no-new-privileges:true"],
        "cap_drop": ["ALL"],
        "pids_limit": PIDS_LIMIT,
        "log_config": LogConfig(
            type=LogConfig.types.JSON, config={"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}
        ),
    }


def model_mounts(store: Path, filename: str) -> tuple[str, dict[str, dict[str, str]]]:
    """(path of the model inside the container, volumes). A store entry that is a symlink to a
    file outside the store (a reused Ollama/HF copy) is mounted on its own."""
    volumes = {str(store): {"bind": MODELS_DIR, "mode": "ro"}}
    real = (store / filename).resolve()
    try:
        rel = real.relative_to(store.resolve())
        return f"{MODELS_DIR}/{rel.as_posix()}", volumes
    except ValueError:
        inside = f"{OUTSIDE_DIR}/{real.name}"
        volumes[str(real)] = {"bind": inside, "mode": "ro"}
        return inside, volumes


def image_backend(image: str, binary_backend: str) -> str:
    """What an image runs on: a local image, its binary's backend; one tagged for CUDA (the
    official server-cuda), cuda; the official plain server, cpu; any other, unknown."""
    if is_local_build(image):
        return binary_backend
    if "cuda" in image.rsplit("/", 1)[-1].lower():
        return CUDA
    return CPU if image == official_image(False) else UNKNOWN


class DockerRuntime:
    name = "docker"

    def __init__(
        self,
        client,  # noqa: ANN001
        host_id: str,
        store: Path,
        image: str,
        cluster_id: str = "",
        backend: str = UNKNOWN,  # the image's (image_backend)
    ):
        self.client = client
        self.host_id = host_id
        self.cluster_id = cluster_id
        self.store = store
        self.image = image
        self.program = image
        self.backend = f"docker/{backend}"

    @classmethod
    def create(
        cls,
        client,  # noqa: ANN001
        host_id: str,
        store: Path,
        configured_image: str,
        nvidia: bool,
        binary: Path | None,
        cluster_id: str = "",
        binary_backend: str = UNKNOWN,
    ) -> DockerRuntime:
        image = ensure_image(client, configured_image, nvidia, binary)
        backend = image_backend(image, binary_backend)
        log.info("docker runtime uses image %s (%s)", image, backend)
        return cls(client, host_id, store, image, cluster_id, backend)

    def _labels(self, spec: LaunchSpec) -> dict[str, str]:
        return {
            "lls.cluster": self.cluster_id,
            "lls.host": self.host_id,
            "lls.instance": spec.instance_id,
            "lls.model": spec.model,
            "lls.port": str(spec.port),
            "lls.store": str(self.store),
        } | ({"lls.slot_key": spec.slot_key} if spec.slot_key else {})

    def launch(self, spec: LaunchSpec) -> Handle:
        if not proto.INSTANCE_ID_RE.fullmatch(spec.instance_id):  # never a name we did not make
            raise LaunchError(f"bad instance id {spec.instance_id!r}")
        name = container_name(self.host_id, spec.instance_id, self.cluster_id)
        try:  # a leftover with the same name (an earlier failed start) would block the name
            self.client.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass
        model_path, volumes = model_mounts(self.store, spec.filename)
        extra: dict[str, object] = {}
        if spec.slot_dir:
            volumes[spec.slot_dir] = {"bind": SLOTS_DIR, "mode": "rw"}
            # As the agent's own user: the container's root has no capabilities (so it could
            # not write a folder the agent owns), and the agent renames and deletes the files.
            extra["user"] = f"{os.getuid()}:{os.getgid()}"
        argv = build_argv(
            model_path,
            alias=spec.model,
            host=spec.bind_host,
            port=spec.port,
            ctx_size=spec.ctx_size,
            n_gpu_layers=spec.n_gpu_layers,
            n_gpus=len(spec.gpus),
            embeddings=spec.embeddings,
            args=spec.args,
            fit_off=knows_fit(self.image),
            cpu_count=os.cpu_count() or 1,
            http_threads=spec.http_threads,
            cpu_compute=spec.cpu_compute,
            slot_save_path=SLOTS_DIR if spec.slot_dir else "",
            chat_template=spec.chat_template,
            # written into the store, which is mounted read-only at MODELS_DIR
            chat_template_file=f"{MODELS_DIR}/{spec.chat_template_file}"
            if spec.chat_template_file
            else "",
        )
        devices = None
        if spec.gpu_uuids:  # real GPUs only: simulated ones have nothing to pass through
            devices = [DeviceRequest(device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])]
        try:
            c = self.client.containers.run(
                self.image,
                command=argv,
                name=name,
                detach=True,
                labels=self._labels(spec),
                # host network: llama-server binds only the --host address given in argv
                network_mode="host",
                volumes=volumes,
                device_requests=devices,
                environment={"LLAMA_API_KEY": spec.api_key},
                **hardening(),
                **extra,
            )
        except docker.errors.DockerException as e:
            raise LaunchError(f"docker could not start {self.image}: {e}") from e
        c.reload()
        pid = c.attrs.get("State", {}).get("Pid") or None
        log.info("launched %s in container %s: %s", spec.instance_id, c.short_id, argv)
        return Handle(
            spec.instance_id,
            spec.model,
            spec.port,
            pid=pid,
            container_id=c.id,
            slot_key=spec.slot_key,
            api_key=spec.api_key,
        )

    def _container(self, h: Handle):  # noqa: ANN202
        try:
            return self.client.containers.get(h.container_id)
        except docker.errors.NotFound:
            return None

    def exit_code(self, h: Handle) -> int | None:
        c = self._container(h)
        if c is None:
            return -1
        state = c.attrs.get("State", {})
        if state.get("Running") or state.get("Status") in ("created", "restarting"):
            return None
        return int(state.get("ExitCode", -1))

    def log_tail(self, h: Handle, lines: int = LOG_TAIL_LINES) -> str:
        c = self._container(h)
        if c is None:
            return ""
        try:
            return tail_lines(c.logs(tail=lines).decode(errors="replace"), lines)
        except docker.errors.DockerException:
            return ""

    def log_lines(self, h: Handle, lines: int, max_bytes: int) -> tuple[list[str], bool]:
        c = self._container(h)
        if c is None:
            return [], False
        try:
            # one line more than wanted: the engine does not say whether the log holds more
            data = c.logs(tail=lines + 1)
        except docker.errors.DockerException:
            return [], False
        return bounded_tail(data, lines, max_bytes)

    def stop(self, h: Handle, grace_s: float) -> None:
        c = self._container(h)
        if c is not None:
            try:
                if grace_s <= 0:  # nothing to finish: no grace
                    c.kill()
                else:
                    c.stop(timeout=int(max(1, grace_s)))  # SIGTERM, SIGKILL after the grace
            except docker.errors.DockerException as e:
                log.warning("stopping container %s: %s", c.short_id, e)
        self.release(h)

    def release(self, h: Handle) -> None:
        c = self._container(h)
        if c is not None:
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass

    def discover(self) -> list[Handle]:
        found = []
        labels = [
            f"lls.cluster={self.cluster_id}",
            f"lls.host={self.host_id}",
            f"lls.store={self.store}",
        ]
        for c in self.client.containers.list(all=True, filters={"label": labels}):
            lb = c.labels
            try:
                h = Handle(
                    lb["lls.instance"],
                    lb.get("lls.model", ""),
                    int(lb["lls.port"]),
                    pid=c.attrs.get("State", {}).get("Pid") or None,
                    container_id=c.id,
                    slot_key=lb.get("lls.slot_key", ""),
                    api_key=container_env(c).get("LLAMA_API_KEY", ""),
                )
            except (KeyError, ValueError):
                log.warning("container %s has broken lls labels; removing it", c.short_id)
                c.remove(force=True)
                continue
            if not proto.INSTANCE_ID_RE.fullmatch(h.instance_id):
                log.warning("container %s has a bad instance id; leaving it", c.short_id)
                continue
            if c.status == "running":
                found.append(h)
            else:
                self.release(h)
        return found
