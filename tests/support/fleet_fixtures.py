"""Fixtures for tests against a small fleet: fake neurons behind a real `cortex serve`, and a client session.

A folder's conftest.py imports the ones it uses; each daemon is stopped when its test ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway_client import StartFake, StartGateway
from tests.support.gateway_procs import cortex_toml, run_fake_neuron, run_gateway
from tests.support.procs import Daemon


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as exits:
        yield exits


@pytest.fixture
def start_fake(stack: contextlib.ExitStack, tmp_path: Path) -> StartFake:
    """Start a fake neuron: `start_fake("a", devices=[...], preloaded=[...], ...)` (see fake_neuron.py)."""

    def start(name: str, *, port: int | None = None, **spec: Any) -> Daemon:
        return stack.enter_context(run_fake_neuron(tmp_path, {"name": name, **spec}, port=port))

    return start


@pytest.fixture
def start_gateway(stack: contextlib.ExitStack, tmp_path: Path) -> StartGateway:
    """Start a gateway over `neurons` ({name: daemon}) with a catalogue; keyword args go to cortex_toml."""

    def start(neurons: dict[str, Daemon], models: str = "", *, env: dict[str, str] | None = None, **config: Any):
        toml = cortex_toml({name: d.url for name, d in neurons.items()}, **config)
        gateway = run_gateway(tmp_path, toml, models, env=env, wait_healthy=len(neurons))
        return stack.enter_context(gateway)

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session
