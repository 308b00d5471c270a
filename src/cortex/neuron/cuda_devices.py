"""Which CUDA devices this process has, matched by UUID to NVML's inventory.

Two numberings meet here. NVML numbers GPUs by PCI bus, sees every GPU whatever CUDA_VISIBLE_DEVICES
says, and lists MIG slices only under their parent. CUDA (and so torch, and `cuda:N`) numbers only
what CUDA_VISIBLE_DEVICES exposes, in its own order. A device is therefore identified by its UUID:
each CUDA ordinal's UUID (from torch) is looked up in NVML's inventory of GPUs and MIG slices, and
the `Device` keeps both numbers: `index` is the CUDA ordinal (what `cuda:N` and `devices.use` mean),
`nvml_index`/`mig_index` address live figures. When torch cannot report UUIDs, CUDA_VISIBLE_DEVICES
is resolved against NVML's inventory the way the CUDA runtime does (indices, `GPU-`/`MIG-` UUIDs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cortex.neuron.nvml import NvmlDevice


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
