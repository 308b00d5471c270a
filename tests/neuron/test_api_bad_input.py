"""Bad input gets a clear OpenAI error with the right status, and the neuron keeps serving."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.neuron.conftest import TINY
from tests.support.procs import Daemon

HELLO = [{"role": "user", "content": "Hi"}]


async def post(http: aiohttp.ClientSession, url: str, path: str, data: Any) -> tuple[int, dict[str, Any]]:
    kwargs = {"data": data} if isinstance(data, bytes) else {"json": data}
    async with http.post(f"{url}{path}", **kwargs) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "status", "param_or_code"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": TINY, "messages": "hello"}, 400, "messages"),
        ({"model": TINY, "messages": []}, 400, "messages"),
        ({"model": TINY, "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
        ({"model": TINY, "messages": HELLO, "max_tokens": -3}, 400, "max_tokens"),
        ({"model": TINY, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": TINY, "messages": HELLO, "n": 17}, 400, "n"),  # at most 16 choices
        ({"messages": HELLO}, 400, "model"),
        ({"model": "no-such-model", "messages": HELLO}, 404, "model_not_found"),
    ],
)
async def test_bad_chat_requests(
    neuron: Daemon, http: aiohttp.ClientSession, body: Any, status: int, param_or_code: str | None
) -> None:
    got, reply = await post(http, neuron.url, "/v1/chat/completions", body)
    assert got == status, reply
    error = reply["error"]
    assert error["message"] and error["type"]
    if param_or_code is not None:
        assert param_or_code in (error["param"], error["code"])


async def test_prompt_longer_than_context(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "user", "content": "word " * 3000}]
    status, reply = await post(http, neuron.url, "/v1/chat/completions", {"model": TINY, "messages": messages})
    assert status == 400
    assert reply["error"]["code"] == "context_length_exceeded"
    assert "1024" in reply["error"]["message"]
    assert reply["error"]["context_length"] == 1024 and reply["error"]["prompt_tokens"] > 1024


async def test_absurd_max_tokens_is_clipped(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    """max_tokens far past the context is clipped to what the context leaves, not refused: 8 tokens here."""
    prompt = [17] * (1024 - 8)
    body = {"model": TINY, "prompt": prompt, "max_tokens": 10_000_000, "temperature": 0}
    status, reply = await post(http, neuron.url, "/v1/completions", body)
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] == 1024 - 8
    assert (reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]) == (8, "length")


async def test_unknown_fields_are_ignored(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = {"model": TINY, "messages": HELLO, "max_tokens": 2, "frobnicate": {"x": 1}, "metadata": {"a": "b"}}
    status, _ = await post(http, neuron.url, "/v1/chat/completions", body)
    assert status == 200


async def test_unknown_route_and_method(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{neuron.url}/v2/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"]


async def test_still_serving_after_bad_input(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    for _ in range(3):
        await post(http, neuron.url, "/v1/chat/completions", b"\x00\xff garbage")
    status, _ = await post(
        http, neuron.url, "/v1/chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 2}
    )
    assert status == 200
