"""Per-model admission: a bounded number of sequences in flight, a bounded queue, a bounded wait.

Past any bound the request is refused at once — 429 when the queue is full, 503 when the wait
ran out — with Retry-After, never an unbounded wait. A cancelled waiter (client gone) leaves the
queue without taking a slot.
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
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is in flight (bound it with `asyncio.timeout`)."""
        await self._idle.wait()

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
        if self.in_flight < self.limits.max_in_flight and not self._waiters:
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
        while self._waiters and self.in_flight < self.limits.max_in_flight:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)
