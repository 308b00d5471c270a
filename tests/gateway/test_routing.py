"""Routing (docs/gateway.md, "Routing a request") through a real gateway process over fake neurons."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.gateway_client import (
    StartFake,
    StartGateway,
    chat,
    chat_body,
    fake_log,
    loads_on,
    models_toml,
    replica_nodes,
)
from tests.support.gateway_procs import eventually
from tests.support.procs import get_json

GPU = [{"vram_total_mb": 10000}]


async def test_least_busy_replica_wins(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    b = start_fake("b", devices=GPU, preloaded=["m"])
    gateway = start_gateway({"a": a, "b": b})
    # b is busy with other gateways' requests (as its /health says): everything goes to a.
    async with http.post(f"{b.url}/_fake/set", json={"in_flight": {"m": 3}}):
        pass
    await asyncio.sleep(0.5)  # two poll intervals
    answers = [(await chat(http, gateway, "m"))[1]["choices"][0]["message"]["content"] for _ in range(4)]
    assert answers == ["hello from a"] * 4
    # Equally idle replicas share the work (distinct conversations: no prefix affinity between them).
    async with http.post(f"{b.url}/_fake/set", json={"in_flight": {"m": 0}}):
        pass
    await asyncio.sleep(0.5)
    answers = set()
    for i in range(4):
        _, body, _ = await chat(http, gateway, "m", messages=[{"role": "user", "content": f"question {i}"}])
        answers.add(body["choices"][0]["message"]["content"])
    assert answers == {"hello from a", "hello from b"}


async def test_a_conversation_returns_to_the_replica_that_served_its_prefix(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    b = start_fake("b", devices=GPU, preloaded=["m"])
    gateway = start_gateway({"a": a, "b": b})
    system = {"role": "system", "content": "You plan trips."}
    history = [system, {"role": "user", "content": "Plan a week in Rome."}]
    _, first, _ = await chat(http, gateway, "m", messages=history)
    served = first["choices"][0]["message"]["content"]
    for turn in range(3):
        # Each later turn of the conversation starts with the same tools, system and first message.
        history = [*history, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": f"More {turn}"}]
        _, reply, _ = await chat(http, gateway, "m", messages=history)
        assert reply["choices"][0]["message"]["content"] == served
    # Another conversation has no affinity: it goes to the least recently used of the idle replicas.
    _, other, _ = await chat(http, gateway, "m", messages=[system, {"role": "user", "content": "Plan Oslo."}])
    assert other["choices"][0]["message"]["content"] != served
    # A different tool list is a different prefix too (it is rendered before the messages).
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    _, tooled, _ = await chat(http, gateway, "m", messages=history[:2], tools=tools)
    assert tooled["choices"][0]["message"]["content"] == served  # the least recently used again


async def test_a_model_loaded_elsewhere_is_routed_there_not_loaded_twice(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    b = start_fake("b", devices=[{"vram_total_mb": 80000}])
    gateway = start_gateway({"a": a, "b": b}, models_toml({"id": "m", "vram_mb": 4000}))
    status, body, _ = await chat(http, gateway, "m")
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "hello from a"
    assert loads_on(a) == loads_on(b) == []


async def test_recovering_model_gets_503_with_retry_after_and_no_duplicate_load(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    b = start_fake("b", devices=GPU)
    gateway = start_gateway({"a": a, "b": b}, models_toml({"id": "m", "vram_mb": 4000}))
    async with http.post(f"{a.url}/_fake/set", json={"status": {"m": "recovering"}}):
        pass
    await eventually(lambda: replica_nodes(gateway, "m") == {"a": "recovering"})
    status, body, headers = await chat(http, gateway, "m")
    assert status == 503
    assert body["error"]["code"] == "model_recovering"
    assert int(headers["Retry-After"]) >= 1
    assert loads_on(b) == []


async def test_cold_load_prefers_free_memory_over_eviction(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["old"], sizes={"old": 8000})
    b = start_fake("b", devices=GPU)
    catalogue = models_toml({"id": "old", "vram_mb": 8000}, {"id": "new", "vram_mb": 4000})
    gateway = start_gateway({"a": a, "b": b}, catalogue)
    status, body, _ = await chat(http, gateway, "new")
    assert (status, body["choices"][0]["message"]["content"]) == (200, "hello from b")
    assert fake_log(a)["unloads"] == []


async def test_cold_load_ranks_pinned_node_first_then_most_free_memory(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=[{"vram_total_mb": 10000}])
    b = start_fake("b", devices=[{"vram_total_mb": 20000}])
    c = start_fake("c", devices=[{"vram_total_mb": 40000}])
    catalogue = models_toml({"id": "pinned", "vram_mb": 1000, "pinned_on": ["a"]}, {"id": "free", "vram_mb": 1000})
    gateway = start_gateway({"a": a, "b": b, "c": c}, catalogue)
    assert (await chat(http, gateway, "pinned"))[1]["choices"][0]["message"]["content"] == "hello from a"
    assert (await chat(http, gateway, "free"))[1]["choices"][0]["message"]["content"] == "hello from c"


async def test_feasibility_puts_a_model_on_a_device_big_enough(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    many_small = start_fake("small", devices=[{"vram_total_mb": 24000}] * 4)
    one_big = start_fake("big", devices=[{"vram_total_mb": 40000}])
    catalogue = models_toml(
        {"id": "wide", "vram_mb": 20000, "min_device_vram_mb": 32000},
        {"id": "toobig", "vram_mb": 90000},
    )
    gateway = start_gateway({"small": many_small, "big": one_big}, catalogue)
    assert (await chat(http, gateway, "wide"))[1]["choices"][0]["message"]["content"] == "hello from big"
    listed = {m["id"] for m in get_json(f"{gateway.url}/v1/models")["data"]}
    assert "toobig" not in listed  # feasible on no healthy node: not offered
    status, body, headers = await chat(http, gateway, "toobig")
    # Every node is up and none could ever hold it: a 4xx that says so, not a 503 to retry forever.
    assert (status, body["error"]["code"]) == (400, "model_too_large")
    assert "fits no neuron in this fleet" in body["error"]["message"] and "Retry-After" not in headers


async def test_concurrent_requests_for_a_cold_model_share_one_load(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, load_delay_s=1.0)
    gateway = start_gateway({"a": a}, models_toml({"id": "m", "vram_mb": 4000}))
    results = await asyncio.gather(*(chat(http, gateway, "m") for _ in range(8)))
    assert [status for status, _, _ in results] == [200] * 8
    assert loads_on(a) == ["m"]


async def test_alias_resolves_to_the_model_id_the_neuron_knows(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["org/model-x"])
    gateway = start_gateway({"a": a}, models_toml({"id": "org/model-x"}, aliases={"fast": "org/model-x"}))
    status, _, _ = await chat(http, gateway, "fast")
    assert status == 200
    assert fake_log(a)["requests"][-1]["model"] == "org/model-x"


async def test_unknown_model_is_404_model_not_found(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    gateway = start_gateway({"a": start_fake("a", devices=GPU)}, models_toml({"id": "m"}))
    status, body, _ = await chat(http, gateway, "nope")
    assert status == 404
    assert body["error"] == {
        "message": "The model 'nope' does not exist or is not served here",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


async def test_v1_models_merges_fleet_and_catalogue(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    a = start_fake("a", devices=GPU, preloaded=["adhoc", "m"])
    b = start_fake("b", devices=GPU, preloaded=["m"])
    catalogue = models_toml({"id": "m", "vram_mb": 1000}, {"id": "cold", "vram_mb": 1000}, aliases={"fast": "cold"})
    gateway = start_gateway({"a": a, "b": b}, catalogue)
    async with http.get(f"{gateway.url}/v1/models") as resp:
        listing = await resp.json()
    by_id = {m["id"]: m for m in listing["data"]}
    assert listing["object"] == "list"
    assert set(by_id) == {"m", "cold", "adhoc", "fast"}
    assert by_id["m"]["object"] == "model"
    assert (by_id["m"]["status"], sorted(by_id["m"]["loaded_on"])) == ("loaded", ["a", "b"])
    assert by_id["m"]["context_length"] == 2048
    assert (by_id["cold"]["status"], by_id["cold"]["loaded_on"]) == ("available", [])
    assert (by_id["adhoc"]["in_catalogue"], by_id["adhoc"]["loaded_on"]) == (False, ["a"])
    assert (by_id["fast"]["alias_of"], by_id["fast"]["status"]) == ("cold", "available")


async def test_poller_drops_models_a_neuron_no_longer_reports(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    gateway = start_gateway({"a": a})
    assert replica_nodes(gateway, "m") == {"a": "loaded"}
    async with http.post(f"{a.url}/models/unload", json={"model_id": "m"}):
        pass  # unloaded behind the gateway's back
    await eventually(lambda: replica_nodes(gateway, "m") == {})
    status, _, _ = await chat(http, gateway, "m")
    assert status == 404


async def test_request_ids_are_propagated_and_returned(start_fake: StartFake, start_gateway: StartGateway, http):
    a = start_fake("a", devices=GPU, preloaded=["m"])
    gateway = start_gateway({"a": a})
    headers = {"x-request-id": "trace-123"}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("m"), headers=headers) as resp:
        assert resp.headers["x-request-id"] == "trace-123"
    assert fake_log(a)["requests"][-1]["request_id"] == "trace-123"
    assert "request_id=trace-123" in gateway.log()
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("m")) as resp:
        generated = resp.headers["x-request-id"]
    assert generated and fake_log(a)["requests"][-1]["request_id"] == generated


async def test_completions_route_passes_through(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    gateway = start_gateway({"a": a})
    async with http.post(f"{gateway.url}/v1/completions", json={"model": "m", "prompt": "Once"}) as resp:
        body = await resp.json()
    assert (resp.status, body["object"], body["choices"][0]["text"]) == (200, "text_completion", "hello from a")
    assert fake_log(a)["requests"][-1]["path"] == "/v1/completions"


async def test_api_keys_guard_client_routes(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    gateway = start_gateway({"a": a}, extra_gateway='api_keys = ["sk-1"]')
    status, body, _ = await chat(http, gateway, "m")
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    url = f"{gateway.url}/v1/chat/completions"
    async with http.post(url, json=chat_body("m"), headers={"Authorization": "Bearer sk-1"}) as resp:
        assert resp.status == 200
    async with http.post(url, json=chat_body("m"), headers={"x-api-key": "sk-1"}) as resp:
        assert resp.status == 200
    async with http.get(f"{gateway.url}/v1/models") as resp:
        assert resp.status == 401
    async with http.get(f"{gateway.url}/health") as resp:
        assert resp.status == 200


async def test_pinned_models_are_loaded_on_their_node_when_it_answers(
    start_fake: StartFake, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    a = start_fake("a", devices=GPU)
    b = start_fake("b", devices=GPU)
    catalogue = models_toml({"id": "m", "vram_mb": 1000, "pinned_on": ["b"]})
    gateway = start_gateway({"a": a, "b": b}, catalogue, preload_pinned=True)
    await eventually(lambda: replica_nodes(gateway, "m") == {"b": "loaded"})
    assert loads_on(a) == []
