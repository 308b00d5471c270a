"""Load and unload through the HTTP API: single flight, progress, clear failures, freed memory."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.procs import Daemon, run_neuron, wait_model_status


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    root = tmp_path_factory.mktemp("roots")
    shutil.copytree(tiny_model, root / "good")
    (root / "empty").mkdir()
    weird = root / "weird"
    shutil.copytree(tiny_model, weird)
    config = json.loads((weird / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    config["architectures"] = ["NoSuchForCausalLM"]
    (weird / "config.json").write_text(json.dumps(config))
    pickled = root / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return root


@pytest.fixture(scope="module")
def bare_neuron(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Daemon]:
    config = f'default_models = []\nmodel_roots = ["{models_root}"]\ntoken = "s3cret"\n'
    config += '[devices]\nuse = "cpu"\ncpu_memory_mb = 40\n'
    with run_neuron(tmp_path_factory.mktemp("bare"), config) as daemon:
        yield daemon


AUTH = {"Authorization": "Bearer s3cret"}
wait_status = functools.partial(wait_model_status, headers=AUTH)  # every route but /health and /version needs it


async def load(http: aiohttp.ClientSession, url: str, model_id: str, source: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/models/load", json={"model_id": model_id, "source": source}, headers=AUTH) as r:
        return r.status, await r.json()


async def models(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in await (await http.get(f"{url}/models", headers=AUTH)).json()}


async def test_lifecycle_calls_need_the_token(bare_neuron: Daemon, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{bare_neuron.url}/models/load", json={"model_id": "x"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models"),
        ("GET", "/discovery"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/tokenize"),
        ("POST", "/admin/defragment"),
        ("GET", "/models/x/endpoint"),
        ("GET", "/nope"),
    ],
)
async def test_every_route_but_health_and_version_needs_the_bearer_token(
    bare_neuron: Daemon, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer x"}):
        async with http.request(method, bare_neuron.url + path, json={}, headers=headers) as resp:
            assert resp.status == 401, (headers, await resp.text())
            assert (await resp.json())["error"]["code"] == "invalid_token"
    async with http.request(method, bare_neuron.url + path, json={}, headers=AUTH) as resp:
        assert resp.status != 401
    for open_path in ("/health", "/version"):
        async with http.get(bare_neuron.url + open_path) as resp:
            assert resp.status == 200


async def test_load_is_single_flight_and_unload_frees(
    bare_neuron: Daemon, http: aiohttp.ClientSession, models_root: Path
) -> None:
    url, source = bare_neuron.url, str(models_root / "good")
    replies = await asyncio.gather(*(load(http, url, "good", source) for _ in range(4)))
    assert {status for status, _ in replies} <= {200, 202}
    entry = await asyncio.to_thread(wait_status, url, "good")
    assert entry["vram_used_mb"] > 0
    text = (await (await http.get(f"{url}/health")).json())["devices"][0]
    assert text["vram_used_mb"] == entry["vram_used_mb"]
    async with http.post(f"{url}/models/unload", json={"model_id": "good"}, headers=AUTH) as resp:
        assert resp.status == 200
        assert (await resp.json())["freed_mb"] >= entry["vram_used_mb"] - 1
    assert "good" not in await models(http, url)
    device = (await (await http.get(f"{url}/health")).json())["devices"][0]
    assert device["vram_used_mb"] == 0
    async with http.post(
        f"{url}/v1/chat/completions",
        json={"model": "good", "messages": [{"role": "user", "content": "x"}]},
        headers=AUTH,
    ) as r:
        assert r.status == 404


@pytest.mark.parametrize(
    ("model_id", "folder", "reason"),
    [
        ("empty", "empty", "missing_files"),
        ("weird", "weird", "unsupported_architecture"),
        ("pickled", "pickled", "forbidden"),
    ],
)
async def test_failed_load_leaves_clear_entry(
    bare_neuron: Daemon, http: aiohttp.ClientSession, models_root: Path, model_id: str, folder: str, reason: str
) -> None:
    await load(http, bare_neuron.url, model_id, str(models_root / folder))
    entry = await asyncio.to_thread(wait_status, bare_neuron.url, model_id, "failed")
    assert entry["error"]["reason"] == reason
    assert "Traceback" not in entry["error"]["message"]


async def test_model_over_cpu_budget_fails_out_of_memory(
    bare_neuron: Daemon, http: aiohttp.ClientSession, models_root: Path
) -> None:
    url, source = bare_neuron.url, str(models_root / "good")
    await load(http, url, "first", source)
    await asyncio.to_thread(wait_status, url, "first")
    await load(http, url, "second", source)  # a 40 MiB budget holds one tiny model, not more
    entry = await asyncio.to_thread(wait_status, url, "second", "failed")
    assert entry["error"]["reason"] == "out_of_memory"
    await http.post(f"{url}/models/unload", json={"model_id": "first"}, headers=AUTH)


async def test_paths_outside_model_roots_are_refused(bare_neuron: Daemon, http: aiohttp.ClientSession) -> None:
    status, body = await load(http, bare_neuron.url, "etc", "/etc")
    assert status == 403
    assert body["error"]["code"] == "path_not_allowed"


async def test_missing_hub_model_offline_fails_clearly(bare_neuron: Daemon, http: aiohttp.ClientSession) -> None:
    status, _ = await load(http, bare_neuron.url, "org/does-not-exist", "org/does-not-exist")
    assert status == 202
    entry = await asyncio.to_thread(wait_status, bare_neuron.url, "org/does-not-exist", "failed")
    assert entry["error"]["reason"] in ("missing_files", "error")
    assert entry["error"]["message"]
