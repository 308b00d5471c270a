"""Paged attention for transformers models: registered as the attention implementation "cortex_paged".

The model's own code (embeddings, RoPE, q/k norms, projections, MLP) runs unchanged; only its attention
call lands here, through transformers' `AttentionInterface`. Each forward is one ragged batch of shape
[1, T]: the step's decode tokens first (one per sequence), then each prefilling sequence's chunk. The
step's metadata lives in one `AttentionContext`, set on a thread-local before the forward (each device
worker thread runs its own model's forwards), which every layer's call reads:

1. the new keys/values of all T tokens are written into the model's `KVPool` at `slot_mapping`;
2. the decode rows attend in ONE batched SDPA call over their blocks, gathered through
   `block_tables` [B, W] and masked by `context_lens` [B]. This branch is tensor ops only (no host
   sync, no Python loop over sequences), so a decode step can be captured in a CUDA graph with
   fixed-shape inputs. An eager step with a single decode row (`decode_length` set from the host)
   gathers just its blocks, cuts them to its length and attends without a mask (on CPU a single
   stream decoded 3-11% faster than through the masked, padded SDPA, in-process A/B; see docs/engine.md);
3. each prefill chunk attends causally over its cached prefix plus itself (its own SDPA call).

Grouped-query attention is computed without repeating K/V: the query heads that share a K/V head are
folded into extra query rows ("pack GQA"), which is the same arithmetic.

Under `torch.compile` (compiled steps, compile.py) the layer calls the same code as the
custom op `cortex::paged_attention`, opaque to the compiler: it reads the step's context at run
time, so one compiled graph serves every step whatever its sequences' lengths and blocks. It names
the layer's KV by the 0-d buffer `cortex_layer` (`index_layers`), a graph input, so one graph also
serves every layer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_NAME = "cortex_paged"


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk inside the packed batch (host-side ints: prefill is never graph-captured)."""

    q_start: int  # first row of the chunk in the packed batch
    q_len: int  # tokens in the chunk
    kv_len: int  # tokens of the sequence in the cache once this chunk is written (prefix + chunk)
    block_ids: torch.Tensor  # [ceil(kv_len / block_size)] long, the sequence's blocks
    mask: torch.Tensor | None  # [q_len, kv_len] bool, None when the chunk is the whole context (plain causal)


@dataclass
class AttentionContext:
    """Everything the attention layers need for one forward; see the module docstring for the layout.

    For a CUDA-graph decode step: `num_decode = B`, `prefills = []`, and `slot_mapping` [B],
    `block_tables` [B, W], `context_lens` [B] are persistent device tensors updated in place.
    """

    kv: KVPool
    slot_mapping: torch.Tensor  # [T] long: flat slot (block * block_size + offset) of each new token
    num_decode: int = 0  # the first `num_decode` rows are decode tokens
    block_tables: torch.Tensor | None = None  # [num_decode, W] long; padding entries point at block 0
    context_lens: torch.Tensor | None = None  # [num_decode] long, tokens in cache including the new one
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Eager steps with one decode row: its context length on the host, so the layer attends over exactly
    # its tokens (no padding, no mask). Never set for a captured graph, whose lengths live on the device.
    decode_length: int | None = None
    _decode_mask: torch.Tensor | None = None  # built from context_lens by the first layer, reused by the rest

    def decode_mask(self) -> torch.Tensor:
        if self._decode_mask is None:
            assert self.block_tables is not None and self.context_lens is not None
            width = self.block_tables.shape[1] * self.kv.block_size
            positions = torch.arange(width, device=self.context_lens.device)
            self._decode_mask = (positions[None, :] < self.context_lens[:, None])[:, None, None, :]
        return self._decode_mask


class KVPool:
    """A model's paged KV memory: per layer K and V of shape [num_blocks, block_size, kv_heads, head_dim].

    One allocation for all layers. Block 0 is reserved and zeroed: padding entries of block tables
    point at it. On CPU the memory is allocated uninitialised (pages are committed as they are first
    written), and each block is zeroed the first time it is handed out (`zero_blocks`), so masked-out
    slots never hold NaN garbage (0 * NaN would poison the attention output).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        shape = (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
        lazy = device.type == "cpu"
        self.storage = (
            torch.empty(shape, dtype=dtype, device=device) if lazy else torch.zeros(shape, dtype=dtype, device=device)
        )
        if lazy:
            self.storage[:, :, 0].zero_()
        self.key = [self.storage[layer, 0] for layer in range(num_layers)]
        self.value = [self.storage[layer, 1] for layer in range(num_layers)]
        self.bytes = self.storage.numel() * self.storage.element_size()
        self.block_bytes = self.bytes // num_blocks
        # Blocks whose memory is really committed: all of them on CUDA (zero-filled at once); on CPU the
        # padding block and each block zeroed when first handed out (the rest is untouched virtual memory).
        self.committed_blocks = 1 if lazy else num_blocks

    @property
    def committed_bytes(self) -> int:
        """What the pool really holds now (the model's memory figure counts this, not the virtual size)."""
        return self.committed_blocks * self.block_bytes

    def release(self) -> None:
        """Unload: drop the storage and its per-layer views (the memory goes once nobody else holds it)."""
        empty = torch.empty(0, dtype=self.storage.dtype)
        self.storage = empty
        self.key = []
        self.value = []
        self.committed_blocks = 0

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Zero blocks never used before (CPU: their memory is uninitialised)."""
        if block_ids and self.storage.device.type == "cpu":
            index = torch.tensor(block_ids, dtype=torch.long)
            self.storage.index_fill_(2, index, 0)
            self.committed_blocks += len(block_ids)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


_local = threading.local()


def set_context(context: AttentionContext | None) -> None:
    _local.context = context


def get_context() -> AttentionContext:
    context = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("paged attention called outside an engine step (no AttentionContext set)")
    return context


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] → ([1, T, H, D], None), as transformers expects."""
    if torch.compiler.is_compiling():  # traced: one opaque op per layer, run with the step's context
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.ops.cortex.paged_attention(query, key, value, module.cortex_layer, scale), None
    return _attend(query, key, value, module.layer_idx, scaling), None


@torch.library.custom_op("cortex::paged_attention", mutates_args=())
def _paged_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor, scaling: float
) -> torch.Tensor:
    # the compiler plans with the fake's strides
    return _attend(query, key, value, int(layer), scaling).contiguous()


@_paged_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: torch.Tensor, scaling: float) -> torch.Tensor:
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float | None
) -> torch.Tensor:
    """The attention of one layer over the step's packed batch (see the module docstring): [1, T, H, D]."""
    context = get_context()
    kv = context.kv
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    k_cache, v_cache = kv.key[layer], kv.value[layer]
    # 1. Write the step's keys/values into their slots.
    new_k = key[0].transpose(0, 1)  # [T, Hkv, D]
    new_v = value[0].transpose(0, 1)
    k_cache.view(-1, kv_heads, dim).index_copy_(0, context.slot_mapping, new_k)
    v_cache.view(-1, kv_heads, dim).index_copy_(0, context.slot_mapping, new_v)

    q = query[0]  # [H, T, D]
    outputs: list[torch.Tensor] = []
    decode = context.num_decode
    if decode:
        # 2. Decode rows: one SDPA over [B] sequences, keys gathered through the block tables.
        assert context.block_tables is not None
        q_dec = q[:, :decode].transpose(0, 1).reshape(decode, kv_heads, group, dim)  # pack GQA
        if context.decode_length is not None:  # one row, its length known: exactly its tokens, no mask
            length = context.decode_length
            blocks = context.block_tables[0, : -(-length // kv.block_size)]
            k_one = k_cache.index_select(0, blocks).view(-1, kv_heads, dim)[:length].transpose(0, 1)
            v_one = v_cache.index_select(0, blocks).view(-1, kv_heads, dim)[:length].transpose(0, 1)
            out = F.scaled_dot_product_attention(q_dec[:1], k_one[None], v_one[None], scale=scaling)
        else:
            width = context.block_tables.shape[1] * kv.block_size
            flat = context.block_tables.view(-1)  # index_select: advanced indexing is ~10x slower on CPU
            k_dec = k_cache.index_select(0, flat).view(decode, width, kv_heads, dim).transpose(1, 2)
            v_dec = v_cache.index_select(0, flat).view(decode, width, kv_heads, dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q_dec, k_dec, v_dec, attn_mask=context.decode_mask(), scale=scaling)
        outputs.append(out.reshape(decode, heads, dim))  # [B, H, D]
    for chunk in context.prefills:
        # 3. Prefill chunks: causal attention over the cached prefix and the chunk itself.
        # Batched (4-D) inputs throughout: with 3-D ones SDPA falls back to its unfused math path, which on
        # CPU ran these 3-4x slower (9x for a 2,048-token prompt), and on CUDA skips the fused kernels.
        rows = query[:, :, chunk.q_start : chunk.q_start + chunk.q_len]  # [1, H, n, D]
        if chunk.mask is None:  # the chunk is the whole context: its own keys, plain causal, GQA in the kernel
            k_pre = key[:, :, chunk.q_start : chunk.q_start + chunk.q_len]
            v_pre = value[:, :, chunk.q_start : chunk.q_start + chunk.q_len]
            out = F.scaled_dot_product_attention(rows, k_pre, v_pre, is_causal=True, scale=scaling, enable_gqa=True)
        else:  # after a cached prefix: the bottom-right causal mask, GQA packed into query rows (group, position)
            q_pre = rows.reshape(1, kv_heads, group * chunk.q_len, dim)
            k_pre = k_cache.index_select(0, chunk.block_ids).view(-1, kv_heads, dim)[: chunk.kv_len].transpose(0, 1)
            v_pre = v_cache.index_select(0, chunk.block_ids).view(-1, kv_heads, dim)[: chunk.kv_len].transpose(0, 1)
            mask = chunk.mask.repeat(group, 1)
            out = F.scaled_dot_product_attention(q_pre, k_pre[None], v_pre[None], attn_mask=mask, scale=scaling)
        outputs.append(out.reshape(heads, chunk.q_len, dim).transpose(0, 1))  # [n, H, D]
    attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    assert attn.shape[0] == tokens
    return attn.unsqueeze(0)


def prefix_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool: query i (at position kv_len - q_len + i) sees keys up to its own position."""
    start = kv_len - q_len
    return torch.arange(kv_len, device=device)[None, :] <= (start + torch.arange(q_len, device=device))[:, None]


def index_layers(module: torch.nn.Module) -> None:
    """Give every attention layer its index as a (CPU, 0-d) buffer, `cortex_layer`, for the compiled path.

    Compiled, a layer names its KV by this tensor rather than by the int `layer_idx`: the compiler
    would specialise a graph on each int, where a tensor is an input, so one graph serves every layer.
    """
    for child in module.modules():
        index = getattr(child, "layer_idx", None)
        if isinstance(index, int) and not hasattr(child, "cortex_layer"):
            child.register_buffer("cortex_layer", torch.tensor(index, dtype=torch.long, device="cpu"), persistent=False)


_registered = False


def register() -> None:
    """Make "cortex_paged" a valid `attn_implementation` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    _registered = True
