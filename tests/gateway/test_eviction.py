"""Eviction through a real gateway over fake neurons: strategies, protections, residency, defragmenting."""

from __future__ import annotations

import asyncio

from tests.support.gateway_client import StartFake, StartGateway, chat, fake_log, loads_on, metric_value, models_toml
from tests.support.gateway_procs import eventually

# One device with room for two 4 GB models.
ROOM_FOR_TWO = {"devices": [{"vram_total_mb": 9000}], "default_size_mb": 4000}


def catalogue(*ids: str, **priorities: int) -> str:
    return models_toml(*({"id": i, "vram_mb": 4000, "residency_priority": priorities.get(i, 0)} for i in ids))


async def test_lru_evicts_the_least_recently_used_and_counts_it(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", **ROOM_FOR_TWO)
    gateway = start_gateway({"a": a}, catalogue("m1", "m2", "m3"), strategy="lru")
    for model in ("m1", "m2", "m1"):  # m2 is now the least recently used
        assert (await chat(http, gateway, model))[0] == 200
    assert (await chat(http, gateway, "m3"))[0] == 200
    assert fake_log(a)["unloads"] == ["m2"]
    text = gateway.metrics()
    assert metric_value(text, "cortex_evictions_total", model="m2", node="a") == 1
    assert metric_value(text, "cortex_cold_starts_total", model="m3", node="a") == 1


async def test_priority_evicts_the_lowest_priority_even_if_recently_used(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", **ROOM_FOR_TWO)
    models = catalogue("low", "high", "new", low=1, high=9, new=5)
    gateway = start_gateway({"a": a}, models, strategy="priority")
    for model in ("high", "low"):  # high is the least recently used; lru would evict it
        assert (await chat(http, gateway, model))[0] == 200
    assert (await chat(http, gateway, "new"))[0] == 200
    assert fake_log(a)["unloads"] == ["low"]
    assert metric_value(gateway.metrics(), "cortex_evictions_total", model="low", node="a") == 1


async def test_priority_refuses_to_displace_higher_priority_models(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", **ROOM_FOR_TWO)
    gateway = start_gateway({"a": a}, catalogue("h1", "h2", "low", h1=5, h2=5, low=1), strategy="priority")
    for model in ("h1", "h2"):
        assert (await chat(http, gateway, model))[0] == 200
    status, body, headers = await chat(http, gateway, "low")
    assert (status, body["error"]["code"]) == (503, "no_capacity")
    assert "higher residency priority" in body["error"]["message"]
    assert "Retry-After" in headers
    assert fake_log(a)["unloads"] == []


async def test_pinned_models_are_never_evicted(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    a = start_fake("a", **ROOM_FOR_TWO)
    models = models_toml(
        {"id": "pinned", "vram_mb": 4000, "pinned_on": ["a"]},
        {"id": "m2", "vram_mb": 4000},
        {"id": "m3", "vram_mb": 4000},
    )
    gateway = start_gateway({"a": a}, models)
    for model in ("pinned", "m2"):  # pinned is the LRU one
        assert (await chat(http, gateway, model))[0] == 200
    assert (await chat(http, gateway, "m3"))[0] == 200
    assert fake_log(a)["unloads"] == ["m2"]


async def test_models_with_requests_in_flight_are_never_evicted(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", **ROOM_FOR_TWO)
    gateway = start_gateway({"a": a}, catalogue("busy", "theirs", "m3"))
    assert (await chat(http, gateway, "busy"))[0] == 200
    assert (await chat(http, gateway, "theirs"))[0] == 200
    # "busy" (least recently used) has a request of ours running; "theirs" has one from another gateway.
    slow = asyncio.ensure_future(chat(http, gateway, "busy", fake={"delay_s": 3}))
    async with http.post(f"{a.url}/_fake/set", json={"in_flight": {"theirs": 1}}):
        pass
    await asyncio.sleep(0.5)
    status, body, _ = await chat(http, gateway, "m3")
    assert (status, body["error"]["code"]) == (503, "no_capacity")
    assert "busy has requests in flight" in body["error"]["message"]
    assert "theirs has requests in flight" in body["error"]["message"]
    assert (await slow)[0] == 200
    assert fake_log(a)["unloads"] == []
    # Once idle, the least recently used of the two makes room.
    async with http.post(f"{a.url}/_fake/set", json={"in_flight": {"theirs": 0}}):
        pass
    await asyncio.sleep(0.5)
    assert (await chat(http, gateway, "m3"))[0] == 200
    assert fake_log(a)["unloads"] == ["theirs"]


async def test_min_residency_stops_two_models_thrashing_one_gpu(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=[{"vram_total_mb": 5000}], default_size_mb=4000)
    gateway = start_gateway({"a": a}, catalogue("m1", "m2"), min_residency_s=30)
    assert (await chat(http, gateway, "m1"))[0] == 200
    for model in ("m2", "m1", "m2", "m1", "m2"):
        status, body, headers = await chat(http, gateway, model)
        if model == "m1":
            assert status == 200
        else:
            assert (status, body["error"]["code"]) == (503, "no_capacity")
            assert "min residency" in body["error"]["message"]
            assert 1 <= int(headers["Retry-After"]) <= 30
    assert loads_on(a) == ["m1"]
    assert fake_log(a)["unloads"] == []


async def test_measured_vram_replaces_a_wrong_estimate(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    # The catalogue says "liar" needs 1 GB; it really takes 6 GB on load.
    a = start_fake("a", devices=[{"vram_total_mb": 10000}], sizes={"liar": 6000, "m1": 4000, "m2": 4000})
    models = models_toml({"id": "liar", "vram_mb": 1000}, {"id": "m1", "vram_mb": 4000}, {"id": "m2", "vram_mb": 4000})
    gateway = start_gateway({"a": a}, models)
    assert (await chat(http, gateway, "liar"))[0] == 200
    assert gateway.state()["catalogue"][0]["measured_vram_mb"] == 6000
    assert (await chat(http, gateway, "m1"))[0] == 200  # 4 GB free: fits beside liar
    async with http.post(f"{gateway.url}/admin/unload", json={"model": "liar", "node": "a"}):
        pass
    assert (await chat(http, gateway, "m2"))[0] == 200  # now m1 + m2 use 8 of 10 GB
    # With the 1 GB estimate liar would "fit" in the 2 GB free; measured, it needs an eviction first.
    assert (await chat(http, gateway, "liar"))[0] == 200
    assert fake_log(a)["unloads"] == ["liar", "m1"]


async def test_defragments_after_the_configured_number_of_cycles(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=[{"vram_total_mb": 5000}], default_size_mb=4000)
    gateway = start_gateway({"a": a}, catalogue("m1", "m2"), defrag_after_cycles=2)
    for model in ("m1", "m2", "m1"):
        assert (await chat(http, gateway, model))[0] == 200
    assert fake_log(a)["unloads"] == ["m1", "m2"]
    await eventually(lambda: fake_log(a)["defragments"] == 1)
    assert metric_value(gateway.metrics(), "cortex_defragmentations_total", node="a") == 1
    assert (await chat(http, gateway, "m2"))[0] == 200
    assert fake_log(a)["defragments"] == 1  # the count started again
