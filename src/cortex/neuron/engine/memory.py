"""Memory measurement and release. Every function here runs on the device's worker thread.

On CUDA the allocator's own counters are the truth. On CPU there is no allocator to ask, so a model's
memory is its tensor accounting (parameter + buffer storage bytes) and the process RSS is reported
beside it; after freeing, glibc is asked to hand unused heap back so RSS follows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from dataclasses import dataclass
from functools import cache

import torch


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def cuda_allocated(device: str) -> int:
    return torch.cuda.memory_allocated(torch.device(device))


def process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def device_memory(device: str, tracked_bytes: int) -> dict[str, int]:
    """`allocated_bytes`/`reserved_bytes` from the CUDA allocator, or tensor accounting and RSS on CPU."""
    if is_cuda(device):
        dev = torch.device(device)
        return {
            "allocated_bytes": torch.cuda.memory_allocated(dev),
            "reserved_bytes": torch.cuda.memory_reserved(dev),
        }
    rss = process_rss()
    return {"allocated_bytes": tracked_bytes, "reserved_bytes": rss, "rss_bytes": rss}


def release_memory(device: str) -> None:
    """Collect garbage and give cached memory back: CUDA's caching allocator, or glibc's heap."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _malloc_trim() -> None:
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:  # glibc only
        trim(0)


@dataclass(frozen=True)
class KVBudget:
    """How much memory a model's paged KV pool may take (an explicit share: co-resident models must fit).

    CUDA: `cuda_fraction` of the device memory free once the weights are loaded, at most `cuda_max_bytes`
    (`[engine] kv_memory_fraction` / `kv_memory_max_mb`). CPU: `cpu_fraction`
    of the CPU device budget (`cpu_budget_bytes`, the neuron's `[devices]` budget; default half of the
    host's RAM), or `cpu_bytes` exactly. Either way the pool holds at least one full context and at most
    `max_contexts` of them (more could never be used at once by the sequences a batch runs).
    """

    cuda_fraction: float = 0.5
    cuda_max_bytes: int | None = 32 * 2**30  # ~230k tokens of an 8B model's KV: 32 streams of 7k tokens
    cpu_fraction: float = 0.25
    cpu_budget_bytes: int | None = None
    cpu_bytes: int | None = None
    block_size: int = 16
    max_contexts: int = 64


def kv_pool_bytes(device: str, budget: KVBudget) -> int:
    """Worker thread, after the weights are loaded: the bytes the KV pool may take on `device`."""
    if is_cuda(device):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        share = int(free * budget.cuda_fraction)
        return share if budget.cuda_max_bytes is None else min(share, budget.cuda_max_bytes)
    if budget.cpu_bytes is not None:
        return budget.cpu_bytes
    host = budget.cpu_budget_bytes
    if host is None:
        import psutil

        host = int(psutil.virtual_memory().total * 0.5)
    return int(host * budget.cpu_fraction)


def kv_pool_blocks(pool_bytes: int, bytes_per_token: int, context_length: int, budget: KVBudget) -> int:
    """Blocks of the pool (block 0, the padding block, included)."""
    size = budget.block_size
    per_block = bytes_per_token * size
    context_blocks = -(-context_length // size) + 1
    blocks = pool_bytes // per_block
    return 1 + max(context_blocks, min(blocks, context_blocks * budget.max_contexts))
