"""Compiled decode steps on CPU: the model's decode forward through `torch.compile` (inductor).

A CPU decode step of a small model is not all projections: about a quarter of it is the model code
between them (RMSNorm, rotary embeddings, activations, residual adds, views), dozens of tiny eager ops
per layer at several microseconds of dispatch each. Inductor fuses those into a few generated C++
kernels per layer. What it must not touch is kept opaque, as custom ops:
- the paged attention (`cortex::paged_attention`, attention.py), which reads the step's context at
  run time, so the graph does not depend on the sequences' lengths or blocks;
- the packed projections (`cortex::packed_linear`, cpu_linear.py), which multiply by the oneDNN
  weights the eager path already holds: no second copy of the weights, and the same products (so a
  compiled step's projections round exactly as the eager ones).

Only decode rows run compiled: a decode-only step whole, a mixed step's decode part (the prefill
chunks run eagerly beside it, `split_mixed`). Prefill is large matrix products, where compiling
gains nothing. So every decode row is computed by the same graphs whatever else shares its step.

Compilation happens at load, on the device worker, after the warm-up: a one-row decode (torch
specialises size 1) and a two-row one (whose graph is dynamic in the row count and serves every
larger batch), both on the reserved padding block. It takes a minute or more the first time for a
30-layer model on two cores; inductor's on-disk cache makes the next load of the same architecture
take seconds. `[engine] cpu_compile = true` turns it on (off by default: the first load's wait is the
operator's choice). A model whose forward cannot be compiled still serves, eagerly, and says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cortex.core.logs import log_event

from .attention import AttentionContext
from .cpu_linear import PackedTable, packed_weights
from .runner import ModelRunner, StepBatch, split_mixed

log = logging.getLogger(__name__)

WARM_BATCHES = (1, 2)  # the row counts compiled at load: 1 is its own graph, 2 makes the row count dynamic


@dataclass
class CompileStats:
    """What compiling did, for the load log and /models."""

    compiled: bool = False
    compile_s: float = 0.0
    graphs: int = 0  # graphs the compiler produced at load (a later recompile shows in `recompiles`)
    decodes: int = 0  # steps whose decode rows ran compiled
    recompiles: int = 0  # graphs compiled after load (a shape the warm-up did not cover)
    reason: str | None = None  # why decode steps run eagerly, when they do

    def as_dict(self) -> dict[str, Any]:
        return {
            "compiled": self.compiled,
            "compile_s": round(self.compile_s, 2),
            "graphs": self.graphs,
            "decodes": self.decodes,
            "recompiles": self.recompiles,
            "reason": self.reason,
        }


class CompiledDecode:
    """The runner's module compiled once, run for the decode rows of every step."""

    def __init__(self, runner: ModelRunner, table: PackedTable, stats: CompileStats) -> None:
        assert runner.module is not None
        self._runner = runner
        self._table = table
        self._model = torch.compile(runner.module, dynamic=None, fullgraph=True)
        self.stats = stats

    def forward(self, batch: StepBatch, eager: Callable[[StepBatch], torch.Tensor]) -> torch.Tensor:
        """Logits of the step's kept rows: its decode rows compiled, any prefill chunks by `eager`."""
        context = batch.context
        if not context.num_decode:
            return eager(batch)
        if not context.prefills:
            return self._decode(batch)
        parts = split_mixed(batch)
        if parts is None:
            return eager(batch)
        decode, prefill, sampling = parts
        logits = self._decode(decode)
        chunk_logits = eager(prefill)
        return torch.cat([logits, chunk_logits]) if sampling else logits

    def _decode(self, batch: StepBatch) -> torch.Tensor:
        graphs = _graph_count()
        logits = self._run(batch)
        self.stats.decodes += 1
        self.stats.recompiles += _graph_count() - graphs
        return logits

    def _run(self, batch: StepBatch) -> torch.Tensor:
        with packed_weights(self._table):
            return self._runner.call(self._model, batch)

    def warm_up(self) -> None:
        """Compile: decode steps of 1 and 2 rows on the padding block (zeroed again afterwards)."""
        runner = self._runner
        assert runner.kv is not None
        kv, device = runner.kv, runner.device
        try:
            with torch.inference_mode():
                for rows in WARM_BATCHES:
                    pad = torch.zeros(rows, dtype=torch.long, device=device)
                    context = AttentionContext(
                        kv,
                        pad,  # slot 0 of block 0
                        num_decode=rows,
                        block_tables=pad[:, None],
                        context_lens=torch.ones(rows, dtype=torch.long, device=device),
                        decode_length=1 if rows == 1 else None,
                    )
                    self._run(StepBatch(pad[None], pad[None], torch.arange(rows, device=device), context))
        finally:  # compiled or not, the padding block is zeros again
            kv.storage[:, :, 0].zero_()


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_cpu_decode(
    runner: ModelRunner, table: PackedTable | None, *, enabled: bool, model_id: str = "-"
) -> CompileStats:
    """At load, on the device worker, after warm-up: compile the runner's decode steps (CPU only).

    Returns what happened; decode stays eager (stats.reason says why) when disabled, on a GPU, for a
    model whose projections are not packed, or if compiling fails.
    """
    if not enabled:
        return CompileStats(reason="disabled by config ([engine] cpu_compile = false)")
    if runner.device.type != "cpu":
        return CompileStats(reason="not a CPU device")
    if table is None or not table.entries:
        return CompileStats(reason="the projections are not oneDNN-packed (see cpu_onednn)")
    stats = CompileStats()
    started, before = time.perf_counter(), _graph_count()
    try:
        compiled = CompiledDecode(runner, table, stats)
        compiled.warm_up()
    except Exception as exc:  # a model the compiler cannot take still serves, eagerly
        log.warning("compiling the decode step failed; decoding eagerly", exc_info=exc)
        reason = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        log_event(log, "model.cpu_compile.failed", logging.WARNING, model=model_id, reason=reason)
        return CompileStats(reason=reason)
    stats.compiled = True
    stats.compile_s = time.perf_counter() - started
    stats.graphs = _graph_count() - before
    runner.compiled = compiled
    log_event(log, "model.cpu_compile", model=model_id, compile_s=round(stats.compile_s, 2), graphs=stats.graphs)
    return stats
