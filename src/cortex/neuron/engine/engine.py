"""The engine's front: `Engine` (device workers, load/unload, memory) and `LoadedModel` (one served model).

Every method here is called on the asyncio loop and does no tensor work itself: torch runs only on
the device worker threads, and results come back through futures or per-request queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from .attention import KVPool
from .blocks import BlockManager
from .chat import ChatRenderer
from .cuda_graphs import GraphStats, capture_decode_graphs
from .loader import LoadedWeights, classify_load_failure, describe, eos_token_ids, load_weights
from .memory import (
    KVBudget,
    cuda_allocated,
    device_memory,
    is_cuda,
    kv_pool_blocks,
    kv_pool_bytes,
    module_bytes,
    release_memory,
)
from .reasoning import ReasoningParser, prompt_opens_thinking, template_thinks
from .runner import ModelRunner, kv_shape
from .scheduler import MAX_RUNNING, Scheduler, SchedulerOptions
from .tools import ToolCallParser
from .types import (
    EngineError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    LoadError,
    LoadSpec,
    ModelInfo,
    ModelSource,
)
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
SEQUENCE_CAPACITY_TOKENS = 4096  # sequence_capacity assumes sequences of up to this many tokens
PROMPT_TAIL_TOKENS = 8  # enough of the prompt's end to see whether it opened a <think> block


class LoadedModel:
    """A model served by one scheduler on one device worker."""

    def __init__(
        self, weights: LoadedWeights, worker: DeviceWorker, options: SchedulerOptions, kv_budget: KVBudget
    ) -> None:
        self.info: ModelInfo = weights.info
        self._worker = worker
        self._tokenizer: Any = weights.tokenizer
        self._renderer = ChatRenderer(weights.tokenizer)
        self._module_ref = weakref.ref(weights.module)
        shape = kv_shape(weights.module)
        device = torch.device(weights.info.device)
        pool_bytes = kv_pool_bytes(weights.info.device, kv_budget)
        blocks = kv_pool_blocks(pool_bytes, shape.bytes_per_token, weights.info.context_length, kv_budget)
        pool = KVPool(shape.layers, blocks, kv_budget.block_size, shape.kv_heads, shape.head_dim, shape.dtype, device)
        self._kv_bytes = pool.bytes
        self._kv_pool: KVPool | None = pool
        self._weights_bytes = weights.info.memory_bytes
        self._scheduler = Scheduler(
            worker,
            ModelRunner(weights.module, weights.info.device, pool),
            BlockManager(blocks, kv_budget.block_size),
            weights.tokenizer,
            weights.eos_ids,
            weights.info.context_length,
            options,
        )
        self._unloaded = False
        self._sampling_defaults = generation_defaults(weights.module)
        self.graph_stats = GraphStats(reason="not captured")

    # Prompt side: pure Python, no torch; callers may run long renders off the loop (a tokenizer thread).

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        self._check_loaded()
        return self._renderer.render(messages, tools, add_generation_prompt, **template_kwargs)

    def encode(self, text: str) -> list[int]:
        """A raw prompt (text completions): tokenised as the model expects, BOS included where it wants one."""
        self._check_loaded()
        return list(self._tokenizer.encode(text))

    def count_chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        return len(self.render_chat(messages, tools))

    def sampling_defaults(self) -> dict[str, float]:
        """Defaults (generation_config) for what a request leaves unset; greedy if the model does not sample."""
        return dict(self._sampling_defaults)

    def tool_parser(self) -> ToolCallParser:
        return ToolCallParser(self.info.tool_call_format)

    def reasoning_parser(self, prompt_ids: list[int] | None = None) -> ReasoningParser | None:
        """A `<think>` splitter for thinking templates (None otherwise); pass the prompt to see if it opened one."""
        if not template_thinks(getattr(self._tokenizer, "chat_template", None)):
            return None
        tail = self._tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:]) if prompt_ids else ""
        return ReasoningParser(start_in_reasoning=prompt_opens_thinking(tail))

    # Generation.

    def validate(self, request: GenerationRequest) -> int:
        """Raise EngineError (bad request) or DeviceFault (poisoned model) now, before any streaming starts.
        Returns the tokens it may generate: give it to `generate` so the request is not validated twice."""
        return self._scheduler.validate(request)

    async def generate(self, request: GenerationRequest, budget: int | None = None) -> AsyncIterator[GenerationEvent]:
        """TextDelta events, then exactly one Finished. Closing the iterator early cancels the sequence.
        `budget`: what `validate` returned for this request (or for one differing only in its seed)."""
        sequence = self._scheduler.open(request, asyncio.get_running_loop(), budget)
        try:
            while True:
                delivery = await sequence.channel.get()
                if isinstance(delivery, BaseException):
                    raise delivery
                for event in delivery:
                    yield event
                    if isinstance(event, Finished):
                        return
        finally:
            sequence.cancelled = True  # no-op once finished; otherwise the worker drops it next step

    def inject_fault(self, count: int = 1) -> None:
        """Test hook: the next `count` forwards raise DeviceFault, as a device fault would."""
        self._scheduler.inject_fault(count)

    def kv_stats(self) -> dict[str, Any]:
        """The KV pool's capacity and use (for /models): blocks of `block_size` tokens; cached = free but reusable."""
        blocks = self._scheduler.blocks
        return {
            "block_size": blocks.block_size,
            "blocks_total": blocks.usable_blocks,
            "blocks_used": blocks.used_blocks,
            "blocks_cached": blocks.cached_blocks,
            "tokens_capacity": blocks.usable_blocks * blocks.block_size,
            "bytes": self._kv_bytes,
            "bytes_committed": self._kv_pool.committed_bytes if self._kv_pool is not None else 0,
            "prefix_hit_tokens": blocks.hit_tokens,
            "prefix_lookup_tokens": blocks.lookup_tokens,
            "preemptions": self._scheduler.preemptions,
            "cuda_graphs": self.graph_stats.as_dict(),
        }

    @property
    def memory_bytes(self) -> int:
        """All the device memory this model holds: weights + KV pool (on CPU: its committed blocks) + graphs.

        `/models` reports it as `vram_used_mb` and the neuron's CPU budget counts it, since the gateway
        places and evicts models by it; `info.memory_bytes` stays the weights alone.
        """
        if self._unloaded:
            return 0
        kv = self._kv_pool.committed_bytes if self._kv_pool is not None else 0
        return self._weights_bytes + kv + self.graph_stats.memory_bytes

    @property
    def sequence_capacity(self) -> int:
        """How many sequences of up to SEQUENCE_CAPACITY_TOKENS (or the context) the KV pool holds at once."""
        blocks = self._scheduler.blocks
        per_sequence = blocks.blocks_for(min(self.info.context_length, SEQUENCE_CAPACITY_TOKENS))
        return max(1, blocks.usable_blocks // per_sequence)

    @property
    def in_flight(self) -> int:
        return self._scheduler.in_flight

    @property
    def queue_depth(self) -> int:
        return self._scheduler.queue_depth

    @property
    def tok_s_decode(self) -> float:
        return self._scheduler.rate.tokens_per_second()

    @property
    def poisoned(self) -> bool:
        return self._scheduler.poisoned

    @property
    def loaded(self) -> bool:
        return not self._unloaded

    @property
    def module_alive(self) -> bool:
        """False once unload has really freed the weights (no reference to the nn.Module survives)."""
        return self._module_ref() is not None

    def _warm_up(self) -> None:
        runner = self._scheduler.runner
        if runner is not None:
            runner.warm_up(_warm_up_token(self._tokenizer))

    def _capture_graphs(self, enabled: bool, max_active: int | None) -> None:
        """Worker thread, after warm-up: decode graphs for every batch the scheduler may run (CUDA only)."""
        runner, blocks = self._scheduler.runner, self._scheduler.blocks
        if runner is None:
            return
        max_batch = min(max_active or MAX_RUNNING, MAX_RUNNING, blocks.usable_blocks)
        max_blocks = blocks.blocks_for(self.info.context_length)
        self.graph_stats = capture_decode_graphs(
            runner, max_batch=max_batch, max_blocks=max_blocks, enabled=enabled, model_id=self.info.model_id
        )

    def _check_loaded(self) -> None:
        if self._unloaded:
            raise EngineError("model is unloaded")

    def _release(self) -> int:
        """Worker thread: end all sequences, drop the weights, free memory; bytes freed (measured)."""
        if self._unloaded:
            return 0  # a second unload raced the first
        before = cuda_allocated(self.info.device) if is_cuda(self.info.device) else 0
        self._unloaded = True
        self._kv_pool = None
        self._scheduler.close()
        release_memory(self.info.device)
        module = self._module_ref()
        if module is not None:  # its tensors were freed (runner.release), but say who keeps the object
            holders = ", ".join(sorted({type(r).__name__ for r in gc.get_referrers(module)})) or "-"
            log.warning("model %s: module object still referenced after unload (by %s)", self.info.model_id, holders)
            del module
        if is_cuda(self.info.device):
            return before - cuda_allocated(self.info.device)
        return self.info.memory_bytes


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
    ) -> None:
        if not devices:
            raise ValueError("an engine needs at least one device")
        self._workers = {name: DeviceWorker(name) for name in dict.fromkeys(normalise_device(d) for d in devices)}
        self._models: dict[str, list[LoadedModel]] = {name: [] for name in self._workers}
        self._max_active = max_active_sequences
        self._step_tokens = step_tokens
        self._kv_budget = kv_budget or KVBudget()
        self._cuda_graphs = cuda_graphs  # decode from captured CUDA graphs on CUDA devices (cuda_graphs.py)

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
        return sum(m.info.memory_bytes for m in self._models.get(device, []))

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
            report(0.95, "warming up")
            model._warm_up()
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


def generation_defaults(module: Any) -> dict[str, float]:
    config = getattr(module, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return {"temperature": 0.0}
    defaults = {"temperature": float(getattr(config, "temperature", None) or 1.0)}
    if getattr(config, "top_p", None) is not None:
        defaults["top_p"] = float(config.top_p)
    if getattr(config, "top_k", None):
        defaults["top_k"] = int(config.top_k)
    return defaults


def normalise_device(device: str) -> str:
    name = device.strip().lower()
    return "cuda:0" if name == "cuda" else name


def _warm_up_token(tokenizer: Any) -> int:
    for token in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(token, int):
            return token
    return 0


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
