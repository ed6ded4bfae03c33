"""The runtime seam: how an instance's llama-server is launched, watched, stopped and found
again after an agent restart. Two implementations: plain processes and Docker containers.

Runtime methods block (subprocess, Docker SDK); the agent calls them on its thread pool
(blocking.py).
"""

from __future__ import annotations

import errno
import os
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from lls import chat_templates

LOG_TAIL_LINES = 30
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class LaunchError(RuntimeError):
    """The runtime could not even launch the server (missing binary, image, file...)."""


@dataclass(frozen=True)
class LaunchSpec:
    instance_id: str
    model: str
    filename: str  # relative to the store
    port: int
    bind_host: str
    ctx_size: int
    n_gpu_layers: int
    gpus: tuple[int, ...] = ()  # GPU indexes on this host
    gpu_uuids: tuple[str, ...] = ()  # NVML UUIDs of `gpus`; empty for simulated GPUs
    embeddings: bool = False
    args: tuple[str, ...] = ()  # extra llama-server flags from the agent's model config
    memory_mib: int = 0
    api_key: str = ""  # LLAMA_API_KEY (environment, never argv: argv is visible in ps)
    http_threads: int = 0  # --threads-http; 0 = llama-server's default
    slot_dir: str = ""  # host folder for slot saves (warm swaps); empty = slot saving off
    slot_key: str = ""  # slot_cache.cache_key of this launch, kept for a later agent to adopt
    # Computes on the CPU whatever -ngl says: simulated GPUs, or a binary without a GPU
    # backend. Its threads are then set as for a CPU-only instance (cpu_threads).
    cpu_compute: bool = False
    # The model's chat template (lls/chat_templates.py): a built-in name, or a Jinja file the
    # agent wrote, relative to the store like `filename`; both empty = the GGUF's own.
    chat_template: str = ""
    chat_template_file: str = ""


@dataclass
class Handle:
    """A running (or just exited) llama-server that this agent is responsible for."""

    instance_id: str
    model: str
    port: int
    pid: int | None = None  # process pid, or the container's main pid
    container_id: str | None = None
    slot_key: str = ""  # of its launch (warm swaps); "" = none known
    # its LLAMA_API_KEY: kept from the launch, or read back from the server's environment
    # when adopted (never stored elsewhere); "" = not known
    api_key: str = ""


class Runtime(Protocol):
    name: str  # "process" | "docker"
    program: str  # what runs the instances: the llama-server path, or the image
    backend: str  # lls.paths backend ("cpu", "cuda", "unknown"); "docker/<backend>" in Docker

    def launch(self, spec: LaunchSpec) -> Handle: ...

    def exit_code(self, h: Handle) -> int | None:
        """None while running; the exit code once it ended (-1 when unknown)."""
        ...

    def log_tail(self, h: Handle, lines: int = LOG_TAIL_LINES) -> str: ...

    def log_lines(self, h: Handle, lines: int, max_bytes: int) -> tuple[list[str], bool]:
        """The last `lines` lines of its log within `max_bytes` (bounded_tail), and whether
        the log holds more."""
        ...

    def stop(self, h: Handle, grace_s: float) -> None:
        """SIGTERM, SIGKILL after `grace_s` (at once when it is 0: nothing to finish), then
        release()."""
        ...

    def release(self, h: Handle) -> None:
        """Forget an ended instance: remove its state file / container."""
        ...

    def discover(self) -> list[Handle]:
        """Instances of this host id still running from an earlier agent (stale ones are
        released on the way)."""
        ...


# ---------------------------------------------------------------- pure helpers

_PARALLEL_FLAGS = {"-np", "--parallel"}


def has_flag(args: Iterable[str], flags: set[str]) -> bool:
    return any(a in flags or a.split("=", 1)[0] in flags for a in args)


_SPLIT_FLAGS = frozenset({"-ts", "--tensor-split"})
_THREAD_FLAGS = {"-t", "--threads"}
_HTTP_THREAD_FLAGS = {"--threads-http"}
_SLOT_SAVE_FLAGS = {"--slot-save-path"}


def cpu_threads(cpu_count: int) -> int:
    """Compute threads for a CPU-only llama-server: one core fewer than the host has.

    llama.cpp's threads meet at a spinning barrier after every op. With as many threads as
    cores, anything else that runs (our own services, another instance) deschedules one of
    them, and every barrier then waits out a scheduler slice: measured on a 2-core host with
    one busy process beside it, generation fell from ~3,500 to ~4 tokens/s and requests
    timed out. With one core left free it held its speed.
    """
    return max(1, cpu_count - 1)


def build_argv(
    model_path: str,
    *,
    alias: str,
    host: str,
    port: int,
    ctx_size: int,
    n_gpu_layers: int,
    n_gpus: int = 0,
    embeddings: bool = False,
    args: Iterable[str] = (),
    fit_off: bool = False,
    cpu_count: int = 0,
    http_threads: int = 0,
    slot_save_path: str = "",
    cpu_compute: bool = False,
    chat_template: str = "",
    chat_template_file: str = "",
) -> list[str]:
    """llama-server arguments (without the program). -c and -ngl are always explicit so the
    memory placement reserved is what gets used; the model's own args come last so they win."""
    args = list(args)
    argv = ["-m", model_path, "--host", host, "--port", str(port), "--alias", alias]
    argv += ["-c", str(ctx_size), "-ngl", str(n_gpu_layers)]
    if fit_off:  # --fit would silently shrink unset settings to whatever memory is free
        argv += ["--fit", "off"]
    if (n_gpu_layers == 0 or cpu_compute) and cpu_count and not has_flag(args, _THREAD_FLAGS):
        argv += ["-t", str(cpu_threads(cpu_count))]
    if http_threads and not has_flag(args, _HTTP_THREAD_FLAGS):
        # One HTTP thread per connection: llama-server's default (slots + 4) is fewer than
        # the connections a gateway opens under load, and an idle keep-alive connection
        # holds its thread for 5 s, so requests past the threads stalled in 5 s steps.
        argv += ["--threads-http", str(http_threads)]
    if n_gpus > 1 and n_gpu_layers and not has_flag(args, _SPLIT_FLAGS):
        # placement reserved an equal share on each GPU; llama.cpp would weigh by free memory
        argv += ["--tensor-split", ",".join(["1"] * n_gpus)]
    if embeddings:
        argv += ["--embeddings", "--pooling", "mean"]
    if slot_save_path and not has_flag(args, _SLOT_SAVE_FLAGS):
        # enables POST /slots/{id}?action=save|restore, confined to this folder (warm swaps)
        argv += ["--slot-save-path", slot_save_path]
        if "--swa-full" not in args:
            # Sliding-window models (Gemma 2/3, gpt-oss): a restored slot is otherwise evaluated
            # in full again, and their checkpoints grow RAM per turn. The memory estimate
            # already sizes those layers for the whole context, so this costs no placement.
            argv += ["--swa-full"]
    # a built-in name or a Jinja file (as the server sees its path); the config keeps the
    # model's args from choosing a template too (chat_templates.check)
    argv += chat_templates.argv(chat_template, chat_template_file)
    argv += ["--metrics"]
    return argv + args


def gpu_env(spec: LaunchSpec) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES pinning for the process runtime: UUIDs where NVML gave them (CUDA's
    default order differs from NVML's), else indexes; hide every GPU from a CPU-only instance."""
    if spec.gpu_uuids:
        return {"CUDA_VISIBLE_DEVICES": ",".join(spec.gpu_uuids)}
    if spec.gpus:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, spec.gpus))}
    if spec.n_gpu_layers == 0:
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {}


def bind_host(advertise_host: str, configured: str = "") -> str:
    """Listen where others reach us (agent.bind_host overrides), never on every interface
    by default: an instance is for the gateway, not for the whole network."""
    host = configured or advertise_host
    return "127.0.0.1" if host in LOOPBACK else host


def local_url_host(bind: str) -> str:
    """Where the agent itself reaches a server listening on `bind` (for /health)."""
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind


def minimal_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a llama-server process: what it needs to run and find its GPUs,
    nothing else. Tokens (HF_TOKEN, cloud credentials) are not inherited, nor LLAMA_ARG_*
    variables, which llama-server would read as flags."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith(_ENV_PREFIXES)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env | extra


_ENV_KEEP = frozenset({"PATH", "HOME", "LANG", "LC_ALL", "TZ", "LD_LIBRARY_PATH", "TMPDIR"})
# GPU runtimes (CUDA, ROCm, Vulkan) and OpenMP read their settings from these
_ENV_PREFIXES = ("CUDA_", "NVIDIA_", "HIP_", "ROCR_", "HSA_", "GGML_", "OMP_", "VK_")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR: ignore TIME_WAIT leftovers, still refuse a port someone listens on
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def pick_port(
    port_range: tuple[int, int],
    taken: set[int],
    is_free: Callable[[int], bool] = port_is_free,
    rng: random.Random | None = None,
) -> int:
    """A free port in the range, in random order so that agents sharing a machine rarely
    race for the same one."""
    lo, hi = port_range
    ports = [p for p in range(lo, hi + 1) if p not in taken]
    (rng or random).shuffle(ports)
    for p in ports:
        if is_free(p):
            return p
    raise LaunchError(f"no free port in agent.port_range {lo}-{hi}")


def tail_lines(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def bounded_tail(
    data: bytes, lines: int, max_bytes: int, *, mid_line: bool = False, more: bool = False
) -> tuple[list[str], bool]:
    """The last `lines` lines of `data` within `max_bytes`, and whether anything was left out.

    `mid_line`: `data` may begin inside a line (read from an offset), whose partial start is
    dropped; `more`: the log holds more than `data`."""
    if len(data) > max_bytes:
        data, mid_line, more = data[-max_bytes:], True, True
    if mid_line:
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    out = data.decode(errors="replace").splitlines()
    return out[-lines:], more or len(out) > lines
