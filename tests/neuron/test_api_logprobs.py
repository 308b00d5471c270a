"""logprobs / top_logprobs on Chat and Completions, streaming and not, from the distribution sampled from."""

from __future__ import annotations

import json
import math
from typing import Any

import aiohttp
import pytest

from tests.neuron.conftest import TINY
from tests.support.procs import Daemon

MESSAGES = [{"role": "user", "content": "Count to five."}]


async def _post(http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(f"{url}{path}", json={"model": TINY, **body}) as resp:
        return resp.status, await resp.json()


async def _stream(http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    async with http.post(f"{url}{path}", json={"model": TINY, "stream": True, **body}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
    return chunks


async def test_chat_logprobs_greedy(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    status, reply = await _post(http, neuron.url, "/v1/chat/completions", body)
    assert status == 200, reply
    choice = reply["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == reply["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop")
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for entry in entries:
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]) == entry["token"].encode()
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == entry["token"] and math.isclose(top[0]["logprob"], entry["logprob"])  # greedy
    streamed = await _stream(http, neuron.url, "/v1/chat/completions", body)
    parts = [e for c in streamed for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert [(e["token"], round(e["logprob"], 3)) for e in parts] == [
        (e["token"], round(e["logprob"], 3)) for e in entries
    ]


async def test_no_logprobs_unless_asked(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    status, reply = await _post(http, neuron.url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert status == 200 and reply["choices"][0]["logprobs"] is None


async def test_logprobs_under_a_constraint_see_only_allowed_tokens(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    """A token the grammar forces has probability 1: the distribution reported is the masked one."""
    schema = {"type": "object", "properties": {"a": {"const": "xyz"}}, "required": ["a"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    body = {"messages": MESSAGES, "max_tokens": 60, "temperature": 0.7, "seed": 1, "logprobs": True, "top_logprobs": 2}
    status, reply = await _post(http, neuron.url, "/v1/chat/completions", {**body, "response_format": fmt})
    assert status == 200, reply
    entries = reply["choices"][0]["logprobs"]["content"]
    forced = [e for e in entries if "xyz" in e["token"] or e["token"] in ('"a"', "a")]
    assert forced and all(e["logprob"] == pytest.approx(0.0, abs=1e-4) for e in forced)
    assert all(t["logprob"] <= -9000 for e in forced for t in e["top_logprobs"][1:])  # masked alternatives


async def test_completions_logprobs(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "One, two,", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    status, reply = await _post(http, neuron.url, "/v1/completions", body)
    assert status == 200, reply
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == len(logprobs["top_logprobs"])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    streamed = await _stream(http, neuron.url, "/v1/completions", body)
    tokens = [t for c in streamed for ch in c["choices"] if ch.get("logprobs") for t in ch["logprobs"]["tokens"]]
    assert tokens == logprobs["tokens"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, None),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
async def test_bad_logprobs_requests(neuron: Daemon, http: aiohttp.ClientSession, body: Any, param: Any) -> None:
    status, reply = await _post(http, neuron.url, "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 400, reply
    assert "top_logprobs" in reply["error"]["message"]
    if param:
        assert reply["error"]["param"] == param


# --- n > 1 --------------------------------------------------------------------------------------------


async def test_n_choices(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3, "logprobs": True}
    status, reply = await _post(http, neuron.url, "/v1/chat/completions", body)
    assert status == 200, reply
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["message"]["content"] for c in choices}) > 1, "each choice draws its own tokens"
    assert all(c["logprobs"]["content"] for c in choices)
    single = {**body, "n": 1}
    _, alone = await _post(http, neuron.url, "/v1/chat/completions", single)
    assert alone["choices"][0]["message"]["content"] == choices[0]["message"]["content"], "choice 0 is the seed's"
    assert reply["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    assert reply["usage"]["completion_tokens"] >= alone["usage"]["completion_tokens"] * 2


async def test_n_choices_stream(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "One, two,", "max_tokens": 6, "temperature": 0.9, "seed": 3, "n": 2}
    chunks = await _stream(http, neuron.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    texts: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert set(finishes) == {0, 1}
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == 12
    _, whole = await _post(http, neuron.url, "/v1/completions", body)
    assert [c["text"] for c in whole["choices"]] == [texts[0], texts[1]]


async def test_too_many_choices(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    status, reply = await _post(http, neuron.url, "/v1/chat/completions", {"messages": MESSAGES, "n": 17})
    assert status == 400 and reply["error"]["param"] == "n"
