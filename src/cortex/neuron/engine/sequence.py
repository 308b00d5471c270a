"""One generation request inside a scheduler: its tokens, KV blocks, sampling state and output stream.

A `Sequence` is shared by two threads with a strict split: the event loop creates it, reads its
channel and may set `cancelled`; everything else (blocks, sampler, detokeniser, timings) belongs to
the device worker, which hands events back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence as Ids
from time import perf_counter
from typing import Any, Literal

import torch

from .blocks import BlockTable
from .detokenize import IncrementalDetokenizer, StopMatcher
from .sampling import clamp_seed
from .token_mask import GrammarMatcher
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
        self._logprobs: list[Any] = []  # their logprobs (when asked for), handed out with their text
        self.generated = 0
        self.reason: FinishReason | None = None  # set once the sequence is done
        self.stop_sequence: str | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, token_id: int, logprob: Any = None) -> list[TextDelta]:
        self.generated += 1
        self._unaccounted += 1
        if token_id in self._eos_ids:
            return self._end("stop")
        if logprob is not None:
            self._logprobs.append(logprob)
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
        delta = TextDelta(text=text, tokens=self._unaccounted, logprobs=tuple(self._logprobs))
        self._unaccounted = 0
        self._logprobs = []
        return [delta]


class Sequence:
    """A request inside the scheduler: its tokens (prompt + output), KV blocks, sampling state and output.

    `tokens[:computed]` have their keys/values in the sequence's blocks. A step computes the next
    `tokens[computed:]` (a prefill chunk, or the one last sampled token) and, once all known tokens
    are computed, samples the next one. Preemption frees the blocks and sets `computed` back to 0:
    the sequence is later recomputed from prompt + output and continues where it was.
    """

    def __init__(self, request: GenerationRequest, max_new_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request.request_id
        self.prompt_ids = list(request.prompt_ids)
        self.params = request.sampling
        self.max_new_tokens = max_new_tokens
        self.loop = loop
        self.channel: asyncio.Queue[Delivery] = asyncio.Queue()
        self.cancelled = False  # set by the loop side; the worker drops the sequence at its next step
        self.submitted_at = perf_counter()
        # Worker-side state.
        self.tokens: list[int] = list(self.prompt_ids)
        self.computed = 0  # leading tokens whose keys/values are in the cache
        self.table = BlockTable()
        self.cached_tokens = 0  # prompt tokens reused from the prefix cache at the first admission
        self.admissions = 0
        self.seed = clamp_seed(self.params.seed if self.params.seed is not None else secrets.randbits(63))
        self.constraint = request.constraint  # a CompiledGrammar once validated, or None
        self.matcher: GrammarMatcher | None = None  # its state: the step masks this row's logits with it
        self.next_logprob: Any = None  # the last sampled token's TokenLogprob, when the request asked for them
        self.seen: torch.Tensor | None = None  # [vocab] bool: prompt + output (repetition penalty)
        self.counts: torch.Tensor | None = None  # [vocab] float: output counts (frequency/presence)
        self.output: OutputStream | None = None
        self.first_token_at = 0.0
        self.last_token_at = 0.0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def started(self) -> bool:
        return self.output is not None

    @property
    def pending(self) -> int:
        """Tokens to compute before the next sample (1 while decoding)."""
        return len(self.tokens) - self.computed

    @property
    def penalised(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    def start(self, device: torch.device, tokenizer: Any, eos_ids: frozenset[int], vocab: int) -> None:
        """Worker thread, first admission: output stream and sampling state."""
        self.output = OutputStream(tokenizer, self.prompt_ids, self.params, eos_ids, self.max_new_tokens)
        if self.constraint is not None:
            self.matcher = self.constraint.matcher()
        if self.penalised:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            prompt = torch.tensor([t for t in self.prompt_ids if t < vocab], dtype=torch.long, device=device)
            self.seen[prompt] = True
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    def record(self, token: torch.Tensor) -> None:
        """Worker thread: count a sampled token (a one-element device tensor) in the penalty statistics."""
        if self.seen is not None and self.counts is not None:
            self.seen.index_fill_(0, token, True)
            self.counts.index_add_(0, token, torch.ones(1, dtype=torch.float32, device=token.device))

    def release(self) -> None:
        """Worker thread: drop every tensor this sequence holds (its blocks are freed by the scheduler)."""
        self.matcher = None
        self.seen = self.counts = None

    def accept(self, token_id: int, now: float, logprob: Any = None) -> list[GenerationEvent]:
        """Worker thread: one sampled token in, the events it produces out (Finished last, once)."""
        assert self.output is not None
        if self.output.generated == 0:
            self.first_token_at = now
        self.last_token_at = now
        self.tokens.append(token_id)
        if self.matcher is not None:
            self.matcher.advance(token_id)  # the mask allowed it; a refusal leaves only end-of-sequence
        if logprob is None:
            logprob, self.next_logprob = self.next_logprob, None
        events: list[GenerationEvent] = list(self.output.push(token_id, logprob))
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
            cached_tokens=self.cached_tokens,
        )

    def deliver(self, item: Delivery) -> None:
        """Worker thread: hand events (or the exception to raise) to the waiting coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.channel.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


def deliver_many(items: list[tuple[Sequence, Delivery]]) -> None:
    """Worker thread: a whole step's deliveries with ONE wake-up of each event loop.

    `call_soon_threadsafe` writes to the loop's self-pipe every time; per sequence per token that is a
    syscall and a loop wake-up for each of B streams, which a decode step of a large batch cannot afford.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Delivery]]] = {}
    for sequence, item in items:
        by_loop.setdefault(sequence.loop, []).append((sequence, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for sequence, _ in batch:
                sequence.cancelled = True


def _put_all(batch: list[tuple[Sequence, Delivery]]) -> None:
    for sequence, item in batch:
        sequence.channel.put_nowait(item)
