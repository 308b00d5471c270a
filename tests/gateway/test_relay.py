"""The relay every route sends through (gateway/relay.py), driven in-process over fake neurons."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from cortex.core.catalogue import Catalogue, CatalogueModel
from cortex.core.errors import ApiError
from cortex.core.gateway_config import GatewayConfig, fleet_config_from
from cortex.core.logs import request_id_var
from cortex.core.sse import DONE, KEEPALIVE, encode_data, event_data
from cortex.gateway.relay import chunks, stream_body
from cortex.gateway.runtime import Gateway
from tests.support.fake_neuron import build_app as build_fake_app
from tests.support.gateway_client import StartFake, fake_log, metric_value
from tests.support.gateway_procs import eventually
from tests.support.procs import free_port

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


async def chat(gw: Gateway, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A non-streaming chat through the relay, as the dialect routes send it."""
    reply = await gw.relay.fetch("/v1/messages", body["model"], CHAT, {**body, "stream": False}, **kwargs)
    return reply.json()


@pytest.fixture
async def gateway(start_fake: StartFake) -> AsyncIterator[tuple[Gateway, Any]]:
    neuron = start_fake("a", devices=[{"vram_total_mb": 10000}], preloaded=["m"], load_delay_s=0.6)
    config = GatewayConfig.model_validate(
        {
            "gateway": {"keepalive_interval_s": 0.1, "metrics_listen": None},
            "poll": {"interval_s": 0.2},
            "load": {"poll_interval_s": 0.05, "preload_pinned": False},
            "neurons": [{"name": "a", "endpoint": neuron.url}],
        }
    )
    catalogue = Catalogue(models=[CatalogueModel(id="m"), CatalogueModel(id="cold")], aliases={"alias": "m"})
    gw = Gateway(fleet_config_from(config, catalogue))
    await gw.start()
    try:
        yield gw, neuron
    finally:
        await gw.stop()


async def test_chat_returns_the_parsed_reply_and_records_metrics(gateway) -> None:
    gw, neuron = gateway
    request_id_var.set("r-1")
    reply = await chat(gw, {"model": "alias", "messages": MESSAGES})
    assert reply["choices"][0]["message"]["content"] == "hello from a"
    assert fake_log(neuron)["requests"][-1] == {
        "model": "m",
        "stream": False,
        "stream_options": None,
        "request_id": "r-1",
        "path": "/v1/chat/completions",
    }
    await asyncio.sleep(0.01)  # metrics are published just after the request ends
    text = gw.metrics.render().decode()
    assert metric_value(text, "cortex_requests_total", model="m", node="a") == 1
    assert metric_value(text, "cortex_completion_tokens_total", model="m", node="a") == 5


async def test_stream_chat_yields_chunk_dicts_and_the_usage_chunk(gateway) -> None:
    gw, neuron = gateway
    async with gw.relay.stream("/v1/messages", "m", CHAT, {"model": "m", "messages": MESSAGES}) as events:
        received = [chunk async for chunk in chunks(events)]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in received if c["choices"]) == (
        "tok0 tok1 tok2 tok3 tok4 "
    )
    assert received[-1]["choices"] == []
    assert received[-1]["usage"]["completion_tokens"] == 5
    assert fake_log(neuron)["requests"][-1]["stream_options"] == {"include_usage": True}


async def test_keepalive_is_called_while_a_cold_load_runs(gateway) -> None:
    gw, _ = gateway
    pings: list[int] = []

    async def keepalive() -> None:
        pings.append(1)

    body = {"model": "cold", "messages": MESSAGES}
    async with gw.relay.stream("/v1/messages", "cold", CHAT, body, keepalive=keepalive) as events:
        assert [c async for c in chunks(events)]
    assert len(pings) >= 3  # once at the start, then every 0.1 s of a 0.6 s load
    pings.clear()
    await chat(gw, body, keepalive=keepalive)
    assert pings == []  # loaded now: no wait, no keep-alive


async def test_failures_are_api_errors_with_the_right_status(gateway) -> None:
    gw, _ = gateway
    with pytest.raises(ApiError) as err:
        await chat(gw, {"model": "nope", "messages": MESSAGES})
    assert (err.value.status, err.value.code) == (404, "model_not_found")
    with pytest.raises(ApiError) as err:
        await chat(gw, {"model": "m", "messages": MESSAGES, "fake": {"status": 429}})
    assert (err.value.status, err.value.code, err.value.retry_after) == (429, "scripted", 3.0)
    assert err.value.anthropic_body()["error"]["type"] == "rate_limit_error"
    with pytest.raises(ApiError) as err:
        body = {"model": "m", "messages": MESSAGES, "fake": {"die_after": 2}}
        async with gw.relay.stream("/v1/messages", "m", CHAT, body) as events:
            async for _ in chunks(events):
                pass
    assert (err.value.status, err.value.code) == (502, "stream_interrupted")
    await asyncio.sleep(0.01)  # metrics are published just after the request ends
    text = gw.metrics.render().decode()
    assert metric_value(text, "cortex_errors_total", model="m", node="a", type="stream_interrupted") == 1


async def test_leaving_a_stream_early_cancels_the_generation(gateway) -> None:
    gw, neuron = gateway
    body = {"model": "m", "messages": MESSAGES, "fake": {"hang_after": 1}}
    async with gw.relay.stream("/v1/messages", "m", CHAT, body) as events:
        async for _ in events:
            break
    await eventually(lambda: fake_log(neuron)["cancelled"] == 1)
    assert gw.state.replica("m", "a").in_flight == 0  # the lease was released


async def test_fetch_reaches_any_neuron_route_for_the_routed_model(gateway) -> None:
    gw, _ = gateway
    reply = await gw.relay.fetch("/v1/messages/count_tokens", "alias", "/v1/chat/tokenize", {"messages": MESSAGES * 2})
    assert reply.json() == {"model": "m", "prompt_tokens": 14}
    await asyncio.sleep(0.01)  # token counts are accounted like every other request
    text = gw.metrics.render().decode()
    assert metric_value(text, "cortex_requests_total", model="m", node="a") == 1


def test_every_stream_asks_for_usage_keeping_the_clients_options() -> None:
    body = {"model": "alias", "messages": MESSAGES, "stream_options": {"include_usage": False, "x": 1}}
    sent = stream_body(body, "m")
    assert sent["model"] == "m" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True, "x": 1}
    assert stream_body({"model": "m", "messages": MESSAGES}, "m")["stream_options"] == {"include_usage": True}


# ---- a long prefill: the neuron's keep-alive comments, and the first-output bound ---------------------------------


@web.middleware
async def long_prefill(request: web.Request, handler: Any) -> web.StreamResponse:
    """A neuron whose stream answers its opening chunk, then prefills for `prefill_s` (sending an SSE comment
    every `keepalive_s`, when given, as real neurons do), then one token."""
    if request.path != CHAT:
        return await handler(request)
    body = await request.json()
    plan = body.get("prefill") or {}
    if not plan:
        return await handler(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    head = {"id": "chatcmpl-prefill", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
    opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    await response.write(encode_data({**head, "choices": [opening]}))
    loop = asyncio.get_running_loop()
    end = loop.time() + plan["prefill_s"]
    while loop.time() < end:
        await asyncio.sleep(plan.get("keepalive_s") or plan["prefill_s"])
        if plan.get("keepalive_s"):
            await response.write(KEEPALIVE)
    token = {"index": 0, "delta": {"content": "prefilled"}, "finish_reason": "stop"}
    await response.write(encode_data({**head, "choices": [token]}) + DONE)
    return response


@pytest.fixture
async def prefilling() -> AsyncIterator[Gateway]:
    """A gateway whose stream idle timeout (0.5 s) is shorter than the neuron's prefills, and first-output bound 3 s."""
    app = build_fake_app({"name": "a", "devices": [{"vram_total_mb": 10000}], "preloaded": ["m"]})
    app.middlewares.append(long_prefill)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = GatewayConfig.model_validate(
        {
            "gateway": {
                "keepalive_interval_s": 0.1,
                "metrics_listen": None,
                "stream_idle_timeout_s": 0.5,
                "first_byte_timeout_s": 3,
            },
            "poll": {"interval_s": 0.2},
            "neurons": [{"name": "a", "endpoint": f"http://127.0.0.1:{port}"}],
        }
    )
    gw = Gateway(fleet_config_from(config, Catalogue(models=[CatalogueModel(id="m")])))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()
        await runner.cleanup()


async def relayed(gw: Gateway, prefill: dict[str, float]) -> tuple[list[bytes], int]:
    """The events a stream yields, and how often the client was kept alive meanwhile."""
    pings = 0

    async def keepalive() -> None:
        nonlocal pings
        pings += 1

    body = {"model": "m", "messages": MESSAGES, "prefill": prefill}
    async with gw.relay.stream("/v1/chat/completions", "m", CHAT, body, keepalive=keepalive) as events:
        return [event async for event in events], pings


async def test_a_prefill_longer_than_the_idle_timeout_survives_on_the_neurons_keepalives(prefilling) -> None:
    events, pings = await relayed(prefilling, {"prefill_s": 1.5, "keepalive_s": 0.1})
    assert [orjson.loads(event_data(e) or b"{}")["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": ""},
        {"content": "prefilled"},
    ]
    assert pings > 0  # the client heard the gateway's own keep-alives; the neuron's comments never reach it


async def test_a_silent_prefill_is_cut_at_the_idle_timeout(prefilling) -> None:
    with pytest.raises(ApiError) as err:
        await relayed(prefilling, {"prefill_s": 1.5})
    # Before any output: retried once, and with no other replica, a clear 502 naming the silence.
    assert err.value.status == 502
    assert "did not answer" in err.value.message or "stopped" in err.value.message


async def test_keepalives_alone_do_not_hold_a_stream_past_the_first_output_bound(prefilling) -> None:
    with pytest.raises(ApiError) as err:
        await relayed(prefilling, {"prefill_s": 30, "keepalive_s": 0.1})
    assert (err.value.status, err.value.code) == (504, "upstream_timeout")


# ---- retried once before output, never after it, never a 4xx ----------------------------------------------------


@pytest.fixture
async def two_replicas(start_fake: StartFake) -> AsyncIterator[tuple[Gateway, list[Any]]]:
    fakes = [start_fake(name, devices=[{"vram_total_mb": 10000}], preloaded=["m"]) for name in ("a", "b")]
    config = GatewayConfig.model_validate(
        {
            "gateway": {"keepalive_interval_s": 0.1, "metrics_listen": None},
            "poll": {"interval_s": 0.2},
            "neurons": [{"name": n, "endpoint": f.url} for n, f in zip("ab", fakes, strict=True)],
        }
    )
    gw = Gateway(fleet_config_from(config, Catalogue(models=[CatalogueModel(id="m")])))
    await gw.start()
    try:
        yield gw, fakes
    finally:
        await gw.stop()


async def test_a_stream_cut_before_output_is_retried_once_after_output_never(two_replicas) -> None:
    gw, fakes = two_replicas

    def tries() -> int:
        return sum(len(fake_log(f)["requests"]) for f in fakes)

    async def stream(fake: dict[str, Any]) -> list[dict[str, Any]]:
        body = {"model": "m", "messages": MESSAGES, "fake": fake}
        async with gw.relay.stream("/v1/messages", "m", CHAT, body) as events:
            return [chunk async for chunk in chunks(events)]

    # Cut right after the opening chunk, on both replicas: tried on each once, then the error.
    with pytest.raises(ApiError) as err:
        await stream({"die_after": 0})
    assert (err.value.status, err.value.code, tries()) == (502, "stream_interrupted", 2)
    # Cut after output went out: never retried.
    with pytest.raises(ApiError) as err:
        await stream({"die_after": 2})
    assert (err.value.code, tries()) == ("stream_interrupted", 3)
    # A neuron's 4xx is the request's own: never retried; nor an error that is no neuron failure.
    for status in (400, 503):
        with pytest.raises(ApiError) as err:
            await chat(gw, {"model": "m", "messages": MESSAGES, "fake": {"status": status}})
        assert err.value.status == status
    assert tries() == 5
    await asyncio.sleep(0.01)  # metrics are published just after the request ends
    text = gw.metrics.render().decode()
    errors = [line for line in text.splitlines() if line.startswith("cortex_errors_total{")]
    cut = sum(float(line.rpartition(" ")[2]) for line in errors if 'type="stream_interrupted"' in line)
    assert cut == 2  # each request counted once, the retried one included
