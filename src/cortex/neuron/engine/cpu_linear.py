"""CPU projections through oneDNN with weights packed once at load, instead of the BLAS `F.linear` calls.

On CPU a decode step is almost all projections (`[tokens, hidden] @ W.T`), and which GEMM runs them
decides the speed. PyTorch sends float32 `F.linear` to the BLAS it was built with (MKL on x86), which
re-lays the weight out on every call and, on some CPUs (AMD's, measured), runs small-M products at a
third of memory bandwidth; at M = 8 (eight decoding streams) it is slower still. oneDNN, which PyTorch
also ships, takes the weight in its own blocked layout, reordered once here (the same op
`torch.compile` uses when it freezes a model for CPU). On the 2-core AMD host the projections of
SmolLM2-135M ran 1.15x faster at one token and 1.5x at eight. Its results also do not depend on how
many rows share the product, so a sequence's logits do not change with what else is in its batch.

Only float32 models on CPU are packed (the GPU runs cuBLAS; bf16 packing needs AVX-512 or AVX-NE).
Packing is checked against `F.linear` on a probe before it is used: anything unexpected (an older
torch, a build without oneDNN, a result that differs) leaves the model on `F.linear` and says why.
`[engine] cpu_onednn = false` turns it off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class PackStats:
    """What packing did, for the load log and /models."""

    packed: int = 0  # linear layers now on oneDNN
    extra_bytes: int = 0  # packed copies of weights that stay in use elsewhere (a head tied to the embedding)
    reason: str | None = None  # why nothing was packed, when nothing was

    def as_dict(self) -> dict[str, Any]:
        return {"packed": self.packed, "extra_mb": round(self.extra_bytes / 2**20), "reason": self.reason}


class PackedLinear(torch.nn.Module):
    """`nn.Linear`'s forward on a oneDNN-packed weight (the original dropped unless another module shares it)."""

    def __init__(self, linear: torch.nn.Linear, packed: torch.Tensor, keep_weight: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed: torch.Tensor | None = packed
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else None  # shared (a tied head): its owner still needs it

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # per projection per step: nothing but the op
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def pack_linears(module: torch.nn.Module, device: torch.device, enabled: bool = True) -> PackStats:
    """Replace the float32 `nn.Linear`s of a CPU model with `PackedLinear`s; returns what was done."""
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
    stats = PackStats()
    with torch.no_grad():
        for name, linear in linears:
            keep = linear.weight.untyped_storage().data_ptr() in shared
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            _replace(module, name, PackedLinear(linear, packed, keep))
            stats.packed += 1
            stats.extra_bytes += linear.weight.numel() * linear.weight.element_size() if keep else 0
    return stats


def release_packed(module: torch.nn.Module) -> None:
    """Unload: drop the packed weights (opaque tensors that `module.to("meta")` cannot move)."""
    for child in module.modules():
        if isinstance(child, PackedLinear):
            child.packed = None


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


def _replace(module: torch.nn.Module, name: str, child: torch.nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attribute, child)
