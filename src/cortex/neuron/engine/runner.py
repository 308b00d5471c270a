"""The lean forward pass of one model over a packed, ragged batch, on its paged KV pool.

No `generate()` and no transformers cache object: the model is called directly with `input_ids` and
`position_ids` of shape [1, T] (every running sequence's tokens of this step, packed), its attention
implementation set to our paged attention (attention.py), which reads the step's `AttentionContext`.
`logits_to_keep` is the index tensor of the rows that sample, so only those are projected onto the
vocabulary.

A 4-D placeholder `attention_mask` makes transformers' mask builders return it unchanged, so no
[T, T] mask is ever built (our attention builds what each sequence needs from the context).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .attention import ATTENTION_NAME, AttentionContext, KVPool, PrefillChunk, index_layers, register, set_context
from .cpu_linear import release_packed
from .types import DeviceFault, LoadError

if TYPE_CHECKING:
    from .compile import Compiled
    from .cuda_graphs import DecodeGraphs

log = logging.getLogger(__name__)

# Architectures whose attention layers call transformers' AttentionInterface with plain causal
# self-attention (no sliding window, sinks, soft-capping or ALiBi), which the paged path reproduces.
PAGED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"})


@dataclass
class StepBatch:
    """One forward's inputs: packed tokens, their positions, the rows to project, the attention metadata."""

    input_ids: torch.Tensor  # [1, T] long
    positions: torch.Tensor  # [1, T] long
    keep: torch.Tensor  # [K] long: rows whose logits are returned (in order)
    context: AttentionContext


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return KVPool.bytes_per_token(self.layers, self.kv_heads, self.head_dim, self.dtype)


def kv_shape(module: torch.nn.Module) -> KVShape:
    """The KV geometry of a model the paged path can serve; LoadError(unsupported_architecture) otherwise."""
    config = module.config
    text = getattr(config, "get_text_config", lambda: config)()
    model_type = getattr(text, "model_type", None)
    if model_type not in PAGED_ARCHITECTURES:
        raise LoadError(
            "unsupported_architecture",
            f"architecture {model_type!r} is not served by the paged engine "
            f"(supported: {', '.join(sorted(PAGED_ARCHITECTURES))})",
        )
    if getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None):
        raise LoadError("unsupported_architecture", f"{model_type} with sliding-window attention is not supported")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return KVShape(text.num_hidden_layers, kv_heads, head_dim, next(module.parameters()).dtype)


class ModelRunner:
    def __init__(self, module: torch.nn.Module, device: str, kv: KVPool) -> None:
        self.module: torch.nn.Module | None = module
        self.device = torch.device(device)
        self.kv: KVPool | None = kv
        register()
        module.set_attn_implementation(ATTENTION_NAME)
        index_layers(module)
        self.vocab_size = int(module.get_output_embeddings().weight.shape[0])
        self.placeholder_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        self._pending_faults = 0
        self._fault_lock = threading.Lock()
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA only; cuda_graphs.py)
        self.compiled: Compiled | None = None  # compiled steps (compile.py)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits of the kept rows, [K, vocab] (still on the device)."""
        self._raise_injected_fault()
        if self.module is None:
            raise DeviceFault("model was released")
        if self.graphs is not None:
            if batch.context.prefills:  # decode rows from their graph, prefill chunks eagerly beside it
                logits = self.graphs.forward_mixed(batch, self.run_model)
            else:
                logits = self.graphs.replay(batch)  # a decode-only step a captured graph covers
            if logits is not None:
                return logits
        if self.compiled is not None:  # a step no graph covers (or one being captured), compiled
            return self.compiled.forward(batch)
        return self.run_model(batch)

    def run_model(self, batch: StepBatch) -> torch.Tensor:
        """The model's own forward over the step (its layers compiled in place, if they are)."""
        assert self.module is not None
        return self.call(self.module, batch, logits_to_keep=batch.keep).logits[0]

    def call(self, module: Callable[..., Any], batch: StepBatch, **extra: Any) -> Any:
        """`module` (the model, or its compiled decoder stack) over the step's packed tokens, its context set."""
        set_context(batch.context)
        try:
            return module(
                input_ids=batch.input_ids,
                position_ids=batch.positions,
                attention_mask=self.placeholder_mask,
                use_cache=False,
                **extra,
            )
        finally:
            set_context(None)

    def warm_up(self, token_id: int) -> None:
        """One prefill and one decode on the reserved block, so lazy initialisation is not billed to a request."""
        assert self.kv is not None
        kv, device = self.kv, self.device
        block = torch.zeros(1, dtype=torch.long, device=device)
        with torch.inference_mode():
            context = AttentionContext(kv, torch.arange(2, device=device), prefills=[_whole(2, block)])
            ids = torch.full((1, 2), token_id, dtype=torch.long, device=device)
            logits = self.forward(StepBatch(ids, torch.arange(2, device=device)[None], _last(2, device), context))
            context = AttentionContext(
                kv,
                torch.full((1,), 2, dtype=torch.long, device=device),
                num_decode=1,
                block_tables=block[None],
                context_lens=torch.full((1,), 3, dtype=torch.long, device=device),
            )
            positions = torch.full((1, 1), 2, dtype=torch.long, device=device)
            self.forward(StepBatch(logits.argmax(-1).view(1, 1), positions, _last(1, device), context))
            kv.storage[:, :, 0].zero_()  # block 0 is the padding block: keep it zero

    def inject_fault(self, count: int) -> None:
        with self._fault_lock:
            self._pending_faults += count

    def release(self) -> None:
        """Unload: drop the graphs (and their pool), the KV pool and the weights.

        The module's tensors are moved to the meta device first, so their memory is returned even if
        something outside the engine still holds the module object (the caller of `Engine.adopt`, a
        traceback); `LoadedModel._release` reports such a holder.
        """
        if self.graphs is not None:
            self.graphs.release()
        self.graphs = None
        self.compiled = None
        if self.kv is not None:
            self.kv.release()
        self.kv = None
        module, self.module = self.module, None
        if module is not None:
            release_packed(module)
            strip_module(module)

    def _raise_injected_fault(self) -> None:
        if not self._pending_faults:
            return
        with self._fault_lock:
            if self._pending_faults > 0:
                self._pending_faults -= 1
                raise DeviceFault("injected device fault (test hook)")


def _whole(length: int, blocks: torch.Tensor) -> PrefillChunk:
    return PrefillChunk(0, length, length, blocks, None)


def _last(length: int, device: torch.device) -> torch.Tensor:
    return torch.full((1,), length - 1, dtype=torch.long, device=device)


def strip_module(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer of `module` with an empty meta tensor (frees their storage)."""
    try:
        with torch.inference_mode(False), torch.no_grad():
            module.to("meta")
    except Exception:  # never let freeing fail an unload: the references are dropped anyway
        log.warning("could not move the model's tensors to the meta device on unload", exc_info=True)
