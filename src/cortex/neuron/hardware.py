"""What this host has: CUDA devices through NVML (nvidia-ml-py), or one budgeted `cpu` device.

NVML answers without touching CUDA, so discovery and health never wait on a device worker. On a
host without a GPU, the reason is reported instead, and the CPU device's "VRAM" is a configured
share of host RAM against which each model's measured memory is accounted.
"""

from __future__ import annotations

import os
import platform
import socket
import threading
from dataclasses import dataclass
from typing import Any

import psutil

from cortex.neuron import threads
from cortex.neuron.config import DevicesConfig

try:  # nvidia-ml-py is in the neuron extra; a CPU host may not have it.
    import pynvml
except ImportError:  # pragma: no cover - depends on the host
    pynvml = None


@dataclass(frozen=True)
class Device:
    index: int
    kind: str  # "cuda" | "cpu"
    name: str
    vram_total_mb: int
    compute_capability: str | None = None

    @property
    def torch_name(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


class Nvml:
    """A lazily initialised NVML session; `reason` says why it is unavailable when it is."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._ok = self._init()

    def _init(self) -> bool:
        if pynvml is None:
            self.reason = "nvidia-ml-py is not installed"
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.reason = f"NVML unavailable: {exc} (no NVIDIA driver or GPU on this host)"
            return False
        return True

    @property
    def available(self) -> bool:
        return self._ok

    def device_count(self) -> int:
        return pynvml.nvmlDeviceGetCount() if self._ok else 0

    def static_info(self, index: int) -> Device:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return Device(index, "cuda", str(name), total // 2**20, f"{major}.{minor}")

    def live_info(self, index: int) -> dict[str, Any]:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        return {
            "vram_used_mb": mem.used // 2**20,
            "vram_free_mb": mem.free // 2**20,
            "vram_total_mb": mem.total // 2**20,
            "utilization_pct": util.gpu,
            "temp_c": temp,
        }

    def versions(self) -> dict[str, str | None]:
        if not self._ok:
            return {"driver_version": None, "cuda_driver_version": None}
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return {
            "driver_version": str(pynvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": f"{cuda // 1000}.{(cuda % 1000) // 10}",
        }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_budget_mb(config: DevicesConfig) -> int:
    if config.cpu_memory_mb is not None:
        return config.cpu_memory_mb
    return int(psutil.virtual_memory().total * config.cpu_memory_fraction) // 2**20


class Hardware:
    """The devices this neuron serves on, chosen once at start from config and what exists."""

    def __init__(self, config: DevicesConfig) -> None:
        self.config = config
        self.nvml = Nvml()
        self.cuda_reason: str | None = None
        self.devices = self._select_devices()

    def _select_devices(self) -> list[Device]:
        if self.config.use == "cpu":
            self.cuda_reason = 'CUDA disabled by config (devices.use = "cpu")'
            return [self._cpu_device()]
        if not self.nvml.available:
            self.cuda_reason = self.nvml.reason
            return [self._cpu_device()]
        indices = range(self.nvml.device_count()) if self.config.use == "auto" else self.config.use
        devices = [self.nvml.static_info(i) for i in indices]
        if not devices:
            self.cuda_reason = "NVML reports no GPUs"
            return [self._cpu_device()]
        return devices

    def _cpu_device(self) -> Device:
        return Device(0, "cpu", cpu_name(), cpu_budget_mb(self.config))

    @property
    def is_cpu(self) -> bool:
        return self.devices[0].kind == "cpu"

    def discovery(self) -> dict[str, Any]:
        uname = platform.uname()
        return {
            "hostname": socket.gethostname(),
            "os": uname.system,
            "kernel": uname.release,
            "arch": uname.machine,
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "ram_total_mb": psutil.virtual_memory().total // 2**20,
            **self.nvml.versions(),
            "cuda_available": not self.is_cpu,
            "cuda_reason": self.cuda_reason,
            "devices": [
                {
                    "index": d.index,
                    "kind": d.kind,
                    "name": d.name,
                    "vram_total_mb": d.vram_total_mb,
                    "compute_capability": d.compute_capability,
                }
                for d in self.devices
            ],
            "harnesses": ["transformers"],
            "engine": threads.current(),
        }

    def device_health(self, cpu_used_mb: int) -> list[dict[str, Any]]:
        """Live per-device figures; on CPU, the budget less the models' measured memory."""
        if self.is_cpu:
            total = self.devices[0].vram_total_mb
            return [
                {
                    "index": 0,
                    "kind": "cpu",
                    "vram_total_mb": total,
                    "vram_used_mb": cpu_used_mb,
                    "vram_free_mb": max(0, total - cpu_used_mb),
                    "utilization_pct": psutil.cpu_percent(interval=None),
                    "temp_c": None,
                    "process_rss_mb": psutil.Process().memory_info().rss // 2**20,
                }
            ]
        return [{"index": d.index, "kind": "cuda", **self.nvml.live_info(d.index)} for d in self.devices]
