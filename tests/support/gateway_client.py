"""Talking to a gateway under test: request bodies, calls, and reading back what the fakes and metrics saw."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from tests.support.gateway_procs import GatewayDaemon
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


async def read_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """Every SSE event: comments as ':…' strings, data as decoded JSON or '[DONE]'."""
    events: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            events.append(line)
        elif line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events
