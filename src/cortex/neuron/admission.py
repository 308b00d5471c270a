"""Per-model admission: a bounded number of sequences in flight, a bounded queue, a bounded wait.

How many run at once: `max_in_flight` when the config sets one (an override), otherwise the model's
own capacity — as many sequences as its KV cache holds (`set_capacity`, from the engine once the
model is loaded). Past any bound the request is refused at once — 429 when the queue is full, 503
when the wait ran out — with Retry-After, never an unbounded wait. A cancelled waiter (client
gone) leaves the queue without taking a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cortex.core.errors import ApiError
from cortex.neuron.config import AdmissionLimits


@dataclass
class AdmissionCounters:
    admitted: int = 0
    rejected_queue_full: int = 0
    rejected_timeout: int = 0


class Admission:
    def __init__(self, model_id: str, limits: AdmissionLimits) -> None:
        self.model_id = model_id
        self.limits = limits
        self.in_flight = 0
        self.counters = AdmissionCounters()
        self.capacity: int | None = None  # derived from the model's KV cache; used when max_in_flight is unset
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is in flight (bound it with `asyncio.timeout`)."""
        await self._idle.wait()

    @property
    def max_in_flight(self) -> int | None:
        """The count that bounds sequences in flight now (None: no count bound, only the KV cache's)."""
        return self.limits.max_in_flight if self.limits.max_in_flight is not None else self.capacity

    def set_capacity(self, capacity: int | None) -> None:
        """The model's capacity in sequences (from its KV cache), once it is loaded; lets waiters in if it grew."""
        self.capacity = capacity
        self._hand_over()

    def _has_room(self) -> bool:
        limit = self.max_in_flight
        return limit is None or self.in_flight < limit

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._has_room() and not self._waiters:
            self._take()
            return
        if len(self._waiters) >= self.limits.max_queue_depth:
            self.counters.rejected_queue_full += 1
            raise ApiError(
                429,
                f"Model '{self.model_id}' is at capacity ({self.in_flight} in flight, "
                f"{len(self._waiters)} queued); retry later",
                type="rate_limit_error",
                code="queue_full",
                retry_after=1.0,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.limits.max_wait_secs)
        except TimeoutError:
            self._abandon(waiter)
            self.counters.rejected_timeout += 1
            raise ApiError(
                503,
                f"Model '{self.model_id}' stayed busy for {self.limits.max_wait_secs:g}s; retry later",
                type="server_error",
                code="queue_timeout",
                retry_after=self.limits.max_wait_secs,
            ) from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            # The slot was handed over just as we gave up: pass it on.
            self._release()
        else:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _take(self) -> None:
        self.in_flight += 1
        self._idle.clear()
        self.counters.admitted += 1

    def _release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)
