"""CPU projections through oneDNN with weights packed once at load, instead of the BLAS `F.linear` calls.

On CPU a decode step is almost all projections (`[tokens, hidden] @ W.T`), and which GEMM runs them
decides the speed. PyTorch sends float32 `F.linear` to the BLAS it was built with (MKL on x86), which
re-lays the weight out on every call and, on some CPUs (AMD's, measured), runs small-M products at a
third of memory bandwidth; at M = 8 (eight decoding streams) it is slower still. oneDNN, which PyTorch
also ships, takes the weight in its own blocked layout, reordered once here (the same op
`torch.compile` uses when it freezes a model for CPU). On the 2-core AMD host the projections of
SmolLM2-135M ran 1.15x faster at one token and 1.5x at eight. Its results also do not depend on how
many rows share the product, so a sequence's logits do not change with what else is in its batch.

Sibling projections that read the same input (`q_proj`/`k_proj`/`v_proj` of an attention block,
`gate_proj`/`up_proj` of an MLP) are packed as ONE weight, concatenated: the first sibling's call runs
one product for all of them and the others take their slice of it (`SharedProduct`), so the model
code runs unchanged. Fewer, wider products stream the weights faster: on the same host the
projections ran 1.06x faster at one token and 1.2x at eight than packed one by one.

Under `torch.compile` (compiled CPU steps, compile.py) a packed product is the custom op
`cortex::packed_linear`, opaque to the compiler: the graph names the weight by its handle, a 0-d
buffer of the module (a graph input) registered in a process-wide table, so the packed copies are
shared with the eager path and never duplicated, and the graph is the same for every layer and every
load of the same architecture (the compiler's on-disk cache serves a reload).

Only float32 models on CPU are packed (the GPU runs cuBLAS; bf16 packing needs AVX-512 or AVX-NE).
Packing is checked against `F.linear` on a probe before it is used: anything unexpected (an older
torch, a build without oneDNN, a result that differs) leaves the model on `F.linear` and says why.
`[engine] cpu_onednn = false` turns it off.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class PackStats:
    """What packing did, for the load log and /models."""

    packed: int = 0  # linear layers now on oneDNN
    fused: int = 0  # of those, sibling groups computed as one product (q/k/v, gate/up)
    extra_bytes: int = 0  # packed copies of weights that stay in use elsewhere (a head tied to the embedding)
    reason: str | None = None  # why nothing was packed, when nothing was
    table: PackedTable | None = field(default=None, repr=False)  # the packed weights, for the compiled path

    def as_dict(self) -> dict[str, Any]:
        return {
            "packed": self.packed,
            "fused_groups": self.fused,
            "extra_mb": round(self.extra_bytes / 2**20),
            "reason": self.reason,
        }


class PackedTable:
    """A model's packed weights (and biases), each registered under a process-wide handle: what
    `cortex::packed_linear` multiplies by. Handles are unique in the process, so a compiled step needs
    no notion of which model it runs: the handle (a module buffer, a graph input) says it all."""

    def __init__(self) -> None:
        self.handles: list[int] = []

    def add(self, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Register a packed weight; its handle as a 0-d tensor, a buffer of the modules that multiply by it
        (a compiled graph takes tensors as inputs, where it would specialise on an int)."""
        with _lock:
            handle = next(_handles)
            _weights[handle] = (packed, bias)
        self.handles.append(handle)
        return torch.tensor(handle, dtype=torch.long, device="cpu")

    @property
    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [_weights[h] for h in self.handles if h in _weights]

    def release(self) -> None:
        with _lock:
            for handle in self.handles:
                _weights.pop(handle, None)
        self.handles = []


_lock = threading.Lock()
_handles = itertools.count()
_weights: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # every loaded model's packed weights


@torch.library.custom_op("cortex::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    entry = _weights.get(int(handle))
    if entry is None:
        raise RuntimeError("cortex::packed_linear: the packed weight was released (its model is unloaded)")
    packed, bias = entry
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_packed_linear_op.register_fake
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _product(
    x: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None, handle: torch.Tensor, out: int
) -> torch.Tensor:
    """x @ W.T (+ bias) on a packed weight: directly when eager, through the opaque op when traced."""
    if torch.compiler.is_compiling():
        return torch.ops.cortex.packed_linear(x, handle, out)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# Projections a model's code calls one after the other on the same input (Llama, Mistral, Qwen, ...).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class PackedLinear(torch.nn.Module):
    """`nn.Linear`'s forward on a oneDNN-packed weight (the original dropped unless another module shares it)."""

    def __init__(self, linear: torch.nn.Linear, packed: torch.Tensor, keep_weight: bool, table: PackedTable) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed: torch.Tensor | None = packed
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else None  # shared (a tied head): its owner still needs it
        self.table = table
        self.register_buffer("handle", table.add(packed, linear.bias), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # per projection per step: nothing but the op
        return _product(x, self.packed, self.bias, self.handle, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


class SharedProduct:
    """One packed product over sibling projections' concatenated weights, computed once per input.

    The model calls each sibling with the same input tensor in turn. The first call computes the whole
    product and keeps its slices; the others take theirs while the input is the same tensor object
    (model code does not change it in place between the calls; inference tensors have no version
    counter to check). Any other call — a different input, or a sibling asked twice — computes
    afresh, so a model that does not follow the pattern is still answered correctly, only not
    faster. The slices are dropped as soon as every sibling has taken its own.
    """

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], table: PackedTable) -> None:
        self.packed: torch.Tensor | None = packed
        self.bias = bias
        self.sizes = sizes
        self.handle = table.add(packed, bias)
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._taken: set[int] = set()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input or index in self._taken:
            product = _product(x, self.packed, self.bias, self.handle, sum(self.sizes))
            self._parts = product.split(self.sizes, dim=-1)
            self._input, self._taken = x, set()
        self._taken.add(index)
        part = self._parts[index]
        if len(self._taken) == len(self.sizes):
            self._input, self._parts = None, ()
        return part

    def release(self) -> None:
        self.packed = self.bias = self._input = None
        self._parts = ()


class FusedPart(torch.nn.Module):
    """A sibling projection answered from its group's `SharedProduct` (its own weight is gone)."""

    def __init__(self, linear: torch.nn.Linear, shared: SharedProduct, index: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = None
        self.shared = shared
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn, fused part {self.index}"


def pack_linears(module: torch.nn.Module, device: torch.device, enabled: bool = True) -> PackStats:
    """Replace the float32 `nn.Linear`s of a CPU model with `FusedPart`s (sibling groups, one product
    each) and `PackedLinear`s (the rest); returns what was done."""
    if not enabled:
        return PackStats(reason="disabled by config ([engine] cpu_onednn = false)")
    if device.type != "cpu":
        return PackStats(reason="not a CPU device")
    linears = [(name, m) for name, m in module.named_modules() if type(m) is torch.nn.Linear]
    if not linears or any(m.weight.dtype != torch.float32 for _, m in linears):
        return PackStats(reason="not a float32 model")
    reason = _unusable(linears[0][1])
    if reason is not None:
        log.info("oneDNN packing unavailable, projections stay on F.linear: %s", reason)
        return PackStats(reason=reason)
    shared = _shared_storages(module)
    table = PackedTable()
    stats = PackStats(table=table)
    with torch.no_grad():
        for parent_name, group in _sibling_groups(module, shared):
            _fuse(module, parent_name, group, table)
            stats.packed += len(group)
            stats.fused += 1
        linears = [(name, m) for name, m in module.named_modules() if type(m) is torch.nn.Linear]
        for name, linear in linears:
            keep = linear.weight.untyped_storage().data_ptr() in shared
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            _replace(module, name, PackedLinear(linear, packed, keep, table))
            stats.packed += 1
            stats.extra_bytes += linear.weight.numel() * linear.weight.element_size() if keep else 0
    return stats


def release_packed(module: torch.nn.Module) -> None:
    """Unload: drop the packed weights (opaque tensors that `module.to("meta")` cannot move)."""
    for child in module.modules():
        if isinstance(child, PackedLinear):
            child.packed = None
            child.table.release()
        elif isinstance(child, FusedPart):
            child.shared.release()


def _unusable(linear: torch.nn.Linear) -> str | None:
    """None if oneDNN's packed linear reproduces `F.linear` on a probe; else why it cannot be used."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    try:
        with torch.no_grad():
            probe = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, linear.bias, "none", [], "")
            want = torch.nn.functional.linear(probe, linear.weight, linear.bias)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    scale = float(want.abs().max()) or 1.0
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
        return "oneDNN's packed linear does not reproduce F.linear on this host"
    return None


def _shared_storages(module: torch.nn.Module) -> set[int]:
    """Storages held by more than one parameter (tied weights), by data pointer."""
    seen: dict[int, int] = {}
    for _, parameter in module.named_parameters(remove_duplicate=False):
        pointer = parameter.untyped_storage().data_ptr()
        seen[pointer] = seen.get(pointer, 0) + 1
    return {pointer for pointer, count in seen.items() if count > 1}


def _sibling_groups(module: torch.nn.Module, shared: set[int]) -> list[tuple[str, list[str]]]:
    """(parent, sibling names) for every complete group of plain, untied linears on one input width."""
    groups: list[tuple[str, list[str]]] = []
    for parent_name, parent in module.named_modules():
        for names in SIBLINGS:
            children = [getattr(parent, n, None) for n in names]
            if not all(type(c) is torch.nn.Linear for c in children):
                continue
            if len({c.in_features for c in children}) != 1:
                continue
            if any(c.weight.untyped_storage().data_ptr() in shared for c in children):
                continue
            groups.append((parent_name, list(names)))
    return groups


def _fuse(module: torch.nn.Module, parent_name: str, names: list[str], table: PackedTable) -> None:
    parent = module.get_submodule(parent_name) if parent_name else module
    children: list[torch.nn.Linear] = [getattr(parent, n) for n in names]
    weight = torch.cat([c.weight.detach() for c in children])
    bias = None
    if any(c.bias is not None for c in children):
        bias = torch.cat(
            [c.bias.detach() if c.bias is not None else c.weight.new_zeros(c.out_features) for c in children]
        )
    sizes = [c.out_features for c in children]
    product = SharedProduct(torch.ops.mkldnn._reorder_linear_weight(weight), bias, sizes, table)
    for index, (name, child) in enumerate(zip(names, children, strict=True)):
        setattr(parent, name, FusedPart(child, product, index))


def _replace(module: torch.nn.Module, name: str, child: torch.nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attribute, child)
