"""The engine's front: `Engine` owns the device workers, loads and unloads models, and reports memory.

Each loaded model is a `LoadedModel` (model.py).

Every method here is called on the asyncio loop and does no tensor work itself: torch runs only on
the device worker threads, and results come back through futures or per-request queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from .loader import LoadedWeights, classify_load_failure, describe, eos_token_ids, load_weights
from .memory import KVBudget, cuda_allocated, device_memory, is_cuda, module_bytes, release_memory
from .model import LoadedModel
from .scheduler import SchedulerOptions
from .types import EngineError, LoadError, LoadSpec, ModelSource
from .worker import DeviceWorker

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
# Tokens computed per step (one per decoding sequence + prefill chunks). A step is one forward, so
# its size sets how long running streams wait for their next token while a prompt is prefilled.
# CPU: ~256 tokens of a small model cost about what 8 decode rows do plus one prefill of a typical
# chat prompt, so a new prompt enters in one step and decoders slow by at most about 2x for it.
# CUDA: a 512-token chunk of an 8B model is ~8 TFLOP, about one extra decode step on an H100/H200;
# 2048 would stall every stream for several steps.
CPU_STEP_TOKENS = 256
CUDA_STEP_TOKENS = 512


class Engine:
    """One worker thread per device; loads models onto them and serves them."""

    def __init__(
        self,
        devices: list[str],
        *,
        max_active_sequences: int | None = None,
        step_tokens: int | None = None,
        kv_budget: KVBudget | None = None,
        cuda_graphs: bool = True,
        cpu_onednn: bool = True,
        cpu_compile: bool = False,
        cuda_compile: bool = False,
    ) -> None:
        if not devices:
            raise ValueError("an engine needs at least one device")
        self._workers = {name: DeviceWorker(name) for name in dict.fromkeys(normalise_device(d) for d in devices)}
        self._models: dict[str, list[LoadedModel]] = {name: [] for name in self._workers}
        self._max_active = max_active_sequences
        self._step_tokens = step_tokens
        self._kv_budget = kv_budget or KVBudget()
        self._cuda_graphs = cuda_graphs  # decode from captured CUDA graphs on CUDA devices (cuda_graphs.py)
        self._cpu_onednn = cpu_onednn  # float32 CPU projections on oneDNN-packed weights (cpu_linear.py)
        self._cpu_compile = cpu_compile  # CPU steps through torch.compile (compile.py)
        self._cuda_compile = cuda_compile  # CUDA: decoder layers compiled before graph capture (compile.py)

    @property
    def devices(self) -> list[str]:
        return list(self._workers)

    async def load(self, spec: LoadSpec, progress: Progress | None = None) -> LoadedModel:
        """Load on the device's worker; raises LoadError(reason, message) and nothing else."""
        spec = dataclasses.replace(spec, device=normalise_device(spec.device))
        worker = self._workers.get(spec.device)
        if worker is None:
            raise LoadError("error", f"device {spec.device!r} is not one of this engine's {self.devices}")
        report = _progress_on_loop(asyncio.get_running_loop(), progress)
        return await self._serve(worker, lambda: self._load_job(spec, worker, report))

    async def adopt(
        self,
        model_id: str,
        device: str,
        build: Callable[[], tuple[torch.nn.Module, Any]],
        context_length: int | None = None,
    ) -> LoadedModel:
        """Serve a model that `build()` constructs on the worker thread, e.g. random weights for a benchmark."""
        worker = self._workers.get(normalise_device(device))
        if worker is None:
            raise LoadError("error", f"device {device!r} is not one of this engine's {self.devices}")
        return await self._serve(worker, lambda: self._adopt_job(model_id, worker, build, context_length))

    async def unload(self, model: LoadedModel) -> int:
        """Free the model's memory on its worker; bytes freed, measured (0 if it was already unloaded)."""
        if not model.loaded:
            return 0
        freed = await model._worker.call(model._release)
        models = self._models.get(model.info.device, [])
        if model in models:
            models.remove(model)
        return freed

    async def defragment(self, device: str) -> dict[str, Any]:
        """Garbage-collect and return cached blocks to the driver (or glibc), on the device's thread."""
        name, worker = self._worker(device)
        tracked = self._tracked_bytes(name)

        def job() -> dict[str, Any]:
            before = device_memory(name, tracked)
            release_memory(name)
            return {"device": name, "before": before, "after": device_memory(name, tracked)}

        return await worker.call(job)

    async def memory(self, device: str) -> dict[str, int]:
        """{"allocated_bytes", "reserved_bytes"} from the CUDA allocator, or tensor accounting + RSS on CPU."""
        name, worker = self._worker(device)
        tracked = self._tracked_bytes(name)
        return await worker.call(lambda: device_memory(name, tracked))

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()

    # Internals.

    def _worker(self, device: str) -> tuple[str, DeviceWorker]:
        name = normalise_device(device)
        if name not in self._workers:
            raise EngineError(f"device {device!r} is not one of this engine's {self.devices}")
        return name, self._workers[name]

    def _tracked_bytes(self, device: str) -> int:
        return sum(m.weight_bytes for m in self._models.get(device, []))

    def _options(self, device: str) -> SchedulerOptions:
        step = self._step_tokens or (CUDA_STEP_TOKENS if is_cuda(device) else CPU_STEP_TOKENS)
        return SchedulerOptions(max_active=self._max_active, step_tokens=step)

    async def _serve(self, worker: DeviceWorker, job: Callable[[], LoadedModel]) -> LoadedModel:
        future = worker.submit(job)
        try:
            model = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The caller gave up; a load already running finishes anyway, so free what it produced.
            future.add_done_callback(lambda f: _release_orphan(f, worker))
            raise
        self._models[model.info.device].append(model)
        return model

    def _load_job(self, spec: LoadSpec, worker: DeviceWorker, report: Progress) -> LoadedModel:
        return self._serve_on_worker(spec.model_id, worker, lambda: load_weights(spec, report), report)

    def _adopt_job(
        self,
        model_id: str,
        worker: DeviceWorker,
        build: Callable[[], tuple[torch.nn.Module, Any]],
        context_length: int | None,
    ) -> LoadedModel:
        def weights() -> LoadedWeights:
            device = worker.device
            baseline = cuda_allocated(device) if is_cuda(device) else 0
            module, tokenizer = build()
            module = module.to(device).eval()
            # CUDA: the allocator's delta, but never less than the tensors themselves (a build that
            # allocated before `baseline`, e.g. through a cached block, must not read as 0).
            memory = (
                max(cuda_allocated(device) - baseline, module_bytes(module))
                if is_cuda(device)
                else module_bytes(module)
            )
            source = ModelSource("local", "<in-process>")
            spec = LoadSpec(model_id, source, device=device, context_length=context_length)
            info = describe(spec, module.config, module, tokenizer, memory)
            return LoadedWeights(module, tokenizer, info, eos_token_ids(module.config, module, tokenizer))

        return self._serve_on_worker(model_id, worker, weights, lambda fraction, stage: None)

    def _serve_on_worker(
        self, model_id: str, worker: DeviceWorker, weights: Callable[[], LoadedWeights], report: Progress
    ) -> LoadedModel:
        """Worker thread: get the weights, start a scheduler, warm up. Raises LoadError only."""
        try:
            model = LoadedModel(weights(), worker, self._options(worker.device), self._kv_budget)
            model._pack_linears(self._cpu_onednn)
            report(0.95, "warming up")
            model._warm_up()
            if self._cuda_compile if is_cuda(worker.device) else self._cpu_compile:
                report(0.96, "compiling the model")
            model._compile(self._cpu_compile, self._cuda_compile)
            if is_cuda(worker.device):
                report(0.97, "capturing CUDA graphs")
            model._capture_graphs(self._cuda_graphs, self._max_active)
            report(1.0, "loaded")
            return model
        except LoadError as exc:
            log.warning("load of %s failed: %s", model_id, exc, exc_info=exc)
            failure = LoadError(exc.reason, str(exc))
        except Exception as exc:
            log.warning("load of %s failed", model_id, exc_info=exc)
            failure = classify_load_failure(exc)
        # Out of the except blocks, the failed attempt's frames (and any tensors they held) are unreachable.
        release_memory(worker.device)
        raise failure


def normalise_device(device: str) -> str:
    name = device.strip().lower()
    return "cuda:0" if name == "cuda" else name


def _progress_on_loop(loop: asyncio.AbstractEventLoop, progress: Progress | None) -> Progress:
    """A progress callback the worker may call: it runs the caller's callback on the loop thread."""

    def report(fraction: float, stage: str) -> None:
        if progress is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is watching
            loop.call_soon_threadsafe(progress, fraction, stage)

    return report


def _release_orphan(future: concurrent.futures.Future[LoadedModel], worker: DeviceWorker) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    model = future.result()
    try:
        worker.post(model._release)
    except Exception:
        log.warning("could not release an abandoned load of %s", model.info.model_id)
