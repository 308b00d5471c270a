"""The one keep-alive timer: await something, and say something to the client while it takes long.

Used while a request waits for a cold load (router.py) and while a translated stream waits for
its next chunk (dialects): whatever the wait, an idle client hears from the gateway every
`gateway.keepalive_interval_s`, so no client or proxy in between times the request out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

OnIdle = Callable[[], Awaitable[None]]


async def with_keepalive(awaitable: Awaitable[T], interval: float, on_idle: OnIdle, *, at_start: bool = False) -> T:
    """The awaitable's result; `on_idle` is awaited (at once when `at_start`) after every `interval` without it.

    The awaitable runs in the caller's task and a timer beats beside it, so a wait that ends
    before the first beat (most of them: this wraps every chunk of a translated stream) costs a
    timer, not a task. The beat never cancels the wait (cancelling an upstream read would break
    it), but if `on_idle` raises, that ends the wait with its exception. A wait that ends
    waits for a keep-alive being written, so the caller's next write never interleaves with it.
    """
    if at_start:
        await on_idle()
    beat = _Beat(interval, on_idle)
    try:
        result = await awaitable
    except BaseException as exc:
        beat.abandon()
        if isinstance(exc, asyncio.CancelledError) and beat.failure is not None:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]  # the beat's cancel, not the caller's
            raise beat.failure from None
        raise
    await beat.finish()
    return result


class _Beat:
    """Awaits `on_idle` every `interval` (counted from the end of the last) until stopped."""

    def __init__(self, interval: float, on_idle: OnIdle) -> None:
        self.loop = asyncio.get_running_loop()
        self.waiter = asyncio.current_task()
        self.interval = interval
        self.on_idle = on_idle
        self.failure: BaseException | None = None
        self.writing: asyncio.Task[None] | None = None
        self.waiting = True
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(interval, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.writing = self.loop.create_task(_call(self.on_idle))
        self.writing.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self.writing = None
        if task.cancelled() or not self.waiting:
            return
        error = task.exception()
        if error is None:
            self.timer = self.loop.call_later(self.interval, self._fire)
        elif self.waiter is not None:
            self.failure = error
            self.waiter.cancel()  # the caller is suspended in the awaitable: the wait ends there

    def abandon(self) -> None:
        """The wait failed: stop beating, and stop a keep-alive being written."""
        self.waiting = False
        if self.timer is not None:
            self.timer.cancel()
        if self.writing is not None:
            self.writing.cancel()

    async def finish(self) -> None:
        """The wait is over: stop beating, and let a keep-alive being written finish first."""
        self.waiting = False
        if self.timer is not None:
            self.timer.cancel()
        if self.writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.writing)


async def _call(on_idle: OnIdle) -> None:
    await on_idle()
