"""Agent pieces without I/O around them: argv, pinning, ports, store scan, telemetry, images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import proto
from lls.config import SimulatedGpu
from services.agent.image import knows_fit, official_image, parse_ldd
from services.agent.runtime import (
    LaunchError,
    LaunchSpec,
    bind_host,
    build_argv,
    gpu_env,
    pick_port,
)
from services.agent.runtime_docker import container_name, model_mounts
from services.agent.runtime_process import alive, proc_status
from services.agent.store import Store, is_model_file
from services.agent.telemetry import Claim, Telemetry, host_memory, simulated_gpus


def argv(**kw: object) -> list[str]:
    base: dict = dict(alias="m", host="127.0.0.1", port=4000, ctx_size=2048, n_gpu_layers=0)
    return build_argv("/models/m.gguf", **(base | kw))


def test_argv_sets_model_port_alias_context_layers_and_metrics_and_leaves_slots_to_it() -> None:
    a = argv(fit_off=True)
    assert a[:8] == [
        "-m",
        "/models/m.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "4000",
        "--alias",
        "m",
    ]
    assert a[a.index("-c") + 1] == "2048" and a[a.index("-ngl") + 1] == "0"
    assert a[a.index("--fit") + 1] == "off"
    assert "-np" not in a  # llama-server's own slots: 4 sharing one unified KV cache
    assert "--metrics" in a and "--embeddings" not in a


def test_argv_sets_cpu_threads_wherever_the_instance_computes_on_the_cpu() -> None:
    """No layers offloaded, simulated GPUs or a CPU build: one thread fewer than the cores
    (left to llama-server's default, every core, two busy instances spin against each other
    at llama.cpp's barriers: 190 ms a token instead of 0.1 ms in a swap storm)."""
    cpu_only = build_argv(
        "/m", alias="m", host="h", port=1, ctx_size=8, n_gpu_layers=0, cpu_count=8
    )
    assert cpu_only[cpu_only.index("-t") + 1] == "7"
    simulated = dict(alias="m", host="h", port=1, ctx_size=8, n_gpu_layers=99, cpu_count=8)
    on_sim = build_argv("/m", cpu_compute=True, **simulated)  # type: ignore[arg-type]
    assert on_sim[on_sim.index("-t") + 1] == "7"
    assert "-t" not in build_argv("/m", **simulated)  # type: ignore[arg-type]  # a real GPU
    assert build_argv("/m", cpu_compute=True, args=["-t", "2"], **simulated).count("-t") == 1  # type: ignore[arg-type]


def test_argv_without_fit_support_omits_the_flag() -> None:
    assert "--fit" not in argv(fit_off=False)


def test_argv_leaves_slots_to_model_args_which_come_last() -> None:
    a = argv(args=["--parallel", "4", "--temp", "0.1"])
    assert "-np" not in a and a[-4:] == ["--parallel", "4", "--temp", "0.1"]
    assert "-np" not in argv(args=["--parallel=2"])


def test_argv_for_embeddings_uses_mean_pooling() -> None:
    a = argv(embeddings=True)
    assert a[a.index("--embeddings") + 1 : a.index("--embeddings") + 3] == ["--pooling", "mean"]


def spec(**kw: object) -> LaunchSpec:
    base: dict = dict(
        instance_id="m-0123abcd",
        model="m",
        filename="m.gguf",
        port=1,
        bind_host="127.0.0.1",
        ctx_size=1,
        n_gpu_layers=99,
    )
    return LaunchSpec(**(base | kw))


def test_gpu_pinning_prefers_uuids_then_indexes_and_hides_gpus_from_cpu_instances() -> None:
    assert gpu_env(spec(gpus=(1, 0), gpu_uuids=("GPU-b", "GPU-a"))) == {
        "CUDA_VISIBLE_DEVICES": "GPU-b,GPU-a"
    }
    assert gpu_env(spec(gpus=(2,))) == {"CUDA_VISIBLE_DEVICES": "2"}
    assert gpu_env(spec(n_gpu_layers=0)) == {"CUDA_VISIBLE_DEVICES": ""}
    assert gpu_env(spec()) == {}  # GPU layers without a chosen GPU: leave it to the driver


def test_server_binds_the_advertised_address_never_every_interface_by_default() -> None:
    assert bind_host("127.0.0.1") == "127.0.0.1"
    assert bind_host("localhost") == "127.0.0.1"
    assert bind_host("10.0.0.5") == "10.0.0.5"
    assert bind_host("10.0.0.5", "0.0.0.0") == "0.0.0.0"  # only when agent.bind_host says so


def test_pick_port_skips_ours_and_busy_ones_and_says_when_none_is_left() -> None:
    busy = {40001}
    port = pick_port((40000, 40002), taken={40000}, is_free=lambda p: p not in busy)
    assert port == 40002
    with pytest.raises(LaunchError, match="40000-40001"):
        pick_port((40000, 40001), taken={40000}, is_free=lambda p: p not in busy)


def test_parse_ldd_lists_libraries_and_the_loader() -> None:
    out = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibgomp.so.1 => /lib/x86_64-linux-gnu/libgomp.so.1 (0x00007f27)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f27)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f27)
"""
    assert parse_ldd(out) == [
        Path("/lib/x86_64-linux-gnu/libgomp.so.1"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib64/ld-linux-x86-64.so.2"),
    ]


def test_official_image_is_cuda_on_nvidia_hosts_and_known_to_take_fit() -> None:
    assert official_image(True) == "ghcr.io/ggml-org/llama.cpp:server-cuda"
    assert official_image(False) == "ghcr.io/ggml-org/llama.cpp:server"
    assert knows_fit("lls-llama-server:1-abc") and not knows_fit("me/my-llama:old")


def test_container_names_and_mounts(tmp_path: Path) -> None:
    assert container_name("h1", "abc") == "lls-h1-abc"
    assert container_name("h1", "abc", "c0ffee") == "lls-c0ffee-h1-abc"
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.gguf").write_bytes(b"x")
    elsewhere = tmp_path / "ollama-blob"
    elsewhere.write_bytes(b"x")
    (store / "b.gguf").symlink_to(elsewhere)
    path, vols = model_mounts(store, "a.gguf")
    assert path == "/models/a.gguf" and vols == {str(store): {"bind": "/models", "mode": "ro"}}
    path, vols = model_mounts(store, "b.gguf")  # a reused copy outside the store
    assert path == "/lls-model/ollama-blob" and vols[str(elsewhere)]["mode"] == "ro"


def test_store_lists_complete_gguf_files_only_and_caches_summaries(tmp_path: Path) -> None:
    summary = proto.GgufSummary("llama", 2, 2048, 64, 4, 4, 16, 16)
    calls = []

    def reader(p: Path) -> proto.GgufSummary:
        calls.append(p.name)
        return summary

    (tmp_path / "a.gguf").write_bytes(b"a" * 10)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "b.gguf").write_bytes(b"b")
    for junk in ["c.gguf.part", "c.gguf.part.json", ".d.gguf", "e.tmp.gguf", "notes.txt"]:
        (tmp_path / junk).write_bytes(b"x")
    store = Store(tmp_path, reader)
    files = store.scan()
    assert [(f.model, f.filename, f.size) for f in files] == [
        ("a", "a.gguf", 10),
        ("org/b", "org/b.gguf", 1),
    ]
    assert all(f.gguf == summary for f in files)
    store.scan()
    assert sorted(calls) == ["a.gguf", "b.gguf"]  # cached by mtime and size
    (tmp_path / "a.gguf").write_bytes(b"a" * 11)
    store.scan()
    assert sorted(calls) == ["a.gguf", "a.gguf", "b.gguf"]
    assert not is_model_file("x.gguf.tmp") and is_model_file("x-00001-of-00002.gguf")


def test_store_reports_an_unreadable_header_as_unknown(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")

    def reader(p: Path) -> proto.GgufSummary:
        raise ValueError("bad magic")

    [f] = Store(tmp_path, reader).scan()
    assert f.model == "bad" and f.gguf is None


def test_store_reads_real_headers(tmp_path: Path, tiny_gguf) -> None:  # noqa: ANN001
    os.link(tiny_gguf(1), tmp_path / "tiny.gguf")
    [f] = Store(tmp_path).scan()
    assert f.gguf is not None and f.gguf.architecture == "llama" and f.gguf.n_layers == 2


def test_simulated_gpus_account_memory_from_our_instances() -> None:
    cfg = [
        SimulatedGpu(name="Sim 8G", memory_mib=8192),
        SimulatedGpu(name="Sim 4G", memory_mib=4096),
    ]
    claims = [Claim((0,), 1000, pid=11), Claim((0, 1), 2000, pid=12), Claim((1,), 500)]
    g0, g1 = simulated_gpus("h1", cfg, claims)
    assert (g0.name, g0.memory_total_mib, g0.memory_used_mib, g0.memory_claimed_mib) == (
        "Sim 8G",
        8192,
        2000,
        2000,
    )
    assert (g1.memory_used_mib, g1.simulated, g1.uuid) == (1500, True, "SIM-h1-1")
    assert [(p.pid, p.used_mib, p.ours) for p in g0.processes] == [
        (11, 1000, True),
        (12, 1000, True),
    ]


class FakeNvml:
    """Stands in for pynvml on a machine without an NVIDIA GPU."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetUUID(self, i: int) -> bytes:  # noqa: N802
        return f"GPU-{i}aaa".encode()

    def nvmlDeviceGetName(self, i: int) -> str:  # noqa: N802
        return "NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, i: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=80 * 1024**3, used=(10 + i) * 1024**3, free=0)

    def nvmlDeviceGetUtilizationRates(self, i: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetTemperature(self, i: int, sensor: int) -> int:  # noqa: N802
        return 61

    def nvmlDeviceGetPowerUsage(self, i: int) -> int:  # noqa: N802
        if i == 1:
            raise self.NVMLError("Not Supported")
        return 250_000

    def nvmlDeviceGetComputeRunningProcesses(self, i: int) -> list[SimpleNamespace]:  # noqa: N802
        return [
            SimpleNamespace(pid=100, usedGpuMemory=4 * 1024**3),
            SimpleNamespace(pid=200, usedGpuMemory=None),
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, i: int) -> list[SimpleNamespace]:  # noqa: N802
        raise self.NVMLError("Not Supported")

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass


def test_nvml_telemetry_reports_memory_load_heat_power_and_whose_processes() -> None:
    t = Telemetry("h1", "auto", nvml=FakeNvml())
    assert t.has_nvidia and t.gpu_count == 2 and t.uuids([1]) == ("GPU-1aaa",)
    g0, g1 = t.gpus([Claim((0,), 3000, pid=100)])
    assert (g0.uuid, g0.name, g0.memory_total_mib, g0.memory_used_mib) == (
        "GPU-0aaa",
        "NVIDIA H100",
        81920,
        10240,
    )
    assert (g0.memory_claimed_mib, g0.utilization_pct, g0.temperature_c, g0.power_w) == (
        3000,
        37,
        61,
        250.0,
    )
    assert [(p.pid, p.used_mib, p.ours) for p in g0.processes] == [
        (100, 4096, True),
        (200, 0, False),
    ]
    assert g1.power_w is None and g1.memory_claimed_mib == 0 and not g1.simulated


def test_unknown_gpu_index_is_refused_with_the_host_inventory() -> None:
    t = Telemetry("h1", [SimulatedGpu(name="s", memory_mib=1)])
    assert t.uuids([0]) == ()  # simulated: nothing to pass to CUDA or Docker
    with pytest.raises(ValueError, match="GPU index 3 does not exist on host h1"):
        t.uuids([3])


def test_host_memory_reads_total_and_available() -> None:
    text = "MemTotal:       2048000 kB\nMemFree:  10 kB\nMemAvailable:   1024000 kB\n"
    assert host_memory(text) == (2000, 1000)
    total, free = host_memory()
    assert total > 0 and 0 < free <= total


def test_a_recycled_pid_is_not_taken_for_our_server() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        st = proc_status(p.pid)
        assert st is not None
        assert alive(p.pid, st[1]) and not alive(p.pid, st[1] + 1)
    finally:
        p.kill()
        p.wait()
    assert not alive(p.pid, st[1])


class FakeContainers:
    def __init__(self) -> None:
        self.runs: list[dict] = []

    def get(self, name: str) -> None:
        import docker.errors

        raise docker.errors.NotFound(name)

    def run(self, image: str, **kw: object) -> SimpleNamespace:
        self.runs.append({"image": image, **kw})
        return SimpleNamespace(
            id="c1", short_id="c1", attrs={"State": {"Pid": 42}}, reload=lambda: None
        )


def test_docker_pins_real_gpus_by_uuid_on_the_host_network(tmp_path: Path) -> None:
    from services.agent.runtime_docker import DockerRuntime

    client = SimpleNamespace(containers=FakeContainers())
    rt = DockerRuntime(client, "h1", tmp_path, "ghcr.io/ggml-org/llama.cpp:server-cuda", "cl1")
    h = rt.launch(spec(gpus=(0, 2), gpu_uuids=("GPU-a", "GPU-c"), port=4100, api_key="k" * 64))
    [run] = client.containers.runs
    [req] = run["device_requests"]
    assert req["DeviceIDs"] == ["GPU-a", "GPU-c"] and req["Capabilities"] == [["gpu"]]
    assert run["network_mode"] == "host" and run["name"] == "lls-cl1-h1-m-0123abcd"
    assert run["environment"] == {"LLAMA_API_KEY": "k" * 64}
    assert "k" * 64 not in " ".join(run["command"])  # not in `docker ps` / ps output
    assert run["security_opt"] == ["no-new-privileges:true"] and run["cap_drop"] == ["ALL"]
    assert run["pids_limit"] > 0 and run["log_config"]["Config"]["max-size"]
    assert run["labels"] | {} == {
        "lls.cluster": "cl1",
        "lls.host": "h1",
        "lls.instance": "m-0123abcd",
        "lls.model": "m",
        "lls.port": "4100",
        "lls.store": str(tmp_path),
    }
    assert run["command"][:2] == ["-m", "/models/m.gguf"] and "--fit" in run["command"]
    assert (h.container_id, h.pid, h.port) == ("c1", 42, 4100)
    rt.launch(spec(n_gpu_layers=0))  # CPU only, or simulated GPUs: no device request
    assert client.containers.runs[-1]["device_requests"] is None


def test_split_gguf_is_one_model_sized_by_all_its_parts(tmp_path):
    from services.agent.store import is_model_file, split_size

    for k, size in ((1, 100), (2, 50), (3, 25)):
        (tmp_path / f"m-{k:05d}-of-00003.gguf").write_bytes(b"x" * size)
    assert is_model_file("m-00001-of-00003.gguf")
    assert not is_model_file("m-00002-of-00003.gguf")
    assert split_size(tmp_path / "m-00001-of-00003.gguf", 100) == 175


def test_a_model_split_over_gpus_gets_an_even_tensor_split():
    from services.agent.runtime import build_argv

    argv = build_argv(
        "/m.gguf", alias="m", host="h", port=1, ctx_size=8, n_gpu_layers=999, n_gpus=3
    )
    assert argv[argv.index("--tensor-split") + 1] == "1,1,1"
    one = build_argv("/m.gguf", alias="m", host="h", port=1, ctx_size=8, n_gpu_layers=999, n_gpus=1)
    assert "--tensor-split" not in one
    own = build_argv(
        "/m.gguf",
        alias="m",
        host="h",
        port=1,
        ctx_size=8,
        n_gpu_layers=999,
        n_gpus=2,
        args=["-ts", "3,1"],
    )
    assert own.count("-ts") == 1 and "--tensor-split" not in own


def test_cpu_only_servers_leave_one_core_free_unless_the_model_sets_threads():
    from services.agent.runtime import build_argv

    def argv(**kw):  # noqa: ANN003, ANN202
        return build_argv("/m.gguf", alias="m", host="h", port=1, ctx_size=8, **kw)

    cpu = argv(n_gpu_layers=0, cpu_count=16)
    assert cpu[cpu.index("-t") + 1] == "15"
    two = argv(n_gpu_layers=0, cpu_count=2)
    assert two[two.index("-t") + 1] == "1"
    one = argv(n_gpu_layers=0, cpu_count=1)
    assert one[one.index("-t") + 1] == "1"
    assert "-t" not in argv(n_gpu_layers=999, n_gpus=1, cpu_count=16)  # GPU does the work
    own = argv(n_gpu_layers=0, cpu_count=16, args=["--threads", "4"])
    assert own.count("--threads") == 1 and "-t" not in own


def test_argv_gives_llama_server_an_http_thread_per_gateway_connection() -> None:
    from services.agent.lifecycle import http_threads

    assert http_threads(32) >= 2 * 32  # two gateways, each at its per-model limit
    a = argv(http_threads=http_threads(32))
    assert a[a.index("--threads-http") + 1] == str(http_threads(32))
    assert "--threads-http" not in argv()  # 0: llama-server's default
    own = argv(http_threads=72, args=["--threads-http", "4"])
    assert own.count("--threads-http") == 1 and own[-1] == "4"  # the model's own wins
