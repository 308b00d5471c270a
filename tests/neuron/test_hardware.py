"""CUDA ordinals are matched to NVML devices by UUID, under CUDA_VISIBLE_DEVICES and with MIG slices.

No GPU can run here, so NVML and torch's CUDA view are fakes with the shapes the real ones return
(this is the one place the neuron tests mock anything).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cortex.neuron.config import DevicesConfig
from cortex.neuron.cuda_devices import (
    CudaView,
    Device,
    HardwareError,
    match_cuda_devices,
    normalise_uuid,
    resolve_visible,
    torch_cuda_view,
)
from cortex.neuron.hardware import Hardware
from cortex.neuron.nvml import Nvml, NvmlDevice

A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"
M0 = "MIG-cccccccc-0000-0000-0000-000000000000"
M1 = "MIG-dddddddd-0000-0000-0000-000000000000"
GIB = 2**30


def bare(uuid: str) -> str:
    """How torch prints a device's UUID: the hex form, no `GPU-`/`MIG-` prefix."""
    return uuid.split("-", 1)[1]


# --- fake NVML ---------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeUnit:
    uuid: str
    name: str
    total: int
    used: int = GIB
    migs: list[FakeUnit] | None = None  # a GPU in MIG mode


@dataclass
class Memory:
    total: int
    used: int
    free: int


class FakePynvml:
    """The pynvml calls nvml.py makes, over GPUs listed in PCI (NVML) order."""

    NVMLError = FakeNVMLError
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[FakeUnit]) -> None:
        self.gpus = gpus

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeUnit:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, unit: FakeUnit) -> str:
        return unit.uuid

    def nvmlDeviceGetName(self, unit: FakeUnit) -> bytes:
        return unit.name.encode()  # older nvidia-ml-py returns bytes

    def nvmlDeviceGetMemoryInfo(self, unit: FakeUnit) -> Memory:
        return Memory(unit.total, unit.used, unit.total - unit.used)

    def nvmlDeviceGetCudaComputeCapability(self, unit: FakeUnit) -> tuple[int, int]:
        return (9, 0)

    def nvmlDeviceGetMigMode(self, unit: FakeUnit) -> list[int]:
        if unit.migs is None:
            raise FakeNVMLError("Not Supported")
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, unit: FakeUnit) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, unit: FakeUnit, slot: int) -> FakeUnit:
        if unit.migs is None or slot >= len(unit.migs):
            raise FakeNVMLError("Not Found")
        return unit.migs[slot]

    def nvmlDeviceGetUtilizationRates(self, unit: FakeUnit) -> Any:
        if unit.uuid.startswith("MIG-"):
            raise FakeNVMLError("Not Supported")

        @dataclass
        class Rates:
            gpu: int = 37

        return Rates()

    def nvmlDeviceGetTemperature(self, unit: FakeUnit, sensor: int) -> int:
        return 51

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.00"


def two_gpus() -> list[FakeUnit]:
    return [FakeUnit(A, "H200", 141 * GIB), FakeUnit(B, "H100", 80 * GIB)]


def mig_host() -> list[FakeUnit]:
    slices = [FakeUnit(M0, "H100 MIG 3g.40gb", 40 * GIB), FakeUnit(M1, "H100 MIG 1g.10gb", 10 * GIB, used=GIB // 2)]
    return [FakeUnit(A, "H100", 80 * GIB, migs=slices)]


def view(*uuids: str | None) -> CudaView:
    return CudaView(list(uuids), [f"torch-{i}" for i in range(len(uuids))], [8 * GIB] * len(uuids))


def hardware(gpus: list[FakeUnit], cuda: CudaView, visible: str | None = None, use: Any = "auto") -> Hardware:
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    return Hardware(DevicesConfig(use=use), Nvml(FakePynvml(gpus)), lambda: cuda, environ)


# --- pure mapping ------------------------------------------------------------------------------


def inventory(gpus: list[FakeUnit]) -> list[NvmlDevice]:
    return Nvml(FakePynvml(gpus)).inventory()


def test_uuids_compare_without_their_prefix() -> None:
    assert normalise_uuid(A) == normalise_uuid(bare(A)) == "aaaaaaaa-0000-0000-0000-000000000000"
    assert normalise_uuid(M0.upper()) == normalise_uuid(bare(M0))


def test_inventory_lists_mig_slices_under_their_parent() -> None:
    units = inventory(mig_host())
    assert [(u.uuid, u.nvml_index, u.mig_index) for u in units] == [(A, 0, None), (M0, 0, 0), (M1, 0, 1)]
    assert units[1].name == "H100 MIG 3g.40gb"
    assert units[1].compute_capability == "9.0"


def test_visible_devices_resolve_like_the_cuda_runtime() -> None:
    units = inventory(two_gpus())
    assert [u.uuid for u in resolve_visible(None, units)] == [A, B]
    assert [u.uuid for u in resolve_visible("1,0", units)] == [B, A]
    assert [u.uuid for u in resolve_visible("GPU-bbbb", units)] == [B]  # a unique prefix is enough
    assert [u.uuid for u in resolve_visible("0,7,1", units)] == [A]  # CUDA stops at the first bad entry
    assert resolve_visible("", units) == []
    assert resolve_visible("-1", units) == []
    migs = inventory(mig_host())
    assert [u.uuid for u in resolve_visible(M1, migs)] == [M1]


def test_ordinals_follow_torch_not_nvml_order() -> None:
    # CUDA_VISIBLE_DEVICES=1: torch's cuda:0 is NVML's GPU 1.
    devices = match_cuda_devices(view(bare(B)), inventory(two_gpus()), "1")
    assert devices == [Device(0, "cuda", "H100", 80 * 1024, "9.0", B, nvml_index=1, mig_index=None)]
    assert devices[0].torch_name == "cuda:0"


def test_a_mig_slice_is_matched_to_its_parent_and_slot() -> None:
    devices = match_cuda_devices(view(bare(M1)), inventory(mig_host()), M1)
    assert [(d.index, d.name, d.vram_total_mb, d.nvml_index, d.mig_index) for d in devices] == [
        (0, "H100 MIG 1g.10gb", 10 * 1024, 0, 1)
    ]


def test_without_torch_uuids_the_visible_list_decides() -> None:
    devices = match_cuda_devices(view(None, None), inventory(two_gpus()), "1,0")
    assert [(d.index, d.uuid, d.nvml_index) for d in devices] == [(0, B, 1), (1, A, 0)]


def test_a_device_nvml_does_not_know_keeps_torchs_figures() -> None:
    devices = match_cuda_devices(view("eeeeeeee-0000"), inventory(two_gpus()), None)
    assert devices == [Device(0, "cuda", "torch-0", 8 * 1024, None, "eeeeeeee-0000")]


# --- Hardware ----------------------------------------------------------------------------------


def test_hardware_maps_discovery_and_health_by_uuid() -> None:
    hw = hardware(two_gpus(), view(bare(B), bare(A)), visible="GPU-bbbbbbbb,0")
    assert [(d.torch_name, d.name, d.nvml_index) for d in hw.devices] == [("cuda:0", "H100", 1), ("cuda:1", "H200", 0)]
    found = hw.discovery()
    assert found["cuda_available"] is True
    assert found["cuda_visible_devices"] == "GPU-bbbbbbbb,0"
    assert [(d["index"], d["uuid"]) for d in found["devices"]] == [(0, B), (1, A)]
    assert found["driver_version"] == "580.00"
    assert found["cuda_driver_version"] == "13.0"
    health = hw.device_health(0)
    assert [(h["index"], h["vram_total_mb"], h["utilization_pct"], h["temp_c"]) for h in health] == [
        (0, 80 * 1024, 37, 51),
        (1, 141 * 1024, 37, 51),
    ]


def test_mig_health_has_memory_but_no_utilisation() -> None:
    hw = hardware(mig_host(), view(bare(M1)), visible=M1)
    (health,) = hw.device_health(0)
    assert health["vram_total_mb"] == 10 * 1024
    assert health["vram_used_mb"] == 512
    assert health["utilization_pct"] is None
    assert health["temp_c"] == 51


def test_explicit_use_picks_cuda_ordinals_and_is_range_checked() -> None:
    hw = hardware(two_gpus(), view(bare(A), bare(B)), use=[1])
    assert [(d.index, d.uuid) for d in hw.devices] == [(1, B)]
    with pytest.raises(HardwareError, match=r"devices.use lists \[2\], but this process sees CUDA devices 0..0"):
        hardware(two_gpus(), view(bare(B)), visible="1", use=[0, 2])


def test_cpu_only_torch_on_a_gpu_host_falls_back_to_cpu_with_the_reason() -> None:
    cpu_torch = CudaView([], [], [], "this torch (2.x+cpu) is a CPU-only build")
    hw = hardware(two_gpus(), cpu_torch)
    assert hw.is_cpu
    assert hw.cuda_reason == "this torch (2.x+cpu) is a CPU-only build; NVML sees 2 GPU(s)"
    with pytest.raises(HardwareError, match="CPU-only build"):
        hardware(two_gpus(), cpu_torch, use=[0])


class NoDriverNvml(FakePynvml):
    def nvmlInit(self) -> None:
        raise FakeNVMLError("Driver Not Loaded")


def test_no_nvml_and_no_cuda_means_cpu_with_the_reason() -> None:
    hw = Hardware(DevicesConfig(), Nvml(NoDriverNvml([])), lambda: view())
    assert hw.is_cpu
    assert hw.cuda_reason == "NVML unavailable: Driver Not Loaded (no NVIDIA driver or GPU on this host)"
    with pytest.raises(HardwareError, match=r"devices.use = \[0\], but NVML unavailable"):
        Hardware(DevicesConfig(use=[0]), Nvml(NoDriverNvml([])), lambda: view())


def test_without_nvml_the_devices_torch_sees_are_served() -> None:
    hw = Hardware(DevicesConfig(), Nvml(NoDriverNvml([])), lambda: view(bare(A)))
    assert [(d.torch_name, d.name, d.nvml_index) for d in hw.devices] == [("cuda:0", "torch-0", None)]
    (health,) = hw.device_health(0)
    assert (health["vram_total_mb"], health["vram_free_mb"]) == (8 * 1024, 8 * 1024)


def test_the_real_torch_view_here_says_why_there_is_no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    found = torch_cuda_view()
    assert found.uuids == []
    assert found.reason


def test_neuron_refuses_to_start_on_devices_this_host_lacks(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "neuron.toml"
    config.write_text("default_models = []\n[devices]\nuse = [0]\n")
    from tests.support.procs import free_port

    args = [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--config", str(config)]
    args += ["--listen", f"127.0.0.1:{free_port()}"]
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a cuda:0")
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "neuron: devices.use = [0], but" in done.stderr
