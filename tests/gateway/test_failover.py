"""A neuron dying and coming back: failover, unreachable → 502, health transitions, recovery."""

from __future__ import annotations

from tests.support.gateway_client import StartFake, StartGateway, chat, loads_on, models_toml
from tests.support.gateway_procs import eventually
from tests.support.procs import free_port, get_json

GPU = [{"vram_total_mb": 10000}]


def healthy(gateway, name: str) -> bool:
    return get_json(f"{gateway.url}/health")["neurons"][name]["healthy"]


async def test_requests_fail_over_to_another_neuron_when_one_is_killed(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])
    b = start_fake("b", devices=GPU)
    # Slow polling: the request itself must discover that a is gone.
    gateway = start_gateway({"a": a, "b": b}, models_toml({"id": "m", "vram_mb": 1000}), poll_interval_s=30)
    assert (await chat(http, gateway, "m"))[1]["choices"][0]["message"]["content"] == "hello from a"
    a.kill()
    status, body, _ = await chat(http, gateway, "m")
    assert (status, body["choices"][0]["message"]["content"]) == (200, "hello from b")
    assert loads_on(b) == ["m"]
    assert not healthy(gateway, "a")
    assert "event=upstream.connect_failed" in gateway.log()


async def test_an_unreachable_neuron_with_no_alternative_is_a_502(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, preloaded=["m"])  # not in any catalogue: only a can serve it
    gateway = start_gateway({"a": a}, poll_interval_s=30)
    a.kill()
    status, body, _ = await chat(http, gateway, "m")
    assert status == 502
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "upstream_unreachable"
    assert "neuron 'a' is unreachable" in body["error"]["message"]
    # Now known to be down: a clear 503, not a 404 for a model that exists.
    status, body, headers = await chat(http, gateway, "m")
    assert (status, body["error"]["code"]) == (503, "model_unavailable")
    assert "Retry-After" in headers


async def test_a_neuron_turns_unhealthy_and_recovers_when_it_comes_back(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    port = free_port()
    a = start_fake("a", port=port, devices=[{"vram_total_mb": 80000}], preloaded=["big"], sizes={"big": 40000})
    b = start_fake("b", devices=GPU)
    gateway = start_gateway({"a": a, "b": b}, models_toml({"id": "big", "vram_mb": 40000}))
    a.stop()
    await eventually(lambda: not healthy(gateway, "a"))
    models = {m["id"] for m in get_json(f"{gateway.url}/v1/models")["data"]}
    assert "big" not in models  # only a can host it
    status, body, _ = await chat(http, gateway, "big")
    assert (status, body["error"]["code"]) == (503, "model_unavailable")
    start_fake("a", port=port, devices=[{"vram_total_mb": 80000}], sizes={"big": 40000})  # back, empty
    await eventually(lambda: healthy(gateway, "a"))
    status, body, _ = await chat(http, gateway, "big")
    assert (status, body["choices"][0]["message"]["content"]) == (200, "hello from a")
    assert "event=node.unhealthy" in gateway.log()
    assert "event=node.healthy" in gateway.log()
