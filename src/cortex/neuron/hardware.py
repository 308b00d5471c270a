"""What this host serves on: the CUDA devices (`cuda_devices.py`, `nvml.py`), or one budgeted `cpu` device.

`Hardware` chooses the devices once, at start, from `devices.use` and what exists, and reports them
(`/discovery`) and their live figures (`/health`). Live figures come from NVML, which answers
without touching CUDA, so health never waits on a device worker. On a host without a usable GPU the
reason is reported instead, and the CPU device's "VRAM" is a configured share of host RAM against
which each model's measured memory is accounted.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Callable
from typing import Any

import psutil

from cortex.neuron import threads
from cortex.neuron.config import DevicesConfig
from cortex.neuron.cuda_devices import CudaView, Device, HardwareError, check_use, match_cuda_devices, torch_cuda_view
from cortex.neuron.nvml import Nvml, NvmlDevice


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
    """The devices this neuron serves on, chosen once at start from config and what exists.

    `nvml` and `cuda_view` are injectable so the mapping can be tested with a fake NVML and torch view.
    """

    def __init__(
        self,
        config: DevicesConfig,
        nvml: Nvml | None = None,
        cuda_view: Callable[[], CudaView] = torch_cuda_view,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.nvml = nvml or Nvml()
        self.cuda_reason: str | None = None
        self._cuda_view = cuda_view
        self._visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
        self.devices = self._select_devices()

    def _select_devices(self) -> list[Device]:
        if self.config.use == "cpu":
            self.cuda_reason = 'CUDA disabled by config (devices.use = "cpu")'
            return [self._cpu_device()]
        inventory = self.nvml.inventory() if self.nvml.available else []
        view = self._cuda_view()
        if not view.uuids:
            self.cuda_reason = self._no_cuda_reason(view, inventory)
            if self.config.use != "auto":
                raise HardwareError(f"devices.use = {self.config.use}, but {self.cuda_reason}")
            return [self._cpu_device()]
        # Without NVML (no nvidia-ml-py) the devices torch sees are still served, without live figures.
        devices = match_cuda_devices(view, inventory, self._visible)
        if self.config.use == "auto":
            return devices
        check_use(self.config.use, len(devices), self._visible)
        return [devices[i] for i in dict.fromkeys(self.config.use)]

    def _no_cuda_reason(self, view: CudaView, inventory: list[NvmlDevice]) -> str:
        if not self.nvml.available:
            return self.nvml.reason or "NVML unavailable"
        gpus = sum(1 for d in inventory if d.mig_index is None)
        if not gpus:
            return "NVML reports no GPUs"
        return f"{view.reason}; NVML sees {gpus} GPU(s)"

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
            "cuda_visible_devices": self._visible,
            "devices": [
                {
                    "index": d.index,
                    "kind": d.kind,
                    "name": d.name,
                    "vram_total_mb": d.vram_total_mb,
                    "compute_capability": d.compute_capability,
                    "uuid": d.uuid,
                    "nvml_index": d.nvml_index,
                    "mig_index": d.mig_index,
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
        return [self._cuda_health(d) for d in self.devices]

    def _cuda_health(self, device: Device) -> dict[str, Any]:
        live = self.nvml.live_info(device.nvml_index, device.mig_index) if device.nvml_index is not None else {}
        if not live:  # NVML does not know this unit: the total is all we know without touching CUDA
            live = {"vram_total_mb": device.vram_total_mb, "vram_used_mb": 0, "vram_free_mb": device.vram_total_mb}
        return {"index": device.index, "kind": "cuda", **live}
