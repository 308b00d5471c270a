"""The keep-alive timer (gateway/keepalive.py): beats while a wait takes long, never otherwise."""

from __future__ import annotations

import asyncio

import pytest

from cortex.gateway.keepalive import with_keepalive


class Idle:
    def __init__(self, fail_at: int | None = None, write_s: float = 0.0) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.write_s = write_s
        self.writing = False

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionResetError("the client is gone")
        self.writing = True
        await asyncio.sleep(self.write_s)
        self.writing = False


async def after(seconds: float, value: str) -> str:
    await asyncio.sleep(seconds)
    return value


async def test_a_quick_wait_hears_no_keepalive() -> None:
    idle = Idle()
    assert await with_keepalive(after(0.01, "done"), 0.2, idle) == "done"
    await asyncio.sleep(0.3)  # nothing beats after the wait is over
    assert idle.calls == 0


async def test_a_long_wait_beats_every_interval_and_at_start_when_asked() -> None:
    idle = Idle()
    assert await with_keepalive(after(0.35, "done"), 0.1, idle) == "done"
    assert 2 <= idle.calls <= 4
    idle = Idle()
    assert await with_keepalive(after(0.01, "x"), 10, idle, at_start=True) == "x"
    assert idle.calls == 1


async def test_a_failing_keepalive_ends_the_wait_with_its_error() -> None:
    idle = Idle(fail_at=2)
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(ConnectionResetError):
        await with_keepalive(forever(), 0.05, idle)
    assert cancelled.is_set()  # the awaitable was ended, not left running
    assert asyncio.current_task().cancelling() == 0  # the beat's cancel is not left on the caller
    assert await with_keepalive(after(0.01, "next"), 0.05, Idle()) == "next"  # and the task goes on normally


async def test_the_result_waits_for_a_keepalive_being_written() -> None:
    idle = Idle(write_s=0.2)
    assert await with_keepalive(after(0.08, "done"), 0.05, idle) == "done"
    assert idle.calls == 1 and not idle.writing  # no write of the caller's can interleave with it


async def test_cancelling_the_caller_cancels_the_wait() -> None:
    idle = Idle()
    task = asyncio.create_task(with_keepalive(after(100, "never"), 0.05, idle))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    calls = idle.calls
    await asyncio.sleep(0.15)
    assert idle.calls == calls  # no beat after the caller left
