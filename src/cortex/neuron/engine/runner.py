"""The lean forward pass of one model: its own KV cache per call, last-position logits only.

No `generate()`: the model is called directly with the sequence's cache, so a decode step costs one
forward plus a few tensor ops. Positions come from the cache length, which keeps chunked prefill and
decode on the same path. (A CUDA-graph path would swap `DynamicCache` for a static cache and pass
explicit position ids; see docs/engine.md.)
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch

from .types import DeviceFault


class ModelRunner:
    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.module: torch.nn.Module | None = module
        self.device = torch.device(device)
        self._config = module.config
        parameters = inspect.signature(module.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; older models and versions still take the former.
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._keep_last: dict[str, int] = {}
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in parameters:
                self._keep_last = {name: 1}  # project only the last position onto the vocabulary
                break
        self._pending_faults = 0
        self._fault_lock = threading.Lock()

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self._config)
        except TypeError:  # transformers before the config-aware cache
            return DynamicCache()

    def last_logits(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run `input_ids` (shape [1, n]) through the model on top of `cache`; logits of the last position."""
        self._raise_injected_fault()
        if self.module is None:
            raise DeviceFault("model was released")
        output = self.module(input_ids=input_ids, use_cache=True, **{self._cache_argument: cache}, **self._keep_last)
        return output.logits[0, -1]

    def warm_up(self, token_id: int) -> None:
        """One prefill and one decode, so lazy initialisation is not billed to the first request."""
        with torch.inference_mode():
            cache = self.new_cache()
            prompt = torch.full((1, 2), token_id, dtype=torch.long, device=self.device)
            logits = self.last_logits(prompt, cache)
            self.last_logits(logits.argmax(-1).view(1, 1), cache)

    def inject_fault(self, count: int) -> None:
        with self._fault_lock:
            self._pending_faults += count

    def release(self) -> None:
        self.module = None

    def _raise_injected_fault(self) -> None:
        if not self._pending_faults:
            return
        with self._fault_lock:
            if self._pending_faults > 0:
                self._pending_faults -= 1
                raise DeviceFault("injected device fault (test hook)")
