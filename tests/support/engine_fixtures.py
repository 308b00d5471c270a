"""The engine fixture the in-process engine tests share: one CPU engine per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from cortex.neuron.engine import Engine


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine() -> AsyncIterator[Engine]:
    engine = Engine(["cpu"])
    yield engine
    engine.close()
