"""GPU and host telemetry: NVML where there is an NVIDIA GPU, else the simulated GPUs from the
config, whose memory use is what this agent's instances claim. CPU and RAM from /proc.

NVML calls block and may fail one by one (a field a GPU does not support): each reading
falls back to None instead of failing the heartbeat.

Our instances' real footprint (`measure`): NVML's per-process used memory of the
llama-server process, or of the container's processes (its main pid and their children),
summed over the GPUs the instance runs on. Simulated GPUs measure nothing: their "usage" is
our own claims, and feeding that back would prove the estimate right by construction.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import proto
from lls.config import SimulatedGpu

log = logging.getLogger(__name__)
MIB = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class Claim:
    """Memory one of our instances was placed with, spread evenly over its GPUs."""

    gpus: tuple[int, ...]
    memory_mib: int
    pid: int | None = None  # the process, or the container's main process
    instance_id: str = ""  # with model and ctx_size: what a measurement is reported under
    model: str = ""
    ctx_size: int = 0


def claims_by_gpu(claims: Iterable[Claim]) -> dict[int, int]:
    out: dict[int, int] = {}
    for c in claims:
        for g in c.gpus:
            out[g] = out.get(g, 0) + c.memory_mib // len(c.gpus)
    return out


def simulated_gpus(
    host_id: str, cfg: Sequence[SimulatedGpu], claims: list[Claim]
) -> list[proto.GpuInfo]:
    per_gpu = claims_by_gpu(claims)
    gpus = []
    for i, g in enumerate(cfg):
        procs = [
            proto.GpuProcess(pid=c.pid, used_mib=c.memory_mib // len(c.gpus), ours=True)
            for c in claims
            if i in c.gpus and c.pid is not None
        ]
        gpus.append(
            proto.GpuInfo(
                index=i,
                uuid=f"SIM-{host_id}-{i}",
                name=g.name,
                memory_total_mib=g.memory_mib,
                memory_used_mib=min(per_gpu.get(i, 0), g.memory_mib),
                memory_claimed_mib=per_gpu.get(i, 0),
                processes=procs,
                simulated=True,
            )
        )
    return gpus


def host_memory(meminfo: str | None = None) -> tuple[int, int]:
    """(total, available) RAM in MiB from /proc/meminfo."""
    if meminfo is None:
        try:
            with open("/proc/meminfo") as f:
                meminfo = f.read()
        except OSError:
            return 0, 0
    kib = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kib[key] = int(parts[0])
    total = kib.get("MemTotal", 0)
    free = kib.get("MemAvailable", kib.get("MemFree", 0))
    return total // 1024, free // 1024


def ppid(pid: int) -> int | None:
    """The parent of `pid` from /proc, or None when it is gone (or not in our namespace)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def owner_pid(
    pid: int, ours: Collection[int], parent_of: Callable[[int], int | None], depth: int = 4
) -> int | None:
    """Which of `ours` `pid` is, or descends from (a container's main process and its
    children), looking `depth` generations up; None when it is not ours."""
    for _ in range(depth + 1):
        if pid in ours:
            return pid
        up = parent_of(pid)
        if up is None or up <= 1:
            return None
        pid = up
    return None


def nvml_process_mib(nvml: Any, dev: Any) -> dict[int, int]:
    """pid -> MiB it holds on this GPU, from NVML's compute and graphics process lists
    (pynvml's nvmlDeviceGetComputeRunningProcesses is the v3 call). A process whose usage
    NVML cannot tell (usedGpuMemory None, as without access to other users' processes)
    reads 0. A list NVML does not support is skipped."""
    procs: dict[int, int] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for p in _safe(lambda g=getter: getattr(nvml, g)(dev), []):
            used = getattr(p, "usedGpuMemory", None)
            procs[p.pid] = max(procs.get(p.pid, 0), (used or 0) // MIB)
    return procs


def measure(
    gpus: Sequence[proto.GpuInfo],
    claims: Iterable[Claim],
    parent_of: Callable[[int], int | None] = ppid,
) -> list[proto.MeasuredMemory]:
    """What each of our instances holds on its real GPUs: the NVML-listed memory of its
    processes summed over its GPUs. Nothing for simulated GPUs, for an instance whose
    processes NVML does not list (yet), or one on a GPU this reading lacks."""
    real = {g.index: g for g in gpus if not g.simulated}
    ours = {c.pid: c for c in claims if c.pid is not None and c.instance_id and c.gpus}
    used: dict[int, int] = {}
    for g in real.values():
        for p in g.processes:
            root = owner_pid(p.pid, ours, parent_of)
            if root is not None and g.index in ours[root].gpus:
                used[root] = used.get(root, 0) + p.used_mib
    return [
        proto.MeasuredMemory(
            instance_id=c.instance_id,
            model=c.model,
            ctx_size=c.ctx_size,
            gpu_name=real[c.gpus[0]].name,
            used_mib=used[pid],
            gpus=len(c.gpus),
        )
        for pid, c in sorted(ours.items())
        if used.get(pid, 0) > 0 and all(i in real for i in c.gpus)
    ]


def _safe(fn: Callable[[], T], default: T) -> T:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends
        return default


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def load_nvml() -> Any | None:
    """The initialised pynvml module, or None when there is no NVIDIA driver."""
    try:
        with warnings.catch_warnings():  # the pynvml shim warns about its own name
            warnings.simplefilter("ignore")
            import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception as e:  # noqa: BLE001 - no library, no driver, no device
        log.info("NVML not available (%s)", e)
        return None


class Telemetry:
    def __init__(
        self,
        host_id: str,
        gpus_cfg: str | Sequence[SimulatedGpu],
        nvml: Any | None = None,
        parent_of: Callable[[int], int | None] = ppid,
    ):
        self.host_id = host_id
        self.parent_of = parent_of  # tests pass a fake process tree
        self.simulated: list[SimulatedGpu] | None = None
        self.nvml = None
        if isinstance(gpus_cfg, str):  # "auto": real GPUs where NVML sees some
            self.nvml = nvml if nvml is not None else load_nvml()
        else:
            self.simulated = list(gpus_cfg)
        self._uuids: list[str] = []
        if self.nvml is not None:
            n = _safe(self.nvml.nvmlDeviceGetCount, 0)
            self._uuids = [
                _safe(lambda i=i: _text(self.nvml.nvmlDeviceGetUUID(self._dev(i))), f"GPU-{i}")
                for i in range(n)
            ]

    @property
    def has_nvidia(self) -> bool:
        return bool(self._uuids)

    @property
    def gpu_count(self) -> int:
        return len(self.simulated) if self.simulated is not None else len(self._uuids)

    def _dev(self, i: int) -> Any:
        assert self.nvml is not None
        return self.nvml.nvmlDeviceGetHandleByIndex(i)

    def uuids(self, indexes: Iterable[int]) -> tuple[str, ...]:
        """NVML UUIDs for pinning (empty for simulated GPUs); ValueError on an unknown index."""
        indexes = list(indexes)
        bad = [i for i in indexes if not 0 <= i < self.gpu_count]
        if bad:
            raise ValueError(
                f"GPU index {','.join(map(str, bad))} does not exist on host {self.host_id} "
                f"({self.gpu_count} GPUs)"
            )
        return () if self.simulated is not None else tuple(self._uuids[i] for i in indexes)

    def gpus(self, claims: list[Claim]) -> list[proto.GpuInfo]:
        if self.simulated is not None:
            return simulated_gpus(self.host_id, self.simulated, claims)
        if self.nvml is None:
            return []
        per_gpu = claims_by_gpu(claims)
        ours = {c.pid for c in claims if c.pid is not None}
        return [self._nvml_gpu(i, per_gpu.get(i, 0), ours) for i in range(len(self._uuids))]

    def _nvml_gpu(self, i: int, claimed: int, ours: set[int]) -> proto.GpuInfo:
        nv = self.nvml
        assert nv is not None
        dev = _safe(lambda: self._dev(i), None)
        mem = _safe(lambda: nv.nvmlDeviceGetMemoryInfo(dev), None)
        procs = nvml_process_mib(nv, dev)
        power_mw = _safe(lambda: nv.nvmlDeviceGetPowerUsage(dev), None)
        return proto.GpuInfo(
            index=i,
            uuid=self._uuids[i],
            name=_safe(lambda: _text(nv.nvmlDeviceGetName(dev)), "NVIDIA GPU"),
            memory_total_mib=mem.total // MIB if mem else 0,
            memory_used_mib=mem.used // MIB if mem else 0,
            memory_claimed_mib=claimed,
            utilization_pct=_safe(lambda: int(nv.nvmlDeviceGetUtilizationRates(dev).gpu), None),
            temperature_c=_safe(
                lambda: int(
                    nv.nvmlDeviceGetTemperature(dev, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
                ),
                None,
            ),
            power_w=power_mw / 1000 if power_mw is not None else None,
            processes=[
                proto.GpuProcess(
                    pid=pid, used_mib=used, ours=owner_pid(pid, ours, self.parent_of) is not None
                )
                for pid, used in sorted(procs.items())
            ],
        )

    def measure(
        self, gpus: Sequence[proto.GpuInfo], claims: Iterable[Claim]
    ) -> list[proto.MeasuredMemory]:
        """Our instances' real footprint on these GPUs (empty for simulated ones)."""
        return measure(gpus, claims, self.parent_of)

    def close(self) -> None:
        if self.nvml is not None:
            _safe(self.nvml.nvmlShutdown, None)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
