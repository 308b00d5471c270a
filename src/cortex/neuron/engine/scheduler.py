"""One scheduler per loaded model: it alone runs the model's forwards, one step at a time.

A step is one job on the device worker, so other work for the device (loads, other models' steps)
interleaves between steps. Each step:

1. admits new sequences into free slots and drops cancelled ones (their caches go with them);
2. launches work for every running sequence: a prefill chunk (within a per-step token budget, so a
   long prompt cannot stall everyone else's decode) or one decode token, each on the sequence's OWN
   cache — caches are never shared, so no sequence can see another's keys and values;
3. copies all sampled tokens to the host in one transfer (the only sync of the step);
4. turns tokens into text events on the host and hands them to the event loop.

Launching is the one place that changes for batching: today it runs one forward per sequence (the
batch-of-one path, exact whatever the concurrency); a batched decode would run one forward over the
decoding sequences with a ragged cache and hand back the same list of next tokens.

Any exception from a forward except `EngineError` is a device fault: every sequence of the model gets
`DeviceFault` and the scheduler refuses new work until the model is reloaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import Any

import torch

from .runner import ModelRunner
from .sampling import validate_sampling
from .sequence import Sequence
from .types import DeviceFault, EngineError, GenerationRequest
from .worker import DeviceWorker, WorkerClosed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerOptions:
    max_active: int = 32  # sequences holding a slot (a KV cache); the rest wait in order
    prefill_chunk: int = 256  # prompt tokens prefilled per step, across sequences


class DecodeRate:
    """Recent aggregate decode rate: tokens over the busy time of the steps in the last few seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self._window_s = window_s
        self._steps: deque[tuple[float, int, float]] = deque(maxlen=1024)  # (ended_at, tokens, duration)

    def record(self, tokens: int, duration: float) -> None:
        self._steps.append((monotonic(), tokens, duration))

    def tokens_per_second(self) -> float:
        horizon = monotonic() - self._window_s
        recent = [s for s in list(self._steps) if s[0] >= horizon]  # list(): one atomic copy under the GIL
        busy = sum(duration for _, _, duration in recent)
        return sum(tokens for _, tokens, _ in recent) / busy if busy > 0 else 0.0


class Scheduler:
    def __init__(
        self,
        worker: DeviceWorker,
        runner: ModelRunner,
        tokenizer: Any,
        eos_ids: frozenset[int],
        context_length: int,
        options: SchedulerOptions,
    ) -> None:
        self._worker = worker
        self._runner: ModelRunner | None = runner
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._context_length = context_length
        self._options = options
        self._inbox: deque[Sequence] = deque()  # loop → worker hand-over (deque append/popleft are atomic)
        self._waiting: deque[Sequence] = deque()  # worker only: admitted, no slot yet
        self._running: list[Sequence] = []  # worker only: holding a slot
        self._lock = threading.Lock()  # guards `_step_posted`
        self._step_posted = False
        self._fault: str | None = None  # message of the device fault that poisoned the model
        self._closed = False
        self.rate = DecodeRate()
        self.steps = 0

    # Loop side.

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def runner(self) -> ModelRunner | None:
        return self._runner

    @property
    def poisoned(self) -> bool:
        return self._fault is not None

    def validate(self, request: GenerationRequest) -> int:
        """Check a request; returns how many tokens it may generate (max_new_tokens clipped to the context)."""
        if self._closed:
            raise EngineError("model is unloaded")
        if self._fault is not None:
            raise DeviceFault(self._fault)
        if not request.prompt_ids:
            raise EngineError("prompt is empty")
        if len(request.prompt_ids) >= self._context_length:
            raise EngineError(
                f"prompt is {len(request.prompt_ids)} tokens; the model's context is {self._context_length}"
            )
        validate_sampling(request.sampling)
        return min(request.sampling.max_new_tokens, self._context_length - len(request.prompt_ids))

    def open(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Sequence:
        sequence = Sequence(request, self.validate(request), loop)
        self._inbox.append(sequence)
        self._wake()
        return sequence

    def inject_fault(self, count: int) -> None:
        if self._runner is not None:
            self._runner.inject_fault(count)

    def _wake(self) -> None:
        with self._lock:
            if self._step_posted:
                return
            self._step_posted = True
        try:
            self._worker.post(self._step, abandon=self._abandon)
        except WorkerClosed:
            with self._lock:
                self._step_posted = False
            raise EngineError("engine is closed") from None

    # Worker side.

    def close(self) -> None:
        """Worker thread (unload): end every sequence as cancelled and let go of the model."""
        self._closed = True
        for sequence in self._drain_all():
            sequence.deliver([sequence.finished("cancelled")])
            sequence.release()
        if self._runner is not None:
            self._runner.release()
        self._runner = None

    def _step(self) -> None:
        self.steps += 1
        try:
            if self._fault is not None or self._closed:
                self._refuse_inbox()
                return
            self._admit()
            if self._running:
                self._advance()
        except Exception as exc:  # e.g. allocating a new sequence's state on the device failed
            self._poison(exc)
        finally:
            self._post_next_step()

    def _admit(self) -> None:
        while self._inbox:
            self._waiting.append(self._inbox.popleft())
        self._running = [s for s in self._running if not self._dropped_if_cancelled(s)]
        self._waiting = deque(s for s in self._waiting if not s.cancelled)
        assert self._runner is not None
        while self._waiting and len(self._running) < self._options.max_active:
            sequence = self._waiting.popleft()
            self._running.append(sequence)  # first, so a failure below still reaches its consumer
            sequence.start(self._runner.new_cache(), self._runner.device, self._tokenizer, self._eos_ids)

    @staticmethod
    def _dropped_if_cancelled(sequence: Sequence) -> bool:
        if sequence.cancelled:
            sequence.release()
        return sequence.cancelled

    def _advance(self) -> None:
        started = perf_counter()
        try:
            with torch.inference_mode():
                sampled = self._launch()
                token_ids = torch.cat([token for _, token in sampled]).tolist() if sampled else []
        except Exception as exc:  # a forward failed: the device state of this model is suspect
            self._poison(exc)
            return
        now = perf_counter()
        for (sequence, _), token_id in zip(sampled, token_ids, strict=True):
            self._settle(sequence, token_id, now)
        decoded = sum(1 for sequence, _ in sampled if sequence.output and sequence.output.generated > 1)
        self.rate.record(decoded, now - started)

    def _launch(self) -> list[tuple[Sequence, torch.Tensor]]:
        """Run one unit of work per running sequence; the sampled next tokens, still on the device."""
        assert self._runner is not None
        budget = self._options.prefill_chunk
        sampled: list[tuple[Sequence, torch.Tensor]] = []
        for sequence in list(self._running):
            try:
                if sequence.prefilling:
                    if budget <= 0:
                        continue
                    chunk = min(budget, sequence.prompt_tokens - sequence.prefilled)
                    budget -= chunk
                    token = self._prefill(sequence, chunk)
                else:
                    token = self._decode(sequence)
            except EngineError as exc:  # this request's fault: it alone fails, nothing is poisoned
                self._retire(sequence)
                sequence.deliver(EngineError(str(exc)))
                continue
            if token is not None:
                sampled.append((sequence, token))
        return sampled

    def _prefill(self, sequence: Sequence, chunk: int) -> torch.Tensor | None:
        assert self._runner is not None and sequence.prompt_tensor is not None and sequence.sampler is not None
        start = sequence.prefilled
        logits = self._runner.last_logits(sequence.prompt_tensor[:, start : start + chunk], sequence.cache)
        sequence.prefilled += chunk
        if sequence.prefilling:
            return None  # more prompt to go: nothing to sample yet
        return self._sample(sequence, logits)

    def _decode(self, sequence: Sequence) -> torch.Tensor:
        assert self._runner is not None and sequence.next_input is not None
        return self._sample(sequence, self._runner.last_logits(sequence.next_input, sequence.cache))

    @staticmethod
    def _sample(sequence: Sequence, logits: torch.Tensor) -> torch.Tensor:
        assert sequence.sampler is not None
        token = sequence.sampler(logits)
        sequence.next_input = token.view(1, 1)
        return token

    def _settle(self, sequence: Sequence, token_id: int, now: float) -> None:
        try:
            events = sequence.accept(token_id, now)
        except Exception as exc:  # a host-side bug for this sequence only: never poison the model for it
            log.exception("request %s: turning tokens into text failed", sequence.request_id)
            self._retire(sequence)
            sequence.deliver(EngineError(f"detokenisation failed: {type(exc).__name__}"))
            return
        if sequence.output is not None and sequence.output.done:
            self._retire(sequence)  # before delivering, so in_flight is already down when the consumer sees Finished
        if events:
            sequence.deliver(events)

    def _retire(self, sequence: Sequence) -> None:
        sequence.release()
        if sequence in self._running:
            self._running.remove(sequence)

    def _poison(self, exc: Exception) -> None:
        # Keep only the message: a stored exception would pin the failed frames, and the model with them.
        self._fault = str(exc) if isinstance(exc, DeviceFault) else f"device fault during a forward pass: {exc!r}"
        log.error("model poisoned: %s", self._fault, exc_info=exc)
        for sequence in self._drain_all():
            sequence.deliver(DeviceFault(self._fault))
            sequence.release()

    def _refuse_inbox(self) -> None:
        while self._inbox:
            sequence = self._inbox.popleft()
            sequence.deliver(DeviceFault(self._fault) if self._fault else EngineError("model is unloaded"))

    def _drain_all(self) -> list[Sequence]:
        sequences = [*self._running, *self._waiting]
        while self._inbox:
            sequences.append(self._inbox.popleft())
        self._running, self._waiting = [], deque()
        return sequences

    def _abandon(self) -> None:
        """Worker thread, while it shuts down: nobody will run our steps again."""
        with self._lock:
            self._step_posted = False
        for sequence in self._drain_all():
            sequence.deliver(EngineError("engine is shutting down"))
            sequence.release()

    def _post_next_step(self) -> None:
        with self._lock:
            if not (self._inbox or self._waiting or self._running):
                self._step_posted = False
                return
        try:
            self._worker.post(self._step, abandon=self._abandon)
        except WorkerClosed:
            self._abandon()
