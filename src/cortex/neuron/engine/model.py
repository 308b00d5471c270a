"""`LoadedModel`: one model served by its scheduler on a device worker (the neuron's handle on it).

Prompt rendering and parsing (chat template, tool calls, reasoning) are pure Python and run wherever
the caller calls them; generation goes through the model's scheduler (scheduler.py), whose steps run
on the device worker. The worker-side hooks (`_pack_linears`, `_warm_up`, `_capture_graphs`,
`_release`) are called by `Engine` (engine.py) on that worker during load and unload.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

import torch

from cortex.core.logs import log_event

from .attention import KVPool
from .blocks import BlockManager
from .chat import ChatRenderer
from .compile import CompileStats, compile_cpu_steps, compile_cuda_layers
from .cpu_linear import PackStats, pack_linears
from .cuda_graphs import GraphStats, capture_decode_graphs
from .loader import LoadedWeights
from .memory import KVBudget, cuda_allocated, is_cuda, kv_pool_blocks, kv_pool_bytes, release_memory
from .reasoning import ReasoningParser, prompt_opens_thinking, template_thinks
from .runner import ModelRunner, kv_shape
from .scheduler import MAX_RUNNING, Scheduler, SchedulerOptions
from .tools import ToolCallParser
from .types import EngineError, Finished, GenerationEvent, GenerationRequest, ModelInfo
from .worker import DeviceWorker

log = logging.getLogger(__name__)

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
        self.pack_stats = PackStats(reason="not packed")
        self.compile_stats = CompileStats(reason="not compiled")

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
            "cpu_onednn": self.pack_stats.as_dict(),
            "compile": self.compile_stats.as_dict(),
        }

    @property
    def weight_bytes(self) -> int:
        """The weights as held: as loaded (`info.memory_bytes`) plus packed copies kept beside shared
        weights (cpu_linear.py). What an unload frees on CPU, and what the engine counts as allocated there."""
        return self.info.memory_bytes + self.pack_stats.extra_bytes

    @property
    def memory_bytes(self) -> int:
        """All the device memory this model holds: its weights (`weight_bytes`) + KV pool (on CPU: its
        committed blocks) + graphs.

        `/models` reports it as `vram_used_mb` and the neuron's CPU budget counts it, since the gateway
        places and evicts models by it; `info.memory_bytes` stays the weights as loaded.
        """
        if self._unloaded:
            return 0
        kv = self._kv_pool.committed_bytes if self._kv_pool is not None else 0
        return self.weight_bytes + kv + self.graph_stats.memory_bytes

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

    def _pack_linears(self, enabled: bool) -> None:
        """Worker thread, before warm-up: CPU float32 projections onto oneDNN's packed weights (cpu_linear.py)."""
        runner = self._scheduler.runner
        if runner is not None and runner.module is not None:
            self.pack_stats = pack_linears(runner.module, runner.device, enabled)

    def _compile(self, cpu: bool, cuda: bool) -> None:
        """Worker thread, after warm-up and before graph capture: compile the model's steps (compile.py)."""
        runner = self._scheduler.runner
        if runner is None:
            return
        if runner.device.type == "cuda":
            self.compile_stats = compile_cuda_layers(runner, enabled=cuda, model_id=self.info.model_id)
        else:
            self.compile_stats = compile_cpu_steps(
                runner, self.pack_stats.table, enabled=cpu, model_id=self.info.model_id
            )

    def _capture_graphs(self, enabled: bool, max_active: int | None) -> None:
        """Worker thread, after warm-up: decode graphs for every batch the scheduler may run (CUDA only)."""
        runner, blocks = self._scheduler.runner, self._scheduler.blocks
        if runner is None:
            return
        max_batch = min(max_active or MAX_RUNNING, MAX_RUNNING, blocks.usable_blocks)
        max_blocks = blocks.blocks_for(self.info.context_length)

        def capture() -> GraphStats:
            return capture_decode_graphs(
                runner, max_batch=max_batch, max_blocks=max_blocks, enabled=enabled, model_id=self.info.model_id
            )

        self.graph_stats = capture()
        if self.graph_stats.failed and runner.compiled is not None:
            failed = self.graph_stats.reason or ""
            # Graphs are worth more than fusion (4-7x against eager on the H200): capture over the eager layers.
            runner.compiled.undo()
            runner.compiled = None
            self.compile_stats = CompileStats(
                scope=self.compile_stats.scope, reason=f"undone: graphs could not be captured over it ({failed})"[:300]
            )
            log_event(log, "model.compile.undone", logging.WARNING, model=self.info.model_id, reason=failed[:300])
            self.graph_stats = capture()

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
        return self.weight_bytes


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


def _warm_up_token(tokenizer: Any) -> int:
    for token in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(token, int):
            return token
    return 0
