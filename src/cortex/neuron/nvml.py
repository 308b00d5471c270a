"""NVML, the NVIDIA driver's management library: the host's GPUs and MIG slices, and their live figures.

NVML numbers GPUs by PCI bus, sees every GPU whatever CUDA_VISIBLE_DEVICES says, and lists MIG
slices only under their parent (`inventory`). It answers without touching CUDA, so the neuron's
health figures (`live_info`) never wait on a device worker. `cuda_devices.py` matches this
inventory to the CUDA ordinals torch sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:  # nvidia-ml-py is in the neuron extra; a CPU host may not have it.
    import pynvml
except ImportError:  # pragma: no cover - depends on the host
    pynvml = None


@dataclass(frozen=True)
class NvmlDevice:
    """One CUDA-capable unit as NVML sees it: a whole GPU, or one MIG slice of a GPU in MIG mode."""

    uuid: str
    name: str
    memory_total: int
    compute_capability: str | None
    nvml_index: int
    mig_index: int | None = None


class Nvml:
    """A lazily initialised NVML session; `reason` says why it is unavailable when it is."""

    def __init__(self, module: Any = None) -> None:
        self._nvml = module if module is not None else pynvml
        self.reason: str | None = None
        self._ok = self._init()

    def _init(self) -> bool:
        if self._nvml is None:
            self.reason = "nvidia-ml-py is not installed"
            return False
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            self.reason = f"NVML unavailable: {exc} (no NVIDIA driver or GPU on this host)"
            return False
        return True

    @property
    def available(self) -> bool:
        return self._ok

    def device_count(self) -> int:
        return self._nvml.nvmlDeviceGetCount() if self._ok else 0

    def inventory(self) -> list[NvmlDevice]:
        """Every GPU, and for a GPU in MIG mode each of its slices (which is what CUDA can see of it)."""
        nvml = self._nvml
        units: list[NvmlDevice] = []
        for index in range(self.device_count()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            capability = self._capability(handle)
            units.append(self._unit(handle, index, None, capability))
            for mig, mig_handle in self._mig_handles(handle):
                units.append(self._unit(mig_handle, index, mig, capability))
        return units

    def _unit(self, handle: Any, index: int, mig: int | None, capability: str | None) -> NvmlDevice:
        nvml = self._nvml
        total = nvml.nvmlDeviceGetMemoryInfo(handle).total
        return NvmlDevice(
            _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)), total, capability, index, mig
        )

    def _capability(self, handle: Any) -> str | None:
        try:
            major, minor = self._nvml.nvmlDeviceGetCudaComputeCapability(handle)
        except self._nvml.NVMLError:
            return None
        return f"{major}.{minor}"

    def _mig_handles(self, handle: Any) -> list[tuple[int, Any]]:
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except (nvml.NVMLError, AttributeError):  # no MIG support on this GPU or driver
            return []
        if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return []
        handles = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                handles.append((slot, nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)))
            except nvml.NVMLError:  # an empty slot
                continue
        return handles

    def live_info(self, nvml_index: int, mig_index: int | None = None) -> dict[str, Any]:
        """Memory, utilisation and temperature of a GPU (or of MIG slice `mig_index` of it), now."""
        nvml = self._nvml
        parent = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
        handle = parent
        if mig_index is not None:
            handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, mig_index)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "vram_used_mb": mem.used // 2**20,
            "vram_free_mb": mem.free // 2**20,
            "vram_total_mb": mem.total // 2**20,
            # A MIG slice has no utilisation counter of its own; temperature is the parent's.
            "utilization_pct": self._optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "temp_c": self._optional(lambda: nvml.nvmlDeviceGetTemperature(parent, nvml.NVML_TEMPERATURE_GPU)),
        }

    def _optional(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except self._nvml.NVMLError:
            return None

    def versions(self) -> dict[str, str | None]:
        if not self._ok:
            return {"driver_version": None, "cuda_driver_version": None}
        cuda = self._nvml.nvmlSystemGetCudaDriverVersion()
        return {
            "driver_version": _text(self._nvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": f"{cuda // 1000}.{(cuda % 1000) // 10}",
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
