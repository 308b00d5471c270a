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

    The timer never cancels the wait (cancelling an upstream read would break it); leaving early
    (the client went away, `on_idle` raised) cancels it. If `on_idle` raises, that ends the wait.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        if at_start:
            await on_idle()
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            await on_idle()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
