"""Every routing rule once more, with real `neuron serve` processes and tiny models on CPU.

CPU neurons report one "cpu" device whose memory is a configured budget, so placement and
eviction behave as on GPUs: a tiny model measures ~24 MB (its weights and the packed copy of its
tied head), neuron `a` has room for three and neuron `b` for one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_client import (
    StartGateway,
    chat,
    chat_body,
    metric_value,
    models_toml,
    read_events,
    replica_nodes,
)
from tests.support.gateway_procs import eventually, wait_until
from tests.support.procs import Daemon, free_port, get_json, run_neuron

TINY_MB = 24  # 12 MiB of weights + the oneDNN-packed copy of its tied head (cpu_linear.py)


def neuron_toml(root: Path, budget_mb: int) -> str:
    return f"""
default_models = []
model_roots = ["{root}"]
fault_injection = true
[devices]
use = "cpu"
cpu_memory_mb = {budget_mb}
"""


def tiny_catalogue(tiny: Path, *ids: str, **fields: dict[str, Any]) -> str:
    return models_toml(*({"id": i, "source": str(tiny), "vram_mb": TINY_MB, **fields.get(i, {})} for i in ids))


@pytest.fixture(scope="module")
def neurons(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[dict[str, Daemon]]:
    tmp = tmp_path_factory.mktemp("real-neurons")
    root = tiny_model.parent.parent
    with run_neuron(tmp, neuron_toml(root, 80)) as a, run_neuron(tmp, neuron_toml(root, 40)) as b:
        yield {"a": a, "b": b}


@pytest.fixture(autouse=True)
def empty_neurons(neurons: dict[str, Daemon]) -> Iterator[None]:
    """Each test starts with nothing loaded anywhere."""
    yield
    for daemon in neurons.values():
        for model in get_json(f"{daemon.url}/models"):
            with contextlib.suppress(OSError):
                _post(f"{daemon.url}/models/unload", {"model_id": model["id"]})
        wait_until(lambda d=daemon: get_json(f"{d.url}/models") == [], timeout=30)


def _post(url: str, body: dict[str, Any]) -> Any:
    import json
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def models_on(daemon: Daemon) -> dict[str, str]:
    return {m["id"]: m["status"] for m in get_json(f"{daemon.url}/models")}


def admitted(daemon: Daemon, model: str) -> int:
    return next(m["admitted"] for m in get_json(f"{daemon.url}/health")["models"] if m["id"] == model)


async def test_cold_load_then_route_to_the_loaded_replica(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http
) -> None:
    gateway = start_gateway(neurons, tiny_catalogue(tiny_model, "t1"))
    status, body, _ = await chat(http, gateway, "t1", max_tokens=4)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1
    assert models_on(neurons["a"]) == {"t1": "loaded"}  # most free memory: a
    assert models_on(neurons["b"]) == {}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("t1", stream=True, max_tokens=4)) as r:
        events = await read_events(r)
    assert events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and e.get("usage") for e in events)  # asked for by us, stripped
    text = gateway.metrics()
    assert metric_value(text, "cortex_cold_starts_total", model="t1", node="a") == 1
    assert metric_value(text, "cortex_requests_total", model="t1", node="a") == 2
    assert metric_value(text, "cortex_completion_tokens_total", model="t1", node="a") >= 2
    assert metric_value(text, "cortex_time_to_first_token_seconds_count", model="t1", node="a") == 1
    state = gateway.state()
    assert state["catalogue"][0]["measured_vram_mb"] == TINY_MB


async def test_least_busy_spreads_requests_over_replicas(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http
) -> None:
    gateway = start_gateway(neurons, tiny_catalogue(tiny_model, "t1"))
    for node in ("a", "b"):
        async with http.post(f"{gateway.url}/admin/load", json={"model": "t1", "node": node}) as resp:
            assert resp.status == 202
    await eventually(lambda: replica_nodes(gateway, "t1") == {"a": "loaded", "b": "loaded"})
    before = {name: admitted(d, "t1") for name, d in neurons.items()}
    for i in range(4):  # distinct conversations: no prefix affinity between them
        messages = [{"role": "user", "content": f"question {i}"}]
        assert (await chat(http, gateway, "t1", max_tokens=2, messages=messages))[0] == 200
    assert {name: admitted(d, "t1") - before[name] for name, d in neurons.items()} == {"a": 2, "b": 2}


async def test_concurrent_requests_for_a_cold_model_share_one_load(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http
) -> None:
    gateway = start_gateway(neurons, tiny_catalogue(tiny_model, "t2"))
    results = await asyncio.gather(*(chat(http, gateway, "t2", max_tokens=2) for _ in range(4)))
    assert [r[0] for r in results] == [200] * 4
    text = gateway.metrics()
    assert sum(metric_value(text, "cortex_cold_starts_total", model="t2", node=n) for n in ("a", "b")) == 1


async def test_cold_load_target_is_a_node_where_it_fits_free(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http
) -> None:
    # b is full (one tiny model); a has room: the new model goes to a, nothing is evicted.
    gateway = start_gateway(neurons, tiny_catalogue(tiny_model, "t1", "t2", t1={"pinned_on": ["b"]}))
    assert (await chat(http, gateway, "t1", max_tokens=2))[0] == 200
    assert models_on(neurons["b"]) == {"t1": "loaded"}  # pinned node first, though a has more room
    assert (await chat(http, gateway, "t2", max_tokens=2))[0] == 200
    assert models_on(neurons["a"]) == {"t2": "loaded"}
    assert models_on(neurons["b"]) == {"t1": "loaded"}


@pytest.mark.parametrize("strategy", ["lru", "priority"])
async def test_eviction_strategies(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http, strategy: str
) -> None:
    b = neurons["b"]  # room for one tiny model
    prios = {"t1": {"residency_priority": 5}, "t2": {"residency_priority": 1}, "t3": {"residency_priority": 5}}
    gateway = start_gateway({"b": b}, tiny_catalogue(tiny_model, "t1", "t2", "t3", **prios), strategy=strategy)
    assert (await chat(http, gateway, "t1", max_tokens=2))[0] == 200
    status, body, _ = await chat(http, gateway, "t2", max_tokens=2)
    if strategy == "priority":  # t2 may not displace the higher-priority t1
        assert (status, body["error"]["code"]) == (503, "no_capacity")
        assert models_on(b) == {"t1": "loaded"}
    else:
        assert status == 200
        assert models_on(b) == {"t2": "loaded"}
    assert (await chat(http, gateway, "t3", max_tokens=2))[0] == 200
    assert models_on(b) == {"t3": "loaded"}
    evicted = "t1" if strategy == "priority" else "t2"
    assert metric_value(gateway.metrics(), "cortex_evictions_total", model=evicted, node="b") == 1


async def test_pinned_models_load_by_themselves_and_are_never_evicted(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http
) -> None:
    b = neurons["b"]
    catalogue = tiny_catalogue(tiny_model, "t1", "t2", t1={"pinned_on": ["b"]})
    gateway = start_gateway({"b": b}, catalogue, preload_pinned=True)
    await eventually(lambda: models_on(b) == {"t1": "loaded"} and gateway.state()["loads"] == [])
    status, body, _ = await chat(http, gateway, "t2", max_tokens=2)
    assert (status, body["error"]["code"]) == (503, "no_capacity")
    assert "t1 is pinned" in body["error"]["message"]


async def test_min_residency_prevents_thrash(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http
) -> None:
    b = neurons["b"]
    gateway = start_gateway({"b": b}, tiny_catalogue(tiny_model, "t1", "t2"), min_residency_s=60)
    assert (await chat(http, gateway, "t1", max_tokens=2))[0] == 200
    status, body, headers = await chat(http, gateway, "t2", max_tokens=2)
    assert (status, body["error"]["code"]) == (503, "no_capacity")
    assert int(headers["Retry-After"]) > 1
    assert models_on(b) == {"t1": "loaded"}


async def test_recovering_model_gets_503_without_a_duplicate_load(
    neurons: dict[str, Daemon], start_gateway: StartGateway, tiny_model: Path, http
) -> None:
    a = neurons["a"]
    gateway = start_gateway(neurons, tiny_catalogue(tiny_model, "t1"), poll_interval_s=0.05)
    assert (await chat(http, gateway, "t1", max_tokens=2))[0] == 200
    _post(f"{a.url}/admin/fault", {"model_id": "t1", "count": 1})
    # The faulting request itself waits for the recovery (no output had gone out) and is served then.
    faulting = asyncio.create_task(chat(http, gateway, "t1", max_tokens=2))
    await eventually(lambda: replica_nodes(gateway, "t1").get("a") != "loaded")
    seen: list[tuple[int, str | None]] = []
    while not faulting.done() or not seen:
        status, _, headers = await chat(http, gateway, "t1", max_tokens=2)
        seen.append((status, headers.get("Retry-After")))
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert (await faulting)[0] == 200
    assert any(s == 503 and retry for s, retry in seen), seen
    # Refused by the gateway itself (no node chosen), from the status it polled:
    assert "node=- stream=False" in gateway.log() and "error=model_recovering" in gateway.log()
    assert models_on(neurons["b"]) == {}  # never loaded a second copy while a recovered
    await eventually(lambda: replica_nodes(gateway, "t1") == {"a": "loaded"})  # the gateway's view, one poll later
    assert (await chat(http, gateway, "t1", max_tokens=2))[0] == 200


async def test_unknown_model_is_404(neurons: dict[str, Daemon], start_gateway: StartGateway, http) -> None:
    gateway = start_gateway(neurons)
    status, body, _ = await chat(http, gateway, "nope")
    assert (status, body["error"]["code"]) == (404, "model_not_found")


async def test_failover_when_a_neuron_is_killed_and_recovery_when_it_returns(
    tmp_path: Path, tiny_model: Path, start_gateway: StartGateway, http, stack: contextlib.ExitStack
) -> None:
    root = tiny_model.parent.parent
    port = free_port()
    c = stack.enter_context(run_neuron(tmp_path, neuron_toml(root, 80), port=port))
    d = stack.enter_context(run_neuron(tmp_path, neuron_toml(root, 80)))
    catalogue = tiny_catalogue(tiny_model, "t1", "t2", t2={"pinned_on": ["c"]})
    gateway = start_gateway({"c": c, "d": d}, catalogue, poll_interval_s=0.5)
    assert (await chat(http, gateway, "t2", max_tokens=2))[0] == 200
    assert models_on(c) == {"t2": "loaded"}  # pinned there
    c.kill()
    status, body, _ = await chat(http, gateway, "t2", max_tokens=2)
    assert status == 200, body  # failed over: cold-loaded on d
    assert models_on(d) == {"t2": "loaded"}
    assert not get_json(f"{gateway.url}/health")["neurons"]["c"]["healthy"]
    stack.enter_context(run_neuron(tmp_path, neuron_toml(root, 80), port=port))  # c comes back
    await eventually(lambda: get_json(f"{gateway.url}/health")["neurons"]["c"]["healthy"], timeout=60)
    assert (await chat(http, gateway, "t1", max_tokens=2))[0] == 200  # placed on the returned node too
    assert models_on(c) == {"t1": "loaded"}
