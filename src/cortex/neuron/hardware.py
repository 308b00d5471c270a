"""What this host has: CUDA devices matched between NVML and torch by UUID, or one budgeted `cpu` device.

Two numberings meet here. NVML numbers GPUs by PCI bus, sees every GPU whatever CUDA_VISIBLE_DEVICES
says, and lists MIG slices only under their parent. CUDA (and so torch, and `cuda:N`) numbers only
what CUDA_VISIBLE_DEVICES exposes, in its own order. A device is therefore identified by its UUID:
each CUDA ordinal's UUID (from torch) is looked up in NVML's inventory of GPUs and MIG slices, and
the `Device` keeps both numbers: `index` is the CUDA ordinal (what `cuda:N` and `devices.use` mean),
`nvml_index`/`mig_index` address live figures. When torch cannot report UUIDs, CUDA_VISIBLE_DEVICES
is resolved against NVML's inventory the way the CUDA runtime does (indices, `GPU-`/`MIG-` UUIDs).

Live figures come from NVML, which answers without touching CUDA, so health never waits on a device
worker. On a host without a usable GPU the reason is reported instead, and the CPU device's "VRAM" is
a configured share of host RAM against which each model's measured memory is accounted.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from cortex.neuron import threads
from cortex.neuron.config import DevicesConfig

try:  # nvidia-ml-py is in the neuron extra; a CPU host may not have it.
    import pynvml
except ImportError:  # pragma: no cover - depends on the host
    pynvml = None


class HardwareError(ValueError):
    """The configured devices do not exist on this host (e.g. `devices.use` names a missing ordinal)."""


@dataclass(frozen=True)
class Device:
    index: int  # the CUDA ordinal: `cuda:{index}` (0 for the CPU device)
    kind: str  # "cuda" | "cpu"
    name: str
    vram_total_mb: int
    compute_capability: str | None = None
    uuid: str | None = None
    nvml_index: int | None = None  # the GPU (or a MIG slice's parent) in NVML's numbering
    mig_index: int | None = None  # the slice under nvml_index, for a MIG device

    @property
    def torch_name(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


@dataclass(frozen=True)
class NvmlDevice:
    """One CUDA-capable unit as NVML sees it: a whole GPU, or one MIG slice of a GPU in MIG mode."""

    uuid: str
    name: str
    memory_total: int
    compute_capability: str | None
    nvml_index: int
    mig_index: int | None = None


@dataclass(frozen=True)
class CudaView:
    """What torch sees: one UUID per CUDA ordinal (None where it cannot tell), or why there is nothing."""

    uuids: list[str | None]
    names: list[str]
    memory_totals: list[int]
    reason: str | None = None  # set when uuids is empty


def normalise_uuid(uuid: str) -> str:
    """The comparable part of a UUID: NVML says `GPU-…`/`MIG-…`, torch gives the bare hex form."""
    text = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def resolve_visible(visible: str | None, inventory: Sequence[NvmlDevice]) -> list[NvmlDevice]:
    """The units CUDA_VISIBLE_DEVICES exposes, in CUDA ordinal order, as the CUDA runtime reads it.

    Unset: every whole GPU (in NVML's PCI order; CUDA's default order can differ, so this is only a
    fallback to torch's UUIDs). Entries are NVML indices or UUIDs (`GPU-…`, `MIG-…`, or a unique
    prefix); the list ends at the first entry that matches nothing, as in CUDA. An empty value hides all.
    """
    whole = [d for d in inventory if d.mig_index is None]
    if visible is None:
        return whole
    chosen: list[NvmlDevice] = []
    for raw in visible.split(","):
        entry = raw.strip()
        device: NvmlDevice | None = None
        if entry.isdigit():
            device = next((d for d in whole if d.nvml_index == int(entry)), None)
        elif entry:
            wanted = normalise_uuid(entry)
            matches = [d for d in inventory if normalise_uuid(d.uuid).startswith(wanted)]
            device = matches[0] if len(matches) == 1 else None
        if device is None:
            break
        if device not in chosen:
            chosen.append(device)
    return chosen


def match_cuda_devices(view: CudaView, inventory: Sequence[NvmlDevice], visible: str | None) -> list[Device]:
    """One `Device` per CUDA ordinal, with NVML's figures where its UUID matches one of NVML's units."""
    by_uuid = {normalise_uuid(d.uuid): d for d in inventory}
    fallback = resolve_visible(visible, inventory) if any(u is None for u in view.uuids) else []
    devices = []
    for ordinal, uuid in enumerate(view.uuids):
        unit = by_uuid.get(normalise_uuid(uuid)) if uuid else None
        if unit is None and uuid is None and ordinal < len(fallback):
            unit = fallback[ordinal]
        if unit is None:  # torch sees it, NVML does not: report what torch knows, no live figures
            name, total = view.names[ordinal], view.memory_totals[ordinal]
            devices.append(Device(ordinal, "cuda", name, total // 2**20, None, uuid))
            continue
        devices.append(
            Device(
                ordinal,
                "cuda",
                unit.name,
                unit.memory_total // 2**20,
                unit.compute_capability,
                unit.uuid,
                unit.nvml_index,
                unit.mig_index,
            )
        )
    return devices


def check_use(use: Sequence[int], count: int, visible: str | None) -> None:
    """Raise HardwareError unless every index in `devices.use` is a CUDA ordinal this process has."""
    missing = sorted({i for i in use if not 0 <= i < count})
    if missing:
        seen = f"CUDA devices 0..{count - 1}" if count else "no CUDA device"
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise HardwareError(f"devices.use lists {missing}, but this process sees {seen}{where}")


def torch_cuda_view() -> CudaView:
    """Ask torch which CUDA devices this process has. Initialises CUDA in this process; no context is created."""
    try:
        import torch
    except ImportError:
        return CudaView([], [], [], "torch is not installed")
    if torch.version.cuda is None:
        return CudaView([], [], [], f"this torch ({torch.__version__}) is a CPU-only build")
    if not torch.cuda.is_available():
        return CudaView([], [], [], "torch sees no usable CUDA device (driver, or CUDA_VISIBLE_DEVICES hides them)")
    uuids: list[str | None] = []
    names, totals = [], []
    for ordinal in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(ordinal)
        uuid = getattr(props, "uuid", None)
        uuids.append(str(uuid) if uuid is not None else None)
        names.append(props.name)
        totals.append(int(props.total_memory))
    return CudaView(uuids, names, totals)


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

    def live_info(self, device: Device) -> dict[str, Any]:
        nvml = self._nvml
        if device.nvml_index is None:
            return {}
        parent = nvml.nvmlDeviceGetHandleByIndex(device.nvml_index)
        handle = parent
        if device.mig_index is not None:
            handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, device.mig_index)
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
        live = self.nvml.live_info(device)
        if not live:  # NVML does not know this unit: the total is all we know without touching CUDA
            live = {"vram_total_mb": device.vram_total_mb, "vram_used_mb": 0, "vram_free_mb": device.vram_total_mb}
        return {"index": device.index, "kind": "cuda", **live}
