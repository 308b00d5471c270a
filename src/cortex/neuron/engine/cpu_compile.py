"""Compiled steps on CPU: the model body through `torch.compile` (inductor), the LM head eagerly.

A CPU decode step of a small model is not all projections: about a quarter of it is the model code
between them (RMSNorm, rotary embeddings, activations, residual adds, views), dozens of tiny eager ops
per layer at several microseconds of dispatch each. Inductor fuses those into a few generated C++
kernels per layer. What it must not touch is kept opaque, as custom ops:
- the paged attention (`cortex::paged_attention`, attention.py), which reads the step's context at
  run time, so the graph does not depend on the sequences' lengths, blocks or prefill chunks;
- the packed projections (`cortex::packed_linear`, cpu_linear.py), which multiply by the oneDNN
  weights the eager path already holds: no second copy of the weights, and the same products (so a
  compiled step's projections round exactly as the eager ones).

Every step runs compiled, in one pass: the decoder stack is the graph, and the LM head multiplies the
rows that sample outside it, so the only size the graph sees vary is the step's token count. At load,
on the device worker, after the warm-up, a one-token and a two-token step on the reserved padding
block compile two graphs (torch specialises size 1; the second is dynamic and serves every larger
step: decode, prefill and mixed alike). The first time this takes a minute or more for a 30-layer
model on two cores; inductor's on-disk cache makes a later process's load take seconds, and another
load of the same architecture in the same process reuses the graphs outright (they read the model's
tensors as inputs). `[engine] cpu_compile = true` turns it on (off by default: the first load's wait
is the operator's choice). A model whose forward cannot be compiled still serves, eagerly, and says why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from cortex.core.logs import log_event

from .attention import AttentionContext, set_context
from .cpu_linear import PackedTable, packed_weights
from .runner import ModelRunner, StepBatch

log = logging.getLogger(__name__)

WARM_BATCHES = (1, 2)  # the row counts compiled at load: 1 is its own graph, 2 makes the row count dynamic


@dataclass
class CompileStats:
    """What compiling did, for the load log and /models."""

    compiled: bool = False
    compile_s: float = 0.0
    graphs: int = 0  # graphs the compiler produced at load (0 when another load's graphs were reused)
    steps: int = 0  # steps run compiled
    recompiles: int = 0  # graphs compiled after load (a shape the warm-up did not cover)
    reason: str | None = None  # why steps run eagerly, when they do

    def as_dict(self) -> dict[str, Any]:
        return {
            "compiled": self.compiled,
            "compile_s": round(self.compile_s, 2),
            "graphs": self.graphs,
            "steps": self.steps,
            "recompiles": self.recompiles,
            "reason": self.reason,
        }


class CompiledForward:
    """The runner's model body (its decoder stack) compiled once, run for every step; the LM head eagerly.

    The head multiplies only the rows that sample (`keep`), one packed product, outside the graph: so
    the graph's only varying size is the step's token count, and one dynamic graph (plus the one-token
    graph torch specialises) serves decode, prefill and mixed steps alike, in one pass each.
    """

    def __init__(self, runner: ModelRunner, table: PackedTable, stats: CompileStats) -> None:
        assert runner.module is not None
        self._table = table
        self._placeholder_mask = runner.placeholder_mask
        self._body = torch.compile(runner.module.get_decoder(), dynamic=None, fullgraph=True)
        self._head = runner.module.get_output_embeddings()
        self._kv = runner.kv
        self._device = runner.device
        self._dynamo_stats = _dynamo_stats()  # the compiler's counters, read before and after each step
        self.stats = stats

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits of the step's kept rows, [K, vocab]."""
        graphs = self._dynamo_stats["unique_graphs"]
        logits = self._run(batch)
        self.stats.steps += 1
        self.stats.recompiles += self._dynamo_stats["unique_graphs"] - graphs
        return logits

    def _run(self, batch: StepBatch) -> torch.Tensor:
        set_context(batch.context)
        try:
            with packed_weights(self._table):
                hidden = self._body(
                    input_ids=batch.input_ids,
                    position_ids=batch.positions,
                    attention_mask=self._placeholder_mask,
                    use_cache=False,
                ).last_hidden_state
        finally:
            set_context(None)
        return self._head(hidden[0].index_select(0, batch.keep))

    def warm_up(self) -> None:
        """Compile: steps of 1 and 2 decode rows on the padding block (zeroed again afterwards)."""
        kv, device = self._kv, self._device
        assert kv is not None
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


def _dynamo_stats() -> Any:
    from torch._dynamo.utils import counters  # torch._dynamo only loads when compiling is on

    return counters["stats"]


def compile_cpu_steps(
    runner: ModelRunner, table: PackedTable | None, *, enabled: bool, model_id: str = "-"
) -> CompileStats:
    """At load, on the device worker, after warm-up: compile the runner's steps (CPU only).

    Returns what happened; steps stay eager (stats.reason says why) when disabled, on a GPU, for a
    model whose projections are not packed, or if compiling fails.
    """
    if not enabled:
        return CompileStats(reason="disabled by config ([engine] cpu_compile = false)")
    if runner.device.type != "cpu":
        return CompileStats(reason="not a CPU device")
    if table is None or not table.entries:
        return CompileStats(reason="the projections are not oneDNN-packed (see cpu_onednn)")
    stats = CompileStats()
    started, before = time.perf_counter(), _dynamo_stats()["unique_graphs"]
    try:
        compiled = CompiledForward(runner, table, stats)
        compiled.warm_up()
    except Exception as exc:  # a model the compiler cannot take still serves, eagerly
        log.warning("compiling the model failed; its steps run eagerly", exc_info=exc)
        reason = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        log_event(log, "model.cpu_compile.failed", logging.WARNING, model=model_id, reason=reason)
        return CompileStats(reason=reason)
    stats.compiled = True
    stats.compile_s = time.perf_counter() - started
    stats.graphs = _dynamo_stats()["unique_graphs"] - before
    runner.compiled = compiled
    log_event(log, "model.cpu_compile", model=model_id, compile_s=round(stats.compile_s, 2), graphs=stats.graphs)
    return stats
