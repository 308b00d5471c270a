"""One generation request inside a scheduler: its private KV cache, sampler and output stream.

A `Sequence` is shared by two threads with a strict split: the event loop creates it, reads its
channel and may set `cancelled`; everything else (cache, sampler, detokeniser, timings) belongs to
the device worker, which hands events back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence as Ids
from time import perf_counter
from typing import Any, Literal

import torch

from .detokenize import IncrementalDetokenizer, StopMatcher
from .json_constraint import ConstrainedSampler, json_sampler
from .sampling import Sampler
from .types import Finished, GenerationEvent, GenerationRequest, SamplingParams, TextDelta

Delivery = list[GenerationEvent] | BaseException
FinishReason = Literal["stop", "length", "cancelled"]


class OutputStream:
    """Sampled token ids to `TextDelta`s for one sequence; decides when and why it ends."""

    def __init__(
        self, tokenizer: Any, prompt_ids: Ids[int], params: SamplingParams, eos_ids: frozenset[int], max_new: int
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(params.stop)
        self._eos_ids = frozenset() if params.ignore_eos else eos_ids
        self._max_new = max_new
        self._unaccounted = 0  # tokens whose text is still held back
        self.generated = 0
        self.reason: FinishReason | None = None  # set once the sequence is done
        self.stop_sequence: str | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, token_id: int) -> list[TextDelta]:
        self.generated += 1
        self._unaccounted += 1
        if token_id in self._eos_ids:
            return self._end("stop")
        text, stop = self._stops.push(self._detokenizer.push(token_id))
        if stop is not None:
            self.reason, self.stop_sequence = "stop", stop
            return self._delta(text)
        deltas = self._delta(text)
        if self.generated >= self._max_new:
            deltas += self._end("length")
        return deltas

    def _end(self, reason: FinishReason) -> list[TextDelta]:
        text, stop = self._stops.push(self._detokenizer.flush())
        if stop is not None:
            self.reason, self.stop_sequence = "stop", stop
            return self._delta(text)
        self.reason = reason
        return self._delta(text + self._stops.flush())

    def _delta(self, text: str) -> list[TextDelta]:
        if not text:
            return []
        delta = TextDelta(text=text, tokens=self._unaccounted)
        self._unaccounted = 0
        return [delta]


class Sequence:
    def __init__(self, request: GenerationRequest, max_new_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request.request_id
        self.prompt_ids = list(request.prompt_ids)
        self.params = request.sampling
        self.max_new_tokens = max_new_tokens
        self.loop = loop
        self.channel: asyncio.Queue[Delivery] = asyncio.Queue()
        self.cancelled = False  # set by the loop side; the worker drops the sequence at its next step
        self.submitted_at = perf_counter()
        # Worker-side state, created when the scheduler gives the sequence a slot.
        self.cache: Any = None
        self.sampler: Sampler | ConstrainedSampler | None = None
        self.output: OutputStream | None = None
        self.prompt_tensor: torch.Tensor | None = None
        self.next_input: torch.Tensor | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.first_token_at = 0.0
        self.last_token_at = 0.0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    def start(self, cache: Any, device: torch.device, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        """Worker thread: allocate this sequence's own cache and sampling state."""
        self.cache = cache
        self.prompt_tensor = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
        sampler = Sampler(self.params, self.prompt_tensor[0], device)
        self.sampler = json_sampler(sampler, tokenizer, eos_ids) if self.params.json_object else sampler
        self.output = OutputStream(tokenizer, self.prompt_ids, self.params, eos_ids, self.max_new_tokens)

    def release(self) -> None:
        """Worker thread: drop every tensor this sequence holds (its KV cache above all)."""
        self.cache = self.sampler = self.prompt_tensor = self.next_input = None

    def accept(self, token_id: int, now: float) -> list[GenerationEvent]:
        """Worker thread: one sampled token in, the events it produces out (Finished last, once)."""
        assert self.output is not None
        if self.output.generated == 0:
            self.first_token_at = now
        self.last_token_at = now
        events: list[GenerationEvent] = list(self.output.push(token_id))
        if self.output.done:
            events.append(self.finished())
        return events

    def finished(self, reason: FinishReason | None = None) -> Finished:
        output = self.output
        generated = output.generated if output else 0
        decode_time = self.last_token_at - self.first_token_at
        return Finished(
            reason=reason or (output.reason if output and output.reason else "cancelled"),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=generated,
            stop_sequence=output.stop_sequence if output and reason is None else None,
            time_to_first_token_s=(self.first_token_at - self.submitted_at) if generated else 0.0,
            decode_tok_s=(generated - 1) / decode_time if generated > 1 and decode_time > 0 else 0.0,
        )

    def deliver(self, item: Delivery) -> None:
        """Worker thread: hand events (or the exception to raise) to the waiting coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.channel.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True
