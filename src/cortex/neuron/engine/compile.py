"""Compiled steps: the model's code through `torch.compile` (inductor), on CPU and inside CUDA graphs.

A decode step of a small model on CPU, or any model inside a CUDA graph, is not all projections:
between them runs the model's own module code (RMSNorm, rotary embeddings, activations, residual adds,
views), dozens of tiny ops per layer. On CPU each pays several microseconds of eager dispatch; on a GPU
each is its own kernel, and a captured graph replays them all. Inductor fuses them into a few
generated kernels per layer (C++ on CPU, Triton on CUDA). What it must not touch is kept opaque, as
custom ops:
- the paged attention (`cortex::paged_attention`, attention.py), which reads the step's context at
  run time, so the graph does not depend on the sequences' lengths, blocks or prefill chunks;
- the packed CPU projections (`cortex::packed_linear`, cpu_linear.py), which multiply by the oneDNN
  weights the eager path already holds: no second copy of the weights, and the same products.
Both name what they read by a tensor buffer (the layer's index, the packed weight's handle), a graph
input: an int would make the compiler specialise a graph on each value.

**CPU** (`[engine] cpu_compile`, `compile_cpu_steps`): the whole decoder stack is one graph, and every
step runs through it in one pass; the LM head multiplies the rows that sample outside it, so the only
size the graph sees vary is the step's token count. At load, on the device worker, after the warm-up,
a one-token and a two-token step on the reserved padding block compile two graphs (torch specialises
size 1; the second is dynamic and serves every larger step: decode, prefill and mixed alike). The
first time this takes a minute or more for a 30-layer model on two cores; inductor's on-disk cache
makes a later process's load take seconds. Compiling the layers one by one instead (below) compiles
in a fifth of the time, but each compiled layer call costs its own guard check and wrappers, which on
this path ate the whole gain (SmolLM2, 2 cores: 0.97x eager, against 1.4x for the stack).

**CUDA** (`[engine] cuda_compile`, `compile_cuda_layers`): each decoder layer is compiled in place
(`nn.Module.compile`). The layers share one graph, so compiling costs one layer's time whatever the
depth; the per-call overhead that rules this out on CPU is paid only while the decode graphs are
captured (cuda_graphs.py), since a replay launches the recorded kernels and runs no Python. Steps no
graph covers (prefill chunks) run the compiled layers directly. Compiling happens before capture, from
a one-token and a two-token step, so nothing compiles while a graph is being recorded.

A model whose forward cannot be compiled still serves, eagerly, and says why.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cortex.core.logs import log_event

from .attention import AttentionContext
from .cpu_linear import PackedTable
from .runner import ModelRunner, StepBatch

log = logging.getLogger(__name__)

WARM_BATCHES = (1, 2)  # the row counts compiled at load: 1 is its own graph, 2 makes the row count dynamic


@dataclass
class CompileStats:
    """What compiling did, for the load log and /models."""

    compiled: bool = False
    scope: str | None = None  # "stack" (CPU: the decoder stack, one graph) or "layers" (CUDA: each layer)
    compile_s: float = 0.0
    graphs: int = 0  # graphs the compiler produced at load (0 when another load's graphs were reused)
    steps: int = 0  # steps run compiled (on CUDA: outside a graph replay)
    recompiles: int = 0  # graphs compiled after load (a shape the warm-up did not cover)
    reason: str | None = None  # why steps run eagerly, when they do

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "compile_s": round(self.compile_s, 2)}


class Compiled:
    """A runner's compiled step: counts steps and graphs compiled after load around `_run`."""

    def __init__(self, runner: ModelRunner, stats: CompileStats) -> None:
        assert runner.module is not None and runner.kv is not None
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
        raise NotImplementedError

    def undo(self) -> None:
        """Compiling failed: back to the eager model."""

    def warm_up(self) -> None:
        """Compile: steps of 1 and 2 decode rows on the padding block (zeroed again afterwards)."""
        kv, device = self._kv, self._device
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
        except BaseException:
            self.undo()
            raise
        finally:  # compiled or not, the padding block is zeros again
            kv.storage[:, :, 0].zero_()


class CompiledStack(Compiled):
    """CPU: the decoder stack compiled as one graph, run for every step; the LM head eagerly.

    The head multiplies only the rows that sample (`keep`), one packed product, outside the graph: so
    the graph's only varying size is the step's token count, and one dynamic graph (plus the one-token
    graph torch specialises) serves decode, prefill and mixed steps alike, in one pass each.
    """

    def __init__(self, runner: ModelRunner, stats: CompileStats) -> None:
        super().__init__(runner, stats)
        assert runner.module is not None
        self._call = runner.call
        self._body = torch.compile(runner.module.get_decoder(), dynamic=None, fullgraph=True)
        self._head = runner.module.get_output_embeddings()

    def _run(self, batch: StepBatch) -> torch.Tensor:
        hidden = self._call(self._body, batch).last_hidden_state
        return self._head(hidden[0].index_select(0, batch.keep))


class CompiledLayers(Compiled):
    """CUDA: every decoder layer compiled in place (one graph serves them all); the model runs as usual."""

    def __init__(self, runner: ModelRunner, stats: CompileStats) -> None:
        super().__init__(runner, stats)
        assert runner.module is not None
        self._model: Callable[[StepBatch], torch.Tensor] = runner.run_model
        self._layers = list(runner.module.get_decoder().layers)
        for layer in self._layers:
            layer.compile(dynamic=None, fullgraph=True)

    def _run(self, batch: StepBatch) -> torch.Tensor:
        return self._model(batch)  # the model's own forward, calling the compiled layers

    def undo(self) -> None:
        for layer in self._layers:
            layer._compiled_call_impl = None


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
    return _compile(runner, CompiledStack, "stack", model_id)


def compile_cuda_layers(runner: ModelRunner, *, enabled: bool, model_id: str = "-") -> CompileStats:
    """At load, on the device worker, after warm-up and before graph capture: compile each decoder layer.

    Not limited to CUDA by anything but the config's name: a CPU test runs it with the eager stand-in
    for graphs (graph_backends.EagerReplay), the same machinery minus the recording.
    """
    if not enabled:
        return CompileStats(reason="disabled by config ([engine] cuda_compile = false)")
    if runner.module is None or not hasattr(runner.module.get_decoder(), "layers"):
        return CompileStats(reason="the model has no decoder layers to compile")
    return _compile(runner, CompiledLayers, "layers", model_id)


def _compile(runner: ModelRunner, kind: type[Compiled], scope: str, model_id: str) -> CompileStats:
    stats = CompileStats(scope=scope)
    started, before = time.perf_counter(), _dynamo_stats()["unique_graphs"]
    try:
        compiled = kind(runner, stats)
        compiled.warm_up()
    except Exception as exc:  # a model the compiler cannot take still serves, eagerly
        log.warning("compiling the model failed; its steps run eagerly", exc_info=exc)
        reason = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        log_event(log, "model.compile.failed", logging.WARNING, model=model_id, scope=scope, reason=reason)
        return CompileStats(scope=scope, reason=reason)
    stats.compiled = True
    stats.compile_s = time.perf_counter() - started
    stats.graphs = _dynamo_stats()["unique_graphs"] - before
    runner.compiled = compiled
    log_event(
        log, "model.compile", model=model_id, scope=scope, compile_s=round(stats.compile_s, 2), graphs=stats.graphs
    )
    return stats
