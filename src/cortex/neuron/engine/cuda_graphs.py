"""Decode steps replayed from captured CUDA graphs: one graph per (batch size, block-table width) bucket.

An eager decode step of a large model on a GPU is launch-bound: hundreds of small kernels, each
issued from Python, take far longer than the GPU needs to stream the weights once. A CUDA graph
records the step's kernels once, at load, and replays them with one launch.

A graph replays fixed shapes at fixed addresses, so a decode step's inputs live in static buffers
sized for the largest bucket: `input_ids`/`positions`/`slot_mapping`/`context_lens` [B] and
`block_tables` [B, W] (one contiguous buffer per width W). A step of `n` sequences whose longest
block table has `w` blocks runs the graph of the smallest captured (B >= n, W >= w): its inputs
are copied into the buffers and padded. Padding rows are harmless by construction: each writes its
key/value into slot 0 of the reserved padding block 0 (which no sequence owns), attends only to
that slot (`context_lens = 1`), and its logits are dropped. Padding columns of a block table point
at block 0 and are masked out by `context_lens`. Steps with a prefill chunk, or larger than every
bucket, run eagerly.

Widths are bucketed as well as batch sizes because the paged attention gathers `W` blocks per row:
a graph captured only at the model's full context would make every short decode pay for it. Pairs
whose attention temporaries exceed `memory_budget` are left to the eager path. All graphs share one
memory pool, captured largest first, so the pool is as large as the largest graph's temporaries.

Capture runs once, on the device worker, after the model's warm-up; it needs the KV pool never to be
reallocated afterwards (its addresses are baked into the graphs). CPU models never come here. The
replay machinery (buckets, padding, static buffers) is independent of the graph itself: recording
and replaying a step is a backend's job (`graph_backends.py`), so a test can swap in one that runs
the same forward eagerly over the same buffers (`EagerReplay`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cortex.core.logs import log_event

from .attention import AttentionContext
from .graph_backends import CudaGraphBackend, GraphBackend
from .runner import ModelRunner, StepBatch

log = logging.getLogger(__name__)

PAD_SLOT = 0  # slot 0 of the reserved padding block 0
MIN_WIDTH_TOKENS = 256  # the narrowest block-table bucket, in tokens
FINE_WIDTH_TOKENS = 2048  # up to here widths double (chat-sized contexts pay for at most 2x their length)
WIDTH_GROWTH = 4  # beyond it each width bucket is this many times the previous one
MAX_GRAPH_BATCH = 256
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # attention temporaries one captured step may need


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, … up to `max_batch` (always included): padding costs a decode step little, graphs cost memory."""
    if max_batch < 1:
        return []
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return sizes


def width_buckets(max_blocks: int, block_size: int) -> list[int]:
    """Block-table widths (in blocks): from ~MIN_WIDTH_TOKENS, doubling up to FINE_WIDTH_TOKENS, then growing
    WIDTH_GROWTH-fold, ending at `max_blocks`. A decode step gathers its bucket's whole width of keys and
    values per layer, so a 300-token context in a 1,024-token bucket moved 3x the memory it needed."""
    if max_blocks < 1:
        return []
    width = min(max_blocks, max(1, -(-MIN_WIDTH_TOKENS // block_size)))
    widths = []
    while width < max_blocks:
        widths.append(width)
        width *= 2 if width * block_size < FINE_WIDTH_TOKENS else WIDTH_GROWTH
    widths.append(max_blocks)
    return widths


def bucket_for(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `value`, or None if none does (the caller runs eagerly)."""
    return next((b for b in buckets if b >= value), None)


def attention_bytes(batch: int, width: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The gathered keys and values one layer's paged decode attention materialises for a (batch, width) step."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * width * block_size * kv_heads * head_dim * element


@dataclass
class GraphStats:
    """What capture did, for the load log and /models."""

    enabled: bool = False
    reason: str | None = None  # why graphs are off, when they are
    failed: bool = False  # capture was tried and failed (not reported: the reason says it)
    capture_s: float = 0.0
    graphs: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    widths_tokens: list[int] = field(default_factory=list)
    memory_bytes: int = 0
    replays: int = 0
    mixed_replays: int = 0  # of which steps that also had prefill chunks (run eagerly beside the graph)
    eager_decodes: int = 0  # decode-only steps no graph covered

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "reason": self.reason,
            "capture_s": round(self.capture_s, 3),
            "graphs": self.graphs,
            "batch_sizes": self.batch_sizes,
            "widths_tokens": self.widths_tokens,
            "memory_mb": round(self.memory_bytes / 2**20),
            "replays": self.replays,
            "mixed_replays": self.mixed_replays,
            "eager_decodes": self.eager_decodes,
        }


@dataclass
class _Captured:
    replay: Callable[[], None]
    logits: torch.Tensor  # [batch, vocab], static


class DecodeGraphs:
    """Static decode buffers and one captured step per (batch, width) bucket of a model's runner."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks: int, backend: GraphBackend) -> None:
        assert runner.kv is not None
        self.runner = runner
        self.kv = runner.kv
        self.backend = backend
        self.batches = batch_buckets(min(max_batch, MAX_GRAPH_BATCH))
        self.widths = width_buckets(max_blocks, self.kv.block_size)
        self.stats = GraphStats(enabled=True)
        self._inside = False  # a captured (or eagerly replayed) step is running: its forward must not replay
        device = runner.device
        b = self.batches[-1]
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), PAD_SLOT, dtype=torch.long, device=device)
        # One contiguous [B, W] table per width, so every bucket's table is a contiguous row slice.
        self.block_tables = {w: torch.zeros((b, w), dtype=torch.long, device=device) for w in self.widths}
        self.context_lens = torch.ones(b, dtype=torch.long, device=device)
        self.keep = torch.arange(b, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], _Captured] = {}

    def capture(self, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> GraphStats:
        """Capture every (batch, width) pair within `memory_budget`, the largest first (they share one pool)."""
        kv = self.kv
        dtype = kv.storage.dtype
        pairs = [
            (b, w)
            for b in self.batches
            for w in self.widths
            if attention_bytes(b, w, kv.block_size, kv.kv_heads, kv.head_dim, dtype) <= memory_budget
        ]
        pairs.sort(key=lambda pair: pair[0] * pair[1], reverse=True)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                for b, w in pairs:
                    try:
                        replay, logits = self.backend.capture(lambda b=b, w=w: self._step(b, w))
                    except torch.OutOfMemoryError:  # this pair does not fit next to the KV pool: it runs eagerly
                        log.warning("no memory to capture the decode graph for batch %d, width %d blocks", b, w)
                        continue
                    self._graphs[(b, w)] = _Captured(replay, logits)
        finally:
            self._reset_buffers()
            self.backend.captured()
        self.stats.capture_s = time.perf_counter() - started
        self.stats.graphs = len(self._graphs)
        self.stats.batch_sizes = sorted({b for b, _ in self._graphs})
        self.stats.widths_tokens = sorted({w * kv.block_size for _, w in self._graphs})
        return self.stats

    def replay(self, batch: StepBatch) -> torch.Tensor | None:
        """Logits [n, vocab] of a decode-only step from its graph (a view, valid until the next replay), or None."""
        if self._inside:
            return None
        context = batch.context
        n = batch.input_ids.shape[1]
        if context.prefills or context.num_decode != n or context.block_tables is None or batch.keep.shape[0] != n:
            return None
        width = context.block_tables.shape[1]
        b, w = bucket_for(n, self.batches), bucket_for(width, self.widths)
        captured = self._graphs.get((b, w)) if b is not None and w is not None else None
        if captured is None:
            self.stats.eager_decodes += 1
            return None
        self._load(batch, n, width, b, w)
        captured.replay()
        self.stats.replays += 1
        return captured.logits[:n]

    def forward_mixed(self, batch: StepBatch, eager: Callable[[StepBatch], torch.Tensor]) -> torch.Tensor | None:
        """A step with decode rows AND prefill chunks: decode rows from their graph, the chunks by `eager`.

        Without this, any step with a new prompt in it ran all its decoders eagerly, and with streams
        arriving at random most steps do. Two launches instead of one, the same kernels for the chunks.
        The decode rows come first in the packed batch and in `keep` (the scheduler's layout), so the
        logits are [decode rows' logits; the sampling chunks' logits]. None: no graph covers the decode
        part (the caller runs the whole step eagerly).
        """
        context = batch.context
        n = context.num_decode
        if self._inside or not n or not context.prefills or batch.keep.shape[0] < n:
            return None
        decode = StepBatch(
            batch.input_ids[:, :n],
            batch.positions[:, :n],
            batch.keep[:n],
            AttentionContext(
                context.kv,
                context.slot_mapping[:n],
                num_decode=n,
                block_tables=context.block_tables,
                context_lens=context.context_lens,
            ),
        )
        logits = self.replay(decode)
        if logits is None:
            return None
        self.stats.mixed_replays += 1
        tokens = batch.input_ids.shape[1]
        sampling = batch.keep.shape[0] - n  # chunks that end their prompt and sample
        chunks = [dataclasses.replace(chunk, q_start=chunk.q_start - n) for chunk in context.prefills]
        prefill = StepBatch(
            batch.input_ids[:, n:],
            batch.positions[:, n:],
            batch.keep[n:] - n if sampling else batch.keep.new_full((1,), tokens - n - 1),
            AttentionContext(context.kv, context.slot_mapping[n:], prefills=chunks),
        )
        chunk_logits = eager(prefill)
        return torch.cat([logits, chunk_logits]) if sampling else logits

    def _load(self, batch: StepBatch, n: int, width: int, b: int, w: int) -> None:
        """Copy a step's inputs into the static buffers; rows n..b and columns width..w are padding."""
        context = batch.context
        assert context.block_tables is not None and context.context_lens is not None
        self.input_ids[:n].copy_(batch.input_ids[0], non_blocking=True)
        self.positions[:n].copy_(batch.positions[0], non_blocking=True)
        self.slot_mapping[:n].copy_(context.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(context.context_lens, non_blocking=True)
        tables = self.block_tables[w]
        tables[:n, :width].copy_(context.block_tables, non_blocking=True)
        if width < w:
            tables[:n, width:].zero_()
        if n < b:
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slot_mapping[n:b].fill_(PAD_SLOT)
            self.context_lens[n:b].fill_(1)
            tables[n:b].zero_()

    def _step(self, b: int, w: int) -> torch.Tensor:
        """The decode forward over the first b rows and w columns of the static buffers: what gets captured."""
        context = AttentionContext(
            self.kv,
            self.slot_mapping[:b],
            num_decode=b,
            block_tables=self.block_tables[w][:b],
            context_lens=self.context_lens[:b],
        )
        batch = StepBatch(self.input_ids[:b][None], self.positions[:b][None], self.keep[:b], context)
        self._inside = True
        try:
            return self.runner.forward(batch)
        finally:
            self._inside = False

    def release(self) -> None:
        """Unload: drop every graph, static buffer and the pool, and the references to the runner and KV pool.

        A captured graph pins its private memory pool, and its replay closure (on CPU, `EagerReplay`)
        pins the runner and through it the model; all of it must go for the allocator to return to its
        baseline after an unload.
        """
        self._graphs.clear()
        self.backend.release()
        empty = torch.empty(0, dtype=torch.long)
        self.input_ids = self.positions = self.slot_mapping = self.context_lens = self.keep = empty
        self.block_tables = {}
        self.runner = None  # type: ignore[assignment]
        self.kv = None  # type: ignore[assignment]

    def _reset_buffers(self) -> None:
        """Back to all-padding, and the padding block back to zeros (capture wrote keys/values into it)."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(PAD_SLOT)
        self.context_lens.fill_(1)
        for tables in self.block_tables.values():
            tables.zero_()
        self.kv.storage[:, :, 0].zero_()


def capture_decode_graphs(
    runner: ModelRunner,
    *,
    max_batch: int,
    max_blocks: int,
    enabled: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    model_id: str = "-",
) -> GraphStats:
    """At load, on the device worker: capture the runner's decode graphs (CUDA only) and attach them.

    Returns what happened; graphs stay off (stats.reason says why) on CPU, when disabled by config,
    or if capture fails, in which case the model serves eagerly rather than failing its load.
    """
    device = runner.device
    if not enabled:
        return GraphStats(reason="disabled by config ([engine] cuda_graphs = false)")
    if device.type != "cuda":
        return GraphStats(reason="not a CUDA device")
    if max_batch < 1 or max_blocks < 1:
        return GraphStats(reason="nothing to capture")
    before = torch.cuda.memory_reserved(device)
    graphs = DecodeGraphs(runner, max_batch, max_blocks, CudaGraphBackend(device))
    try:
        stats = graphs.capture(memory_budget)
    except Exception as exc:  # a model whose forward cannot be captured still serves, eagerly
        log.warning("CUDA graph capture failed; decoding eagerly", exc_info=exc)
        graphs.release()  # the traceback still pins `graphs`: empty it so the pool really goes
        del graphs
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        failed = GraphStats(reason=f"capture failed: {type(exc).__name__}: {exc}", failed=True)
        log_event(log, "model.cuda_graphs.failed", logging.WARNING, model=model_id, reason=failed.reason)
        return failed
    torch.cuda.synchronize(device)
    stats.memory_bytes = max(0, torch.cuda.memory_reserved(device) - before)
    runner.graphs = graphs
    log_event(
        log,
        "model.cuda_graphs",
        model=model_id,
        capture_s=round(stats.capture_s, 3),
        graphs=stats.graphs,
        batch_sizes=",".join(map(str, stats.batch_sizes)),
        widths_tokens=",".join(map(str, stats.widths_tokens)),
        memory_mb=round(stats.memory_bytes / 2**20),
    )
    return stats
