"""A device worker that cannot bind its device fails every job at once with the reason, instead of hanging."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from pathlib import Path

import pytest
import torch

from cortex.neuron.config import DevicesConfig, ModelConfig, NeuronConfig
from cortex.neuron.cuda_devices import Device
from cortex.neuron.engine import Engine
from cortex.neuron.engine.types import LoadError, LoadSpec, ModelSource
from cortex.neuron.engine.worker import DeviceUnavailable, DeviceWorker, WorkerClosed
from cortex.neuron.hardware import Hardware
from cortex.neuron.lifecycle import Lifecycle

needs_cpu_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use cuda:0")


class _SlowFailingWorker(DeviceWorker):
    """Binds only when told to, then fails: jobs can be queued while the bind is still pending."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__("cpu")

    def _bind_device(self) -> None:
        self.release.wait(10)
        raise RuntimeError("driver exploded")


def test_jobs_queued_before_a_failed_bind_fail_with_its_reason() -> None:
    worker = _SlowFailingWorker()
    future = worker.submit(lambda: 1)
    abandoned = threading.Event()
    worker.post(lambda: None, abandon=abandoned.set)
    worker.release.set()
    with pytest.raises(DeviceUnavailable, match="device cpu is unavailable: driver exploded"):
        future.result(timeout=10)
    assert abandoned.wait(10)
    worker.thread.join(10)
    assert worker.failure == "device cpu is unavailable: driver exploded"
    # Later jobs fail at once, with the same reason; post raises, submit returns a failed future.
    with pytest.raises(DeviceUnavailable, match="driver exploded"):
        worker.post(lambda: None)
    with pytest.raises(DeviceUnavailable) as caught:
        worker.submit(lambda: 2).result(timeout=1)
    assert isinstance(caught.value, WorkerClosed)
    assert isinstance(caught.value, LoadError)
    assert caught.value.reason == "device_unavailable"


def test_a_device_torch_does_not_know_fails_the_bind() -> None:
    worker = DeviceWorker("nonsense:3")
    with pytest.raises(DeviceUnavailable, match="nonsense"):
        worker.submit(lambda: 1).result(timeout=10)


def test_closing_still_cancels_queued_jobs() -> None:
    worker = DeviceWorker("cpu")
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    worker.post(hold)
    assert started.wait(10)
    queued = worker.submit(lambda: 1)
    closer = threading.Thread(target=worker.close)
    closer.start()
    release.set()
    closer.join(10)
    assert queued.cancelled()
    assert worker.failure is None
    with pytest.raises(WorkerClosed):
        worker.post(lambda: None)


@needs_cpu_torch
async def test_engine_on_cuda_with_cpu_torch_fails_load_fast_and_clearly(tiny_model: Path) -> None:
    engine = Engine(["cuda:0"])
    try:
        spec = LoadSpec("tiny", ModelSource("local", str(tiny_model)), device="cuda:0")
        with pytest.raises(LoadError) as caught:
            await asyncio.wait_for(engine.load(spec), timeout=10)
        assert caught.value.reason == "device_unavailable"
        assert "CPU-only build" in str(caught.value)
        with pytest.raises(LoadError, match="CPU-only build"):
            await asyncio.wait_for(engine.memory("cuda:0"), timeout=10)
    finally:
        engine.close()


@needs_cpu_torch
async def test_lifecycle_reports_the_failed_load_with_its_reason(tiny_model: Path) -> None:
    config = NeuronConfig(default_models=[], model_roots=[tiny_model.parent], devices=DevicesConfig(use="cpu"))
    hardware = Hardware(config.devices)
    hardware.devices = [Device(0, "cuda", "a GPU this torch cannot drive", 80_000)]  # the host's NVML view
    engine = Engine(["cuda:0"])
    lifecycle = Lifecycle(config, hardware, engine)
    try:
        slot = lifecycle.request_load(ModelConfig(model_id="tiny", source=str(tiny_model)))
        assert slot.task is not None
        await asyncio.wait_for(slot.task, timeout=10)
        assert slot.status == "failed"
        assert slot.error is not None
        assert slot.error.reason == "device_unavailable"
        assert "CPU-only build" in (slot.error.message or "")
    finally:
        engine.close()


def _openmp_threads() -> int:
    """This thread's OpenMP thread count, from the libgomp torch loaded (what oneDNN and MKL read)."""
    libraries = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    if not libraries:
        pytest.skip("torch here does not use libgomp")
    return int(ctypes.CDLL(sorted(libraries)[0]).omp_get_max_threads())


def test_the_worker_thread_uses_the_process_thread_count() -> None:
    """OpenMP's count is per thread; a worker must not start at one thread per core behind the neuron's back."""
    previous = torch.get_num_threads()
    chosen = (os.cpu_count() or 1) + 1  # not what a new thread would start with (one per core)
    torch.set_num_threads(chosen)
    worker = DeviceWorker("cpu")
    try:
        assert worker.submit(_openmp_threads).result(timeout=30) == chosen
    finally:
        worker.close()
        torch.set_num_threads(previous)
