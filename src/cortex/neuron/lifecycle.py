"""Which models this neuron holds, and their lifecycle: load, unload, poison, recover.

States: loading → loaded → unloading (→ gone); loaded → poisoned → recovering → loaded; a load
that fails leaves a `failed` entry with its reason until the next load attempt. Loads are
single-flight per model id: a second request for a loading model joins the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from cortex.core.errors import ApiError, model_not_found
from cortex.core.logs import log_event, request_id_var
from cortex.core.neuron_api import (
    KvStats,
    LoadProgress,
    ModelEntry,
    ModelError,
    ModelLimit,
    ModelStatus,
    Unloaded,
)
from cortex.neuron.admission import Admission
from cortex.neuron.config import ModelConfig, NeuronConfig
from cortex.neuron.cuda_devices import Device
from cortex.neuron.engine import Engine, LoadedModel
from cortex.neuron.engine.types import LoadError, LoadSpec
from cortex.neuron.hardware import Hardware
from cortex.neuron.sources import resolve_source

log = logging.getLogger("cortex.neuron.lifecycle")

RECOVERY_RETRY_AFTER_S = 10.0
DRAIN_TIMEOUT_S = 30.0


@dataclass
class ModelSlot:
    config: ModelConfig
    admission: Admission
    status: ModelStatus = ModelStatus.LOADING
    device: Device | None = None
    loaded: LoadedModel | None = None
    error: ModelError | None = None
    progress: LoadProgress | None = None
    task: asyncio.Task[None] | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    load_seconds: float | None = None
    faults: int = 0

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def describe(self) -> ModelEntry:
        info = self.loaded.info if self.loaded else None
        shows_progress = self.status in (ModelStatus.LOADING, ModelStatus.RECOVERING)
        return ModelEntry(
            id=self.model_id,
            status=self.status,
            harness=self.config.harness,
            devices=[self.device.index] if self.device else [],
            device_kind=self.device.kind if self.device else None,
            vram_used_mb=round(held_bytes(self.loaded) / 2**20) if self.loaded else 0,
            limit=ModelLimit(context=info.context_length if info else None),
            tool_call=bool(info and info.tool_call_format),
            tool_call_format=info.tool_call_format if info else None,
            architecture=info.architecture if info else None,
            dtype=info.dtype if info else None,
            source=self.config.source,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            load_seconds=self.load_seconds,
            load_progress=self.progress if shows_progress else None,
            error=self.error,
            kv=kv_stats(self.loaded),
        )


def held_bytes(loaded: LoadedModel) -> int:
    """What a loaded model holds on its device: weights + KV pool + CUDA graphs (`LoadedModel.memory_bytes`)."""
    held = getattr(loaded, "memory_bytes", None)
    return held if isinstance(held, int) else loaded.info.memory_bytes


def kv_stats(loaded: LoadedModel | None) -> KvStats | None:
    """The model's paged KV cache figures, when its engine keeps one (`LoadedModel.kv_stats()`)."""
    stats = getattr(loaded, "kv_stats", None) if loaded is not None else None
    if stats is None:
        return None
    figures = stats()
    return None if figures is None else KvStats.model_validate(figures)


class Lifecycle:
    def __init__(self, config: NeuronConfig, hardware: Hardware, engine: Engine) -> None:
        self.config = config
        self.hardware = hardware
        self.engine = engine
        self.slots: dict[str, ModelSlot] = {}

    # --- queries -----------------------------------------------------------------------------

    def describe(self) -> list[ModelEntry]:
        return [slot.describe() for slot in self.slots.values()]

    def cpu_used_mb(self) -> int:
        return sum(
            round(held_bytes(s.loaded) / 2**20)
            for s in self.slots.values()
            if s.loaded is not None and s.device is not None and s.device.kind == "cpu"
        )

    def ready(self, model_id: str) -> tuple[ModelSlot, LoadedModel]:
        """The slot of a model that can serve now, or the error the client should see."""
        slot = self.slots.get(model_id)
        if slot is None or slot.status == ModelStatus.FAILED:
            raise model_not_found(model_id)
        if slot.status in (ModelStatus.POISONED, ModelStatus.RECOVERING):
            raise ApiError(
                503,
                f"Model '{model_id}' hit a device fault and is being reloaded; retry shortly",
                code="model_recovering",
                retry_after=RECOVERY_RETRY_AFTER_S,
            )
        if slot.status != ModelStatus.LOADED or slot.loaded is None:
            raise ApiError(
                503, f"Model '{model_id}' is {slot.status}; retry shortly", code=f"model_{slot.status}", retry_after=5
            )
        return slot, slot.loaded

    # --- load --------------------------------------------------------------------------------

    def request_load(self, model: ModelConfig) -> ModelSlot:
        """Start loading `model` unless it is loading or loaded already (single flight)."""
        existing = self.slots.get(model.model_id)
        if existing is not None and existing.status in (
            ModelStatus.LOADING,
            ModelStatus.LOADED,
            ModelStatus.RECOVERING,
            ModelStatus.POISONED,
        ):
            return existing
        if existing is not None and existing.status == ModelStatus.UNLOADING:
            raise ApiError(409, f"Model '{model.model_id}' is unloading; load it again once it is gone")
        source = resolve_source(model.model_id, model.source, self.config.model_roots, model.revision)
        device = self._pick_device(model)
        limits = self.config.admission.limits_for(model.model_id)
        slot = ModelSlot(config=model, admission=Admission(model.model_id, limits), device=device)
        self.slots[model.model_id] = slot
        spec = self._spec(model, source, device)
        slot.task = asyncio.create_task(self._load(slot, spec), name=f"load:{model.model_id}")
        return slot

    def _spec(self, model: ModelConfig, source: Any, device: Device) -> LoadSpec:
        dtype = None if model.dtype in (None, "auto") else model.dtype
        return LoadSpec(
            model_id=model.model_id,
            source=source,
            dtype=dtype,
            device=device.torch_name,
            context_length=model.context_length,
            cache_dir=self.config.cache_dir,
            gguf_cache_dir=self.config.gguf_cache_dir(),
            allow_pickle=self.config.allow_pickle,
        )

    def _pick_device(self, model: ModelConfig) -> Device:
        devices = self.hardware.devices
        if model.devices:
            by_index = {d.index: d for d in devices}
            missing = [i for i in model.devices if i not in by_index]
            if missing:
                raise ApiError(400, f"devices {missing} do not exist on this neuron", param="devices")
            return by_index[model.devices[0]]
        if len(devices) == 1:
            return devices[0]
        health = {h["index"]: h for h in self.hardware.device_health(self.cpu_used_mb())}
        return max(devices, key=lambda d: health[d.index]["vram_free_mb"])

    async def _load(self, slot: ModelSlot, spec: LoadSpec) -> None:
        started = time.monotonic()
        slot.progress = LoadProgress(fraction=0.0, stage="queued")
        log_event(log, "model.load.start", model=slot.model_id, device=spec.device, source_kind=spec.source.kind)

        def progress(fraction: float, stage: str) -> None:
            slot.progress = LoadProgress(fraction=round(fraction, 3), stage=stage)

        try:
            loaded = await self.engine.load(spec, progress)
            self._check_cpu_budget(slot, loaded)
        except LoadError as exc:
            await self._fail(slot, exc.reason, str(exc))
            return
        except asyncio.CancelledError:
            slot.status = ModelStatus.FAILED
            slot.error = ModelError(reason="cancelled", message="load cancelled at shutdown")
            raise
        except Exception as exc:  # a loader bug must still leave a clear entry, not a dead task
            log.exception("unexpected load failure")
            await self._fail(slot, "error", f"{type(exc).__name__}: {exc}")
            return
        slot.loaded, slot.status, slot.error = loaded, ModelStatus.LOADED, None
        slot.admission.set_capacity(getattr(loaded, "sequence_capacity", None))
        slot.loaded_at = time.time()
        slot.load_seconds = round(time.monotonic() - started, 3)
        log_event(
            log,
            "model.load.done",
            model=slot.model_id,
            seconds=slot.load_seconds,
            memory_mb=round(held_bytes(loaded) / 2**20),
        )

    def _check_cpu_budget(self, slot: ModelSlot, loaded: LoadedModel) -> None:
        if slot.device is None or slot.device.kind != "cpu":
            return
        others = self.cpu_used_mb()
        need = round(held_bytes(loaded) / 2**20)
        budget = slot.device.vram_total_mb
        if others + need > budget:
            slot.loaded = loaded  # so _fail unloads it
            packed = round(loaded.pack_stats.extra_bytes / 2**20)
            hint = f" ({packed} MiB of it a packed copy of a tied head: [engine] cpu_onednn = false)" if packed else ""
            raise LoadError(
                "out_of_memory",
                f"model needs {need} MiB{hint} but only {budget - others} MiB of the {budget} MiB CPU budget is free",
            )

    async def _fail(self, slot: ModelSlot, reason: str, message: str) -> None:
        if slot.loaded is not None:
            loaded, slot.loaded = slot.loaded, None
            await self.engine.unload(loaded)
        slot.status, slot.progress = ModelStatus.FAILED, None
        slot.error = ModelError(reason=reason, message=message)
        log_event(log, "model.load.failed", logging.WARNING, model=slot.model_id, reason=reason, message=message)

    # --- unload ------------------------------------------------------------------------------

    async def unload(self, model_id: str) -> Unloaded:
        slot = self.slots.get(model_id)
        if slot is None:
            raise model_not_found(model_id)
        if slot.status in (ModelStatus.LOADING, ModelStatus.RECOVERING):
            raise ApiError(409, f"Model '{model_id}' is {slot.status}; unload it once that finishes", code="busy")
        if slot.status == ModelStatus.FAILED:
            del self.slots[model_id]
            return Unloaded(model_id=model_id, freed_mb=0)
        slot.status = ModelStatus.UNLOADING
        await self._drain(slot)
        freed = 0
        if slot.loaded is not None:
            loaded, slot.loaded = slot.loaded, None
            freed = await self.engine.unload(loaded)
        self.slots.pop(model_id, None)
        log_event(log, "model.unload", model=model_id, freed_mb=round(freed / 2**20))
        return Unloaded(model_id=model_id, freed_mb=round(freed / 2**20))

    async def _drain(self, slot: ModelSlot) -> None:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await slot.admission.wait_idle()
        except TimeoutError:
            in_flight = slot.admission.in_flight
            log_event(log, "model.drain.timeout", logging.WARNING, model=slot.model_id, in_flight=in_flight)

    # --- faults ------------------------------------------------------------------------------

    def poison(self, slot: ModelSlot, message: str) -> None:
        """Mark the model poisoned and start its single-flight recovery."""
        if slot.status != ModelStatus.LOADED:
            return
        slot.status, slot.faults = ModelStatus.POISONED, slot.faults + 1
        # /models is read by anyone with the token: a reason code and a plain message; the exception stays in the log.
        public = f"a device fault during generation (request {request_id_var.get()}; details in the neuron's log)"
        slot.error = ModelError(reason="device_fault", message=public)
        log_event(log, "model.poisoned", logging.ERROR, model=slot.model_id, message=message)
        slot.task = asyncio.create_task(self._recover(slot), name=f"recover:{slot.model_id}")

    async def _recover(self, slot: ModelSlot) -> None:
        slot.status = ModelStatus.RECOVERING
        slot.progress = LoadProgress(fraction=0.0, stage="unloading")
        try:
            await self._drain(slot)
            if slot.loaded is not None:
                loaded, slot.loaded = slot.loaded, None
                await self.engine.unload(loaded)
            assert slot.device is not None
            source = resolve_source(slot.model_id, slot.config.source, self.config.model_roots, slot.config.revision)
        except Exception as exc:  # recovery must end in a clear state, never a stuck "recovering"
            log.exception("recovery failed")
            await self._fail(slot, "recovery_failed", f"{type(exc).__name__}: {exc}")
            return
        await self._load(slot, self._spec(slot.config, source, slot.device))
        if slot.status == ModelStatus.LOADED:
            log_event(log, "model.recovered", model=slot.model_id)

    # --- maintenance -------------------------------------------------------------------------

    async def defragment(self) -> list[dict[str, Any]]:
        return [await self.engine.defragment(d.torch_name) for d in self.hardware.devices]

    async def close(self) -> None:
        for slot in list(self.slots.values()):
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await slot.task
        self.engine.close()
