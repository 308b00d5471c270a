"""Memory measurement and release. Every function here runs on the device's worker thread.

On CUDA the allocator's own counters are the truth. On CPU there is no allocator to ask, so a model's
memory is its tensor accounting (parameter + buffer storage bytes) and the process RSS is reported
beside it; after freeing, glibc is asked to hand unused heap back so RSS follows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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
