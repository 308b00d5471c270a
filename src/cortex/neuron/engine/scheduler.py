"""One scheduler per loaded model: it alone runs the model's forwards, one step at a time.

A step is one job on the device worker, so other work for the device (loads, other models' steps)
interleaves between steps. Each step:

1. admits waiting sequences while the KV pool has blocks for their prompt (reusing cached prefix
   blocks), in arrival order, and drops cancelled ones (their blocks go back to the pool);
2. gives every decoding sequence a slot for its next token, preempting the youngest running sequence
   when the pool is full (it goes back to the front of the queue and is recomputed later, never dropped);
3. runs ONE forward over a packed batch (built and run by step.py): one token per decoding sequence,
   then prefill chunks of the others within a per-step token budget, so a long prompt never stalls
   running streams for more than one step;
4. samples all rows that reached the end of their known tokens in one vectorised pass, copies the
   sampled tokens to the host in one transfer (the only sync of the step), and turns them into text
   events on the host, handed to the event loop.

Any exception from a forward except `EngineError` is a device fault: every sequence of the model gets
`DeviceFault` and the scheduler refuses new work until the model is reloaded. An `EngineError` from
a batched forward is narrowed down by re-running each sequence's part alone: only the sequences whose
part fails get the error.
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

from .blocks import BlockManager
from .grammar import CompiledGrammar, Grammar, compiler_for, json_object, warm_up
from .logprobs import MAX_TOP_LOGPROBS
from .runner import ModelRunner
from .sampling import validate_sampling
from .sequence import Delivery, Sequence, deliver_many
from .step import StepExecutor, Work
from .types import DeviceFault, EngineError, GenerationRequest
from .worker import DeviceWorker, WorkerClosed

log = logging.getLogger(__name__)

MAX_RUNNING = 256  # a sanity cap on one batch; the KV pool is the real bound
MIN_PREFILL_TOKENS = 16  # prefill makes progress even when decode rows use up the step budget


@dataclass(frozen=True)
class SchedulerOptions:
    max_active: int | None = None  # optional cap on running sequences; None: as many as the KV pool holds
    step_tokens: int = 256  # tokens computed per step: one per decoding sequence plus prefill chunks


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
        blocks: BlockManager,
        tokenizer: Any,
        eos_ids: frozenset[int],
        context_length: int,
        options: SchedulerOptions,
    ) -> None:
        self._worker = worker
        self._runner: ModelRunner | None = runner
        self.blocks = blocks
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._context_length = context_length
        self._options = options
        self._vocab = runner.vocab_size
        self._steps = StepExecutor(runner.device, blocks, tokenizer)  # packs, runs and samples each step
        warm_up(tokenizer, eos_ids, self._vocab)  # the grammar compiler for this vocabulary, off the loop
        self._inbox: deque[Sequence] = deque()  # loop → worker hand-over (deque append/popleft are atomic)
        self._waiting: deque[Sequence] = deque()  # worker only: not holding blocks (new or preempted)
        self._running: list[Sequence] = []  # worker only: holding blocks, in admission order (youngest last)
        self._lock = threading.Lock()  # guards `_step_posted`
        self._step_posted = False
        self._fault: str | None = None  # message of the device fault that poisoned the model
        self._closed = False
        self.rate = DecodeRate()
        self.steps = 0
        self.preemptions = 0

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
        self._check_usable()
        prompt = request.prompt_ids
        if not prompt:
            raise EngineError("prompt is empty")
        if len(prompt) >= self._context_length:
            raise EngineError(f"prompt is {len(prompt)} tokens; the model's context is {self._context_length}")
        vocab = self._vocab
        bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"token id {bad!r} is out of range: the model's vocabulary is [0, {vocab})")
        if self.blocks.blocks_for(len(prompt) + 1) > self.blocks.usable_blocks:
            raise EngineError(
                f"prompt is {len(prompt)} tokens; the model's KV cache holds "
                f"{self.blocks.usable_blocks * self.blocks.block_size}"
            )
        validate_sampling(request.sampling)
        if request.sampling.logprobs is not None and not 0 <= request.sampling.logprobs <= MAX_TOP_LOGPROBS:
            raise EngineError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        self._compile_constraint(request)
        return min(request.sampling.max_new_tokens, self._context_length - len(prompt))

    def _compile_constraint(self, request: GenerationRequest) -> None:
        """Compile the request's grammar for this model (cached); EngineError if it does not compile."""
        grammar = request.constraint
        if grammar is None and request.sampling.json_object:
            grammar = json_object()
        if grammar is None or isinstance(grammar, CompiledGrammar):
            return
        if not isinstance(grammar, Grammar):
            raise EngineError("constraint must be a grammar")
        compiler = compiler_for(self._tokenizer, self._eos_ids, self._vocab)
        request.constraint = compiler.compile(grammar)

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineError("model is unloaded")
        if self._fault is not None:
            raise DeviceFault(self._fault)

    def open(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, budget: int | None = None) -> Sequence:
        """Queue `request`. `budget` is what `validate` returned for it: a validated request is not checked
        again, only whether the model is still usable (it may have been unloaded or poisoned since)."""
        if budget is None:
            budget = self.validate(request)
        else:
            self._check_usable()
        sequence = Sequence(request, budget, loop)
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
        self._steps.release()

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
        for sequence in [s for s in self._running if s.cancelled]:
            self._retire(sequence)
        for sequence in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(sequence)
            sequence.release()
        assert self._runner is not None
        limit = min(self._options.max_active or MAX_RUNNING, MAX_RUNNING)
        while self._waiting and len(self._running) < limit:
            sequence = self._waiting[0]
            if not self._allocate(sequence):
                if not self._running:  # alone and still too big: it can never run
                    self._waiting.popleft()
                    sequence.deliver(EngineError("the sequence no longer fits in the model's KV cache"))
                    sequence.release()
                    continue
                break  # the pool is full: wait for blocks to come back (arrival order is kept)
            self._waiting.popleft()
            self._running.append(sequence)  # first, so a failure below still reaches its consumer
            if not sequence.started:
                sequence.start(self._runner.device, self._tokenizer, self._eos_ids, self._vocab)

    def _allocate(self, sequence: Sequence) -> bool:
        reused = self.blocks.allocate(sequence.table, sequence.tokens)
        self._zero_fresh_blocks()
        if reused is None:
            return False
        sequence.computed = reused
        if sequence.admissions == 0:
            sequence.cached_tokens = reused
        sequence.admissions += 1
        return True

    def _zero_fresh_blocks(self) -> None:
        if self.blocks.fresh_blocks and self._runner is not None and self._runner.kv is not None:
            self._runner.kv.zero_blocks(self.blocks.fresh_blocks)
        self.blocks.fresh_blocks.clear()

    def _advance(self) -> None:
        started = perf_counter()
        work = self._plan()
        if not work:
            return
        try:
            with torch.inference_mode():
                outcomes = self._execute(work)
        except Exception as exc:  # a forward failed: the device state of this model is suspect
            self._poison(exc)
            return
        now = perf_counter()
        decoded = 0
        outbox: list[tuple[Sequence, Delivery]] = []  # this step's events, handed to the loop at once
        for item, outcome in outcomes:
            sequence = item.sequence
            if isinstance(outcome, EngineError):  # this request's fault: it alone fails, nothing is poisoned
                self._retire(sequence)
                sequence.deliver(EngineError(str(outcome)))
                continue
            sequence.computed = item.start + item.count
            self.blocks.register(sequence.table, sequence.tokens, sequence.computed)
            if outcome is not None:
                decoded += 1 if sequence.output is not None and sequence.output.generated >= 1 else 0
                self._settle(sequence, outcome, now, outbox)
        deliver_many(outbox)
        self.rate.record(decoded, now - started)

    def _plan(self) -> list[Work]:
        """This step's work: a slot for every decoding sequence (preempting if need be), then prefill chunks."""
        for sequence in list(self._running):
            if sequence not in self._running or sequence.pending != 1:
                continue
            while not self.blocks.append_slot(sequence.table, len(sequence.tokens)):
                self._zero_fresh_blocks()
                victim = self._running[-1]  # the youngest gives way
                self._preempt(victim)
                if victim is sequence:
                    break
        self._zero_fresh_blocks()
        work = [Work(s, s.computed, 1) for s in self._running if s.pending == 1]
        budget = max(self._options.step_tokens - len(work), MIN_PREFILL_TOKENS)
        for sequence in self._running:
            if budget <= 0:
                break
            if sequence.pending > 1:
                count = min(budget, sequence.pending)
                budget -= count
                work.append(Work(sequence, sequence.computed, count))
        return work

    def _preempt(self, sequence: Sequence) -> None:
        self.blocks.free(sequence.table)
        sequence.computed = 0
        self._running.remove(sequence)
        self._waiting.appendleft(sequence)
        self.preemptions += 1
        log.info("request %s preempted (KV cache full); it resumes when blocks free up", sequence.request_id)

    def _execute(self, work: list[Work]) -> list[tuple[Work, int | EngineError | None]]:
        """Forward + sample: each item's sampled token id (None if it did not sample), or its EngineError."""
        try:
            assert self._runner is not None
            tokens = self._steps.run(self._runner, work)
        except EngineError as exc:
            if len(work) == 1:
                return [(work[0], exc)]
            # Whose fault? Re-run each part alone (rewriting the same KV slots is harmless).
            return [outcome for item in work for outcome in self._execute([item])]
        return list(zip(work, tokens, strict=True))

    def _settle(self, sequence: Sequence, token_id: int, now: float, outbox: list[tuple[Sequence, Delivery]]) -> None:
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
            outbox.append((sequence, events))

    def _retire(self, sequence: Sequence) -> None:
        self.blocks.free(sequence.table)
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
        for sequence in self._running:
            self.blocks.free(sequence.table)
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
