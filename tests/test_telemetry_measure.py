"""The agent's reading of what its instances really hold on their GPUs (NVML per process).

NVML is I/O, so these use a tiny fake of the pynvml module; the rest is pure.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lls.config import SimulatedGpu
from proto import GpuInfo, GpuProcess, MeasuredMemory
from services.agent.telemetry import (
    Claim,
    Telemetry,
    measure,
    nvml_process_mib,
    owner_pid,
    simulated_gpus,
)

MIB = 1 << 20


class TinyNvml:
    """pynvml as far as the process lists go: one GPU, an H200, with these processes."""

    def __init__(self, compute: list[Any], graphics: list[Any] | None = None) -> None:
        self.compute, self.graphics = compute, graphics

    def nvmlDeviceGetComputeRunningProcesses(self, dev: Any) -> list[Any]:  # noqa: N802
        return self.compute

    def nvmlDeviceGetGraphicsRunningProcesses(self, dev: Any) -> list[Any]:  # noqa: N802
        if self.graphics is None:
            raise RuntimeError("NVMLError_NotSupported")
        return self.graphics

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetUUID(self, dev: Any) -> bytes:  # noqa: N802
        return b"GPU-aaaa"

    def nvmlDeviceGetName(self, dev: Any) -> bytes:  # noqa: N802
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, dev: Any) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(total=143771 * MIB, used=5000 * MIB)


def proc(pid: int, mib: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * MIB)


def test_nvml_process_memory_reads_compute_and_graphics_lists() -> None:
    nv = TinyNvml([proc(10, 2434), proc(11, None)], graphics=[proc(10, 100), proc(12, 7)])
    # a pid in both lists counts once (the larger); unknown usage reads 0
    assert nvml_process_mib(nv, 0) == {10: 2434, 11: 0, 12: 7}
    # a list the GPU does not support is skipped, not fatal
    assert nvml_process_mib(TinyNvml([proc(10, 628)]), 0) == {10: 628}


def test_a_container_s_children_count_as_its_own() -> None:
    parents = {500: 400, 400: 300, 300: 1, 77: 1}
    assert owner_pid(500, {300}, parents.get) == 300  # grandchild of the main process
    assert owner_pid(300, {300}, parents.get) == 300
    assert owner_pid(77, {300}, parents.get) is None
    assert owner_pid(999, {300}, parents.get) is None  # gone (or another pid namespace)


def gpu(index: int, name: str, *procs: tuple[int, int], simulated: bool = False) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name=name,
        memory_total_mib=143771,
        memory_used_mib=0,
        processes=[GpuProcess(pid=p, used_mib=m) for p, m in procs],
        simulated=simulated,
    )


def claim(pid: int | None, gpus: tuple[int, ...], iid: str = "i1", ctx: int = 4096) -> Claim:
    return Claim(gpus, 2488, pid, instance_id=iid, model="m", ctx_size=ctx)


def test_measure_sums_an_instance_s_processes_over_its_gpus() -> None:
    gpus = [
        gpu(0, "NVIDIA H200", (10, 2434), (20, 900), (99, 5000)),
        gpu(1, "NVIDIA H200", (20, 950)),
    ]
    parents = {21: 20}
    got = measure(gpus, [claim(10, (0,)), claim(20, (0, 1), iid="i2")], parents.get)
    assert got == [
        MeasuredMemory("i1", "m", 4096, "NVIDIA H200", 2434, 1),
        MeasuredMemory("i2", "m", 4096, "NVIDIA H200", 1850, 2),  # split: both GPUs summed
    ]


def test_measure_reports_nothing_it_did_not_read() -> None:
    real = [gpu(0, "NVIDIA H200", (10, 2434))]
    assert measure(real, [claim(None, (0,))], {}.get) == []  # no pid yet
    assert measure(real, [claim(11, (0,))], {}.get) == []  # NVML does not list it (yet)
    assert measure(real, [claim(10, (1,))], {}.get) == []  # on a GPU this reading lacks
    assert measure(real, [Claim((0,), 2488, 10)], {}.get) == []  # no instance to name


def test_simulated_gpus_measure_nothing() -> None:
    # their processes echo our own claims: feeding that back would prove any estimate right
    claims = [claim(10, (0,))]
    sim = simulated_gpus("h1", [SimulatedGpu(name="Sim 8G", memory_mib=8192)], claims)
    assert sim[0].processes and measure(sim, claims, {}.get) == []
    t = Telemetry("h1", [SimulatedGpu(name="Sim 8G", memory_mib=8192)])
    assert t.measure(t.gpus(claims), claims) == []


def test_telemetry_over_nvml_reports_the_llama_server_footprint() -> None:
    nv = TinyNvml([proc(4242, 2434), proc(4243, 12), proc(31337, 700)])
    t = Telemetry("h1", "auto", nvml=nv, parent_of={4243: 4242}.get)
    claims = [claim(4242, (0,))]
    gpus = t.gpus(claims)
    assert [(p.pid, p.ours) for p in gpus[0].processes] == [
        (4242, True),
        (4243, True),  # a child of our server: ours too
        (31337, False),
    ]
    assert t.measure(gpus, claims) == [MeasuredMemory("i1", "m", 4096, "NVIDIA H200", 2434 + 12, 1)]
