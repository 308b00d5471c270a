"""The grammar leg of the decode step: each constrained sequence's matcher and the batch's token mask.

`grammar.py` turns a request's constraint into a `CompiledGrammar` while the request is validated;
from there on everything happens on the device worker, once per step, and lives here:

- `GrammarMatcher` (one per sequence): `CompiledGrammar.matcher()` copies the pristine compiled state.
  After each step the scheduler feeds it the sampled token (`advance`).
- `TokenMask` (one per scheduler): in the batched step, `apply(logits, rows)` fills one bitmask row per
  constrained sequence on the host (llguidance, GIL released, rows in parallel), copies it to the device
  with one transfer, and masks the logits with one `masked_fill`.

A matcher that cannot continue (its grammar is complete, or it failed) allows only end-of-sequence, so
a constrained sequence always ends cleanly: never an all-masked row, never a device fault.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

PARALLEL_ROWS = 2  # fill masks on llguidance's thread pool from this many constrained rows up


class GrammarMatcher:
    """One sequence's position in its grammar. Worker thread only."""

    __slots__ = ("_matcher", "words")

    def __init__(self, matcher: Any, words: int) -> None:
        self._matcher = matcher
        self.words = words  # int32 words of its bitmask row: the vocabulary (tokenizer or logits, wider) / 32

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar (end-of-sequence is allowed)."""
        return bool(self._matcher.is_accepting())

    @property
    def finished(self) -> bool:
        """Nothing but end-of-sequence can follow (the grammar is complete, or the matcher failed)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None if self._matcher.is_error() else None

    def advance(self, token_id: int) -> bool:
        """Record the sampled token; False if the grammar did not allow it (then only end-of-sequence is)."""
        return bool(self._matcher.consume_token(token_id))

    def allowed_mask(self) -> torch.Tensor:
        """Which token ids are allowed now, as a bool tensor on the host. For tests and diagnostics, not the step."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        return _unpack(words.unsqueeze(0), words.numel() * 32)[0]

    def allowed(self) -> torch.Tensor:
        """The allowed token ids now (host). For tests and diagnostics, not the step."""
        return self.allowed_mask().nonzero().flatten()

    def _fill(self, address: int, size: int) -> None:
        self._matcher.unsafe_compute_mask_ptr(address, size)

    @property
    def _ll(self) -> Any:
        return self._matcher


class TokenMask:
    """Masks a batch's logits to what each constrained row's grammar allows. Worker thread only.

    The host bitmask (int32, one bit per token, pinned on CUDA) is reused from step to step; per step
    it costs one host fill (native, parallel), one host-to-device copy and one `masked_fill`.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._host: torch.Tensor | None = None
        self._shifts = torch.arange(32, dtype=torch.int32, device=self.device)
        self._executor: Any = None

    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, GrammarMatcher]]) -> torch.Tensor:
        """Mask `logits` ([batch, vocab], in place) where `rows` ((row index, matcher) pairs) say; returns it."""
        if not rows:
            return logits
        width = logits.shape[-1]
        words = rows[0][1].words  # one model, one tokenizer: every row has the same width
        host = self._buffer(len(rows), words)
        self._fill(host, rows, words)
        bits = host[: len(rows)].to(self.device, non_blocking=host.is_pinned())
        allowed = _unpack(bits, width, self._shifts)
        if len(rows) == logits.shape[0] and all(row == i for i, (row, _) in enumerate(rows)):
            return logits.masked_fill_(~allowed, float("-inf"))
        index = torch.tensor([row for row, _ in rows], dtype=torch.long, device=self.device)
        masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
        return logits.index_copy_(0, index, masked)

    def _buffer(self, rows: int, words: int) -> torch.Tensor:
        host = self._host
        if host is None or host.shape[0] < rows or host.shape[1] != words:
            capacity = max(rows, host.shape[0] if host is not None else 0, 8)
            pin = self.device.type == "cuda"
            host = torch.zeros((capacity, words), dtype=torch.int32, pin_memory=pin)
            self._host = host
        return host

    def _fill(self, host: torch.Tensor, rows: Sequence[tuple[int, GrammarMatcher]], words: int) -> None:
        row_bytes = words * 4
        base = host.data_ptr()
        if len(rows) >= PARALLEL_ROWS:
            pairs = [(matcher._ll, i) for i, (_, matcher) in enumerate(rows)]
            self._pool().unsafe_compute_mask_ptr(pairs, base, row_bytes, host.shape[0])
        else:
            for i, (_, matcher) in enumerate(rows):
                matcher._fill(base + i * row_bytes, row_bytes)

    def _pool(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2) - 1)))
        return self._executor


def _unpack(words: torch.Tensor, width: int, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, words] int32 bitmasks → [rows, width] bool (bit j of word i is token 32·i + j)."""
    if shifts is None:
        shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= width:
        return bits[:, :width]
    pad = torch.zeros((bits.shape[0], width - bits.shape[1]), dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)
