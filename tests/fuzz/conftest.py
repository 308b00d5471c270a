"""One real neuron serving a tiny random-weight model and one real gateway in front of it, for the fuzz tests."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_gateway
from tests.support.procs import Daemon, get_json, run_neuron, wait_model_status

SERVED = "tiny"


@dataclass
class FuzzFleet:
    neuron: Daemon
    gateway: GatewayDaemon

    @property
    def bases(self) -> dict[str, str]:
        return {"neuron": self.neuron.url, "gateway": self.gateway.url, "metrics": self.gateway.metrics_url}

    def model_problems(self) -> list[str]:
        """Models that are not plainly loaded and fault-free, as the neuron and the gateway report them."""
        found = []
        for model in get_json(f"{self.neuron.url}/models"):
            if model["status"] in ("poisoned", "recovering") or (model["id"] == SERVED and model["status"] != "loaded"):
                found.append(f"neuron /models: {model['id']} is {model['status']}")
        for model in get_json(f"{self.neuron.url}/health")["models"]:
            if model.get("faults"):
                found.append(f"neuron /health: {model['id']} has {model['faults']} device faults")
        listed: dict[str, Any] = {m["id"]: m for m in get_json(f"{self.gateway.url}/v1/models")["data"]}
        if listed.get(SERVED, {}).get("status") != "loaded":
            found.append(f"gateway /v1/models: {SERVED} is {listed.get(SERVED, {}).get('status')}")
        return found


def neuron_toml(model_dir: Path) -> str:
    return f"""
model_roots = ["{model_dir.parent}"]
[devices]
use = "cpu"
cpu_memory_mb = 4096
[admission]
max_in_flight = 8
max_queue_depth = 1024
max_wait_secs = 120
[[default_models]]
model_id = "{SERVED}"
source = "{model_dir}"
"""


def warm_up(url: str) -> None:
    """Compile the model's JSON grammar now: its first use stalls the neuron for a second or more."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    body["response_format"] = {"type": "json_object"}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        resp.read()


@pytest.fixture(scope="session")
def fuzz_fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[FuzzFleet]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with run_neuron(tmp, neuron_toml(tiny_model)) as neuron:
        wait_model_status(neuron.url, SERVED)
        # A busy CI machine can leave a poll unanswered for seconds; the fuzz run is not about failure detection.
        config = cortex_toml({"real": neuron.url}, models_config=None, unhealthy_after=3).replace(
            "timeout_s = 2\n", "timeout_s = 15\n", 1
        )
        warm_up(neuron.url)
        with run_gateway(tmp, config, wait_healthy=1) as gateway:
            yield FuzzFleet(neuron, gateway)


@pytest.fixture
async def fuzz_http() -> AsyncIterator[aiohttp.ClientSession]:
    # One pool for the whole run; the client neither decompresses nor adds headers of its own.
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session
