"""A step's integer inputs reach the device in ONE copy: packed on the host, sliced on the device.

A step needs token ids, positions, KV slots, the rows to keep, context lengths, block tables and
prefill chunks' block ids. Built as one `torch.tensor(list, device=cuda)` each, that is half a dozen
pageable host-to-device copies per step, each a synchronous `cudaMemcpy` with its own host overhead.
Here they are written into one pinned host buffer (numpy fills it straight from the Python lists)
and copied with one `non_blocking` copy into one device buffer; the step's tensors are views of it.

The buffers are reused step after step. Before the host buffer is overwritten, an event recorded
after the previous copy is waited on (in practice long complete: every sampling step syncs on its
sampled tokens). The device buffer needs no such care: everything that reads it is queued on the
same stream before the next copy overwrites it. On CPU the packed tensor is simply the step's own.
"""

from __future__ import annotations

import torch

INITIAL_ELEMENTS = 1 << 14


class StepStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._host: torch.Tensor | None = None
        self._device: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def upload(self, values: list[int]) -> torch.Tensor:
        """`values` as an int64 tensor on the device (valid until the next upload on CUDA)."""
        if not self._cuda:
            return torch.tensor(values, dtype=torch.long)
        n = len(values)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has left the host buffer
        if self._host is None or self._host.numel() < n:
            size = max(n, INITIAL_ELEMENTS, 2 * (self._host.numel() if self._host is not None else 0))
            self._host = torch.empty(size, dtype=torch.long, pin_memory=True)
            self._device = torch.empty(size, dtype=torch.long, device=self.device)
        assert self._device is not None
        self._host.numpy()[:n] = values
        out = self._device[:n]
        out.copy_(self._host[:n], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        return out

    def release(self) -> None:
        self._host = self._device = self._copied = None
