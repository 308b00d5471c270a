"""The streaming proxy: event-by-event pass-through, usage, keep-alives, mid-stream death, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest

from tests.support.gateway_client import StartFake, StartGateway, chat_body, fake_log, models_toml, read_events
from tests.support.gateway_procs import GatewayDaemon, eventually
from tests.support.procs import Daemon

GPU = [{"vram_total_mb": 10000}]
Loaded = tuple[Daemon, GatewayDaemon]


@pytest.fixture
def loaded(start_fake: StartFake, start_gateway: StartGateway) -> Loaded:
    """A fake neuron with model `m` loaded, and a gateway over it."""
    a = start_fake("a", devices=GPU, preloaded=["m"])
    return a, start_gateway({"a": a})


async def stream(http: aiohttp.ClientSession, gateway: GatewayDaemon, model: str, **extra: Any) -> list[Any]:
    url = f"{gateway.url}/v1/chat/completions"
    async with http.post(url, json=chat_body(model, stream=True, **extra)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await read_events(resp)


def content(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e.get("choices")
    )


async def test_events_pass_through_and_usage_is_stripped_unless_asked(loaded: Loaded, http) -> None:
    a, gateway = loaded
    plain = await stream(http, gateway, "m")
    assert content(plain) == "tok0 tok1 tok2 tok3 tok4 "
    assert plain[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and e.get("usage") for e in plain)
    # The neuron was asked for usage anyway: the gateway needs it for metrics.
    assert fake_log(a)["requests"][-1]["stream_options"] == {"include_usage": True}

    asked = await stream(http, gateway, "m", stream_options={"include_usage": True})
    usage = [e["usage"] for e in asked if isinstance(e, dict) and e.get("usage")]
    assert usage == [{"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}]
    assert content(asked) == content(plain)


async def test_events_arrive_as_they_are_produced_not_buffered(loaded: Loaded, http) -> None:
    a, gateway = loaded
    url = f"{gateway.url}/v1/chat/completions"
    # The neuron sends two tokens, then nothing more: both must reach the client while the stream is open.
    async with http.post(url, json=chat_body("m", stream=True, fake={"hang_after": 2})) as resp:
        seen = []
        while len([e for e in seen if "tok" in e]) < 2:
            line = await asyncio.wait_for(resp.content.readline(), timeout=10)
            if line.startswith(b"data: "):
                seen.append(line.decode())
        assert not resp.content.at_eof()
        resp.close()  # drop the connection, as a client that goes away does
    await eventually(lambda: fake_log(a)["cancelled"] == 1)


async def test_client_disconnect_cancels_the_upstream_request(loaded: Loaded, http) -> None:
    a, gateway = loaded
    url = f"{gateway.url}/v1/chat/completions"
    # Streaming: the client reads one token and goes away.
    async with http.post(url, json=chat_body("m", stream=True, fake={"hang_after": 1})) as resp:
        await resp.content.readline()
        resp.close()
    await eventually(lambda: fake_log(a)["cancelled"] == 1)
    # Non-streaming: the client gives up while the neuron is still working.
    with contextlib.suppress(TimeoutError):
        await http.post(url, json=chat_body("m", fake={"delay_s": 30}), timeout=aiohttp.ClientTimeout(total=0.5))
    await eventually(lambda: fake_log(a)["cancelled"] == 2)
    await eventually(lambda: "error=client_disconnected" in gateway.log())


async def test_neuron_dying_mid_stream_ends_the_stream_with_an_error_event(loaded: Loaded, http) -> None:
    _, gateway = loaded
    events = await asyncio.wait_for(stream(http, gateway, "m", fake={"die_after": 2}), timeout=10)
    assert content(events) == "tok0 tok1 "
    error = events[-1]["error"]
    assert error["code"] == "stream_interrupted"
    assert "stopped mid-stream" in error["message"]
    assert "[DONE]" not in events


async def test_keepalives_flow_while_a_cold_load_runs(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    a = start_fake("a", devices=GPU, load_delay_s=1.5)
    gateway = start_gateway({"a": a}, models_toml({"id": "m", "vram_mb": 1000}), keepalive_interval_s=0.2)
    events = await stream(http, gateway, "m")
    first_data = next(i for i, e in enumerate(events) if not isinstance(e, str) or not e.startswith(":"))
    assert first_data >= 3
    assert set(events[:first_data]) == {": keep-alive"}
    assert content(events) == "tok0 tok1 tok2 tok3 tok4 "


async def test_a_cold_load_failing_after_keepalives_ends_with_an_error_event(
    start_fake: StartFake, start_gateway: StartGateway, http
) -> None:
    a = start_fake("a", devices=GPU, load_delay_s=0.6, fail_loads=["m"])
    gateway = start_gateway({"a": a}, models_toml({"id": "m", "vram_mb": 1000}))
    events = await stream(http, gateway, "m")
    assert events[0] == ": keep-alive"
    assert events[-1]["error"]["code"] == "load_failed"
    assert "no weights found" in events[-1]["error"]["message"]


async def test_upstream_errors_pass_through_with_status_body_and_retry_after(loaded: Loaded, http) -> None:
    _, gateway = loaded
    url = f"{gateway.url}/v1/chat/completions"
    for streaming in (False, True):
        async with http.post(url, json=chat_body("m", stream=streaming, fake={"status": 429})) as resp:
            body = await resp.json()
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "3"
            assert body["error"] == {
                "message": "scripted error 429",
                "type": "invalid_request_error",
                "param": None,
                "code": "scripted",
            }


async def test_completions_stream_too(loaded: Loaded, http) -> None:
    _, gateway = loaded
    async with http.post(f"{gateway.url}/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as resp:
        events = await read_events(resp)
    assert "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"]) == (
        "tok0 tok1 tok2 tok3 tok4 "
    )
    assert events[-1] == "[DONE]"
