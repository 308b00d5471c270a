"""A real neuron process serving tiny models, shared by the neuron API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.engine_fixtures import engine  # noqa: F401  (fixture)
from tests.support.procs import Daemon, run_neuron, wait_model_status

TINY = "tiny"
NARROW = "tiny-narrow"  # admission limits of 1 in flight, 1 queued, 0.5 s wait
FAULTY = "tiny-faulty"  # poisoned on purpose by the fault tests
TOOLS = "tiny-tools"


def neuron_toml(tiny: Path, tiny_tools: Path) -> str:
    root = tiny.parent.parent
    return f"""
model_roots = ["{root}"]
fault_injection = true
[devices]
use = "cpu"
cpu_memory_mb = 4096
[admission]
max_in_flight = 8
[admission.models."{NARROW}"]
max_in_flight = 1
max_queue_depth = 1
max_wait_secs = 0.5
[[default_models]]
model_id = "{TINY}"
source = "{tiny}"
[[default_models]]
model_id = "{NARROW}"
source = "{tiny}"
[[default_models]]
model_id = "{FAULTY}"
source = "{tiny}"
[[default_models]]
model_id = "{TOOLS}"
source = "{tiny_tools}"
"""


@pytest.fixture(scope="session")
def neuron(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_tool_model: Path) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("neuron")
    with run_neuron(tmp, neuron_toml(tiny_model, tiny_tool_model)) as daemon:
        for model in (TINY, NARROW, FAULTY, TOOLS):
            wait_model_status(daemon.url, model)
        yield daemon


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session
