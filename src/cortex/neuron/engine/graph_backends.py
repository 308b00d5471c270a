"""How a decode step is recorded and replayed: the CUDA graph backend, and an eager stand-in for tests.

`cuda_graphs.py` decides what to capture (buckets, static buffers, padding) and when to replay it; a
backend only records a step that reads and writes static tensors and hands back something to replay.
Keeping the two apart lets a CPU test run the very replay machinery with `EagerReplay`, and keeps the
CUDA-specific care (capture streams, the shared memory pool, cuBLAS workspaces) in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class GraphBackend(Protocol):
    """Records `step` (which reads and writes only static tensors) and returns a replayable handle."""

    def capture(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]: ...

    def captured(self) -> None: ...

    def release(self) -> None: ...


class CudaGraphBackend:
    """The real thing: warm up on a side stream, then capture into a pool shared by all of a model's graphs.

    cuBLAS keeps one workspace per (handle, stream), allocated by the first matmul on a stream and
    cached for the process's life. torch captures every graph on one shared capture stream, so the
    first capture allocates that workspace inside this model's private pool, and the cache then pins
    the pool after unload (~1 GiB still allocated on an H200 after unloading a tiny graph-captured
    model, 32 MB without graphs) — and hands another model's capture a workspace in *this* pool. So
    the cache is cleared before capture (this model's graphs get their own workspace, in their pool),
    after it (nothing outside our graphs keeps a pointer into the pool; the graphs still own that
    memory, and nothing else allocates from the pool), and at release. Release also resets each graph
    explicitly, so the pool's use count drops even if some stray Python reference to a graph survives.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: Any = None
        self.graphs: list[Any] = []  # every captured torch.cuda.CUDAGraph, reset at release

    def capture(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()  # lazy initialisation (cuBLAS workspaces, kernels' first-call set-up) must not be captured
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            clear_cublas_workspaces()  # not one cached on the capture stream inside another model's pool
        # thread_local: other device workers keep running their own CUDA work while this one captures.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = step()
        self.graphs.append(graph)
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, output

    def captured(self) -> None:
        """All graphs are captured: drop the workspace cached on the capture stream (it lives in our pool)."""
        clear_cublas_workspaces()

    def release(self) -> None:
        """Reset every graph and forget the pool: once no tensor uses it, `empty_cache` hands its memory back."""
        torch.cuda.synchronize(self.device)  # no replay may still run on a graph being reset
        for graph in self.graphs:
            graph.reset()
        self.graphs.clear()
        self.pool = None
        clear_cublas_workspaces()


def clear_cublas_workspaces() -> None:
    """Drop torch's cached cuBLAS/cuBLASLt workspaces (reallocated on the next matmul); a no-op without CUDA."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available():
        clear()


class EagerReplay:
    """For tests on CPU: "replaying" runs the same step eagerly over the same static buffers."""

    def capture(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        holder: dict[str, torch.Tensor] = {"out": step()}

        def replay() -> None:
            holder["out"].copy_(step())

        return replay, holder["out"]

    def captured(self) -> None:
        return None

    def release(self) -> None:
        return None
