"""The neuron's info routes: /version, /discovery, /health, /models, /models/{id}/endpoint."""

from __future__ import annotations

import aiohttp

from tests.neuron.conftest import TINY
from tests.support.procs import Daemon


async def test_version_names_the_stack(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = await (await http.get(f"{neuron.url}/version")).json()
    assert body["version"]
    for key in ("python", "torch", "transformers", "cuda", "git_sha"):
        assert key in body


async def test_discovery_reports_cpu_device_and_why_no_cuda(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = await (await http.get(f"{neuron.url}/discovery")).json()
    assert body["hostname"] and body["kernel"]
    assert body["cuda_available"] is False
    assert "cpu" in body["cuda_reason"].lower()
    [device] = body["devices"]
    assert device["kind"] == "cpu" and device["vram_total_mb"] == 4096


async def test_models_report_measured_memory_and_context(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    models = {m["id"]: m for m in await (await http.get(f"{neuron.url}/models")).json()}
    tiny = models[TINY]
    assert tiny["status"] == "loaded"
    assert tiny["vram_used_mb"] > 0
    assert tiny["limit"]["context"] == 1024
    assert tiny["devices"] == [0]


async def test_health_accounts_models_against_cpu_budget(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    health = await (await http.get(f"{neuron.url}/health")).json()
    models = await (await http.get(f"{neuron.url}/models")).json()
    [device] = health["devices"]
    assert device["vram_used_mb"] == sum(m["vram_used_mb"] for m in models)
    assert device["vram_free_mb"] == 4096 - device["vram_used_mb"]
    entry = next(m for m in health["models"] if m["id"] == TINY)
    assert {"in_flight", "queue_depth", "max_in_flight", "max_queue_depth", "tok_s_decode"} <= entry.keys()


async def test_endpoint_points_at_this_neuron(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = await (await http.get(f"{neuron.url}/models/{TINY}/endpoint")).json()
    assert body["chat_completions"] == f"{neuron.url}/v1/chat/completions"
    missing = await http.get(f"{neuron.url}/models/nope/endpoint")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "model_not_found"
