"""Fixtures for gateway tests: real `cortex serve` processes in front of fake (or real) neurons."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_fake_neuron, run_gateway
from tests.support.procs import Daemon, get_json

StartFake = Callable[..., Daemon]
StartGateway = Callable[..., GatewayDaemon]


def models_toml(*models: dict[str, Any], aliases: dict[str, str] | None = None) -> str:
    """A models.toml from dicts (`{"id": "m", "vram_mb": 4000, "pinned_on": ["a"]}`)."""
    lines: list[str] = []
    for model in models:
        lines.append("[[models]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in model.items()]
    if aliases:
        lines.append("[aliases]")
        lines += [f"{json.dumps(alias)} = {json.dumps(target)}" for alias, target in aliases.items()]
    return "\n".join(lines) + "\n"


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


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def chat(
    http: aiohttp.ClientSession, gateway: GatewayDaemon, model: str, **extra: Any
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(model, **extra)) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def fake_log(neuron: Daemon) -> dict[str, Any]:
    return get_json(f"{neuron.url}/_fake/log")


def loads_on(neuron: Daemon) -> list[str]:
    return [entry["model_id"] for entry in fake_log(neuron)["loads"]]


def replica_nodes(gateway: GatewayDaemon, model: str) -> dict[str, str]:
    """{node: status} of `model` as the gateway sees it now."""
    return {n["name"]: m["status"] for n in gateway.state()["nodes"] for m in n["models"] if m["id"] == model}


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0.0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0
