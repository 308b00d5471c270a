"""The keep-alive timer (gateway/keepalive.py): beats while a wait takes long, never otherwise.

No assertion depends on how fast this machine runs: waits end on events, and intervals are either
tiny (a beat is due at once) or far longer than any test (no beat can come).
"""

from __future__ import annotations

import asyncio

import pytest

from cortex.gateway.keepalive import with_keepalive

NEVER_S = 60.0  # an interval no test lasts
SOON_S = 0.01


class Idle:
    def __init__(self, fail_at: int | None = None, enough: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.enough = enough
        self.reached = asyncio.Event()  # set once `enough` keep-alives were written
        self.started = asyncio.Event()  # set when a keep-alive write begins
        self.release = asyncio.Event()  # a write finishes only once set
        self.release.set()
        self.writing = False

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionResetError("the client is gone")
        self.writing = True
        self.started.set()
        await self.release.wait()
        self.writing = False
        if self.enough is not None and self.calls >= self.enough:
            self.reached.set()


async def value_of(event: asyncio.Event, value: str) -> str:
    await event.wait()
    return value


async def test_a_quick_wait_hears_no_keepalive() -> None:
    idle = Idle()
    assert await with_keepalive(asyncio.sleep(0, "done"), NEVER_S, idle) == "done"
    assert idle.calls == 0


async def test_a_long_wait_beats_every_interval_and_at_start_when_asked() -> None:
    idle = Idle(enough=3)
    assert await with_keepalive(value_of(idle.reached, "done"), SOON_S, idle) == "done"
    assert idle.calls >= 3
    idle = Idle()
    assert await with_keepalive(asyncio.sleep(0, "x"), NEVER_S, idle, at_start=True) == "x"
    assert idle.calls == 1


async def test_a_failing_keepalive_ends_the_wait_with_its_error() -> None:
    idle = Idle(fail_at=2)
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(ConnectionResetError):
        await with_keepalive(forever(), SOON_S, idle)
    assert cancelled.is_set()  # the awaitable was ended, not left running
    assert asyncio.current_task().cancelling() == 0  # the beat's cancel is not left on the caller
    assert await with_keepalive(asyncio.sleep(0, "next"), NEVER_S, Idle()) == "next"  # the task goes on normally


async def test_the_result_waits_for_a_keepalive_being_written() -> None:
    idle = Idle()
    idle.release.clear()
    task = asyncio.create_task(with_keepalive(value_of(idle.started, "done"), SOON_S, idle))
    await idle.started.wait()  # the wait is over, but a keep-alive is being written
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    idle.release.set()
    assert await task == "done"
    assert idle.calls == 1 and not idle.writing  # no write of the caller's can interleave with it


async def test_cancelling_the_caller_cancels_the_wait() -> None:
    idle = Idle(enough=1)
    task = asyncio.create_task(with_keepalive(asyncio.Event().wait(), SOON_S, idle))
    await idle.reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    calls = idle.calls
    await asyncio.sleep(SOON_S * 10)
    assert idle.calls == calls  # no beat after the caller left
