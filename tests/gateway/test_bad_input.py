"""Bad requests get clear OpenAI errors with the right status, and the gateway keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.gateway_client import StartFake, StartGateway, chat, fake_log

CASES: list[tuple[str, bytes, int, str, str | None]] = [
    ("malformed JSON", b'{"model": "m", "messages": [', 400, "invalid_json", None),
    ("empty body", b"", 400, "invalid_json", None),
    ("not an object", b'["m"]', 400, "invalid_json", None),
    ("missing model", b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "invalid_model", "model"),
    ("model not a string", b'{"model": 7, "messages": []}', 400, "invalid_model", "model"),
    ("unknown model", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found",
     "model"),
    ("stream not a boolean", b'{"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}', 400,
     "invalid_type", "stream"),
    ("messages missing", b'{"model": "m"}', 400, "missing_required_field", "messages"),
    ("messages not a list", b'{"model": "m", "messages": "hi"}', 400, "invalid_type", "messages"),
    ("messages empty", b'{"model": "m", "messages": []}', 400, "invalid_type", "messages"),
]  # fmt: skip


@pytest.fixture
def gateway(start_fake: StartFake, start_gateway: StartGateway):
    a = start_fake("a", devices=[{"vram_total_mb": 10000}], preloaded=["m"])
    return start_gateway({"a": a}, extra_gateway="max_body_bytes = 4096"), a


@pytest.mark.parametrize(("name", "body", "status", "code", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_requests(gateway, http, name: str, body: bytes, status: int, code: str, param: str | None) -> None:
    daemon, neuron = gateway
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{daemon.url}/v1/chat/completions", data=body, headers=headers) as resp:
        error: dict[str, Any] = (await resp.json())["error"]
    assert resp.status == status
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")
    assert fake_log(neuron)["requests"] == []  # refused at the gateway
    assert (await chat(http, daemon, "m"))[0] == 200  # and it keeps serving


async def test_oversized_body_is_413(gateway, http) -> None:
    daemon, _ = gateway
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with http.post(f"{daemon.url}/v1/chat/completions", json=big) as resp:
        body = await resp.json()
    assert resp.status == 413
    assert body["error"]["code"] == "request_too_large"
    assert "4096 bytes" in body["error"]["message"]
    assert (await chat(http, daemon, "m"))[0] == 200


async def test_unknown_route_is_an_openai_404(gateway, http) -> None:
    daemon, _ = gateway
    async with http.get(f"{daemon.url}/v1/nothing") as resp:
        body = await resp.json()
    assert resp.status == 404
    assert body["error"]["code"] == "unknown_route"


async def test_neuron_validation_errors_pass_through(start_fake: StartFake, start_gateway: StartGateway, http) -> None:
    a = start_fake("a", devices=[{"vram_total_mb": 10000}], preloaded=["m"])
    gateway = start_gateway({"a": a})
    status, body, _ = await chat(http, gateway, "m", fake={"status": 400})
    assert (status, body["error"]["code"]) == (400, "scripted")
