"""Structured output through a real neuron: response_format json_object and json_schema, and tool calls on a
model whose template has no tools (generic mode), all decoded under grammars on a random-weight model.

Random weights never write JSON or tool calls on their own: the grammar is what makes these hold.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import pytest

from tests.neuron.conftest import TINY
from tests.support.procs import Daemon

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["C", "F"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["unit", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
MESSAGES = [{"role": "user", "content": "Reply in JSON."}]


async def _post(http: aiohttp.ClientSession, url: str, **body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/v1/chat/completions", json={"model": TINY, "messages": MESSAGES, **body}) as resp:
        return resp.status, await resp.json()


async def _chat(http: aiohttp.ClientSession, url: str, **body: Any) -> dict[str, Any]:
    status, reply = await _post(http, url, **body)
    assert status == 200, reply
    return reply


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_k": 40, "seed": 3}])
async def test_json_object(neuron: Daemon, http: aiohttp.ClientSession, sampling: dict[str, Any]) -> None:
    reply = await _chat(http, neuron.url, max_tokens=200, response_format={"type": "json_object"}, **sampling)
    choice = reply["choices"][0]
    content = choice["message"]["content"]
    assert content.lstrip().startswith("{"), content
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    free = await _chat(http, neuron.url, max_tokens=40, **sampling)
    assert not free["choices"][0]["message"]["content"].lstrip().startswith("{"), "unconstrained, it is not JSON"


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}])
async def test_json_schema(neuron: Daemon, http: aiohttp.ClientSession, sampling: dict[str, Any]) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}
    reply = await _chat(http, neuron.url, max_tokens=300, response_format=fmt, **sampling)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), ANSWER_SCHEMA)


async def test_json_schema_streams(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 300, "temperature": 0, "stream": True}
    text = []
    async with http.post(f"{neuron.url}/v1/chat/completions", json={**body, "response_format": fmt}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "")
    jsonschema.validate(json.loads("".join(text)), ANSWER_SCHEMA)


@pytest.mark.parametrize(
    ("fmt", "words"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
        ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"if": {}}}}, "if"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "JSON object"),
    ],
)
async def test_bad_schemas_are_400s(neuron: Daemon, http: aiohttp.ClientSession, fmt: Any, words: str) -> None:
    status, reply = await _post(http, neuron.url, response_format=fmt, max_tokens=5)
    assert status == 400, reply
    assert words in reply["error"]["message"] and "json_schema" in reply["error"]["message"]
    assert (await _chat(http, neuron.url, max_tokens=2))["choices"], "the model still serves"


# --- tool calls on a model whose template has no tools ----------------------------------------------


def _check_call(call: dict[str, Any], tools: list[dict[str, Any]]) -> str:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    name = call["function"]["name"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])
    return name


async def test_models_report_their_tool_mode(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{neuron.url}/models") as resp:
        listed = await resp.json()
    models = {m["id"]: m for m in (listed["models"] if isinstance(listed, dict) else listed)}
    assert models[TINY]["tool_call_format"] == "generic" and models["tiny-tools"]["tool_call_format"] == "native:hermes"


@pytest.mark.parametrize("model", [TINY, "tiny-tools"])
async def test_required_tool_call_is_a_valid_call(neuron: Daemon, http: aiohttp.ClientSession, model: str) -> None:
    tools = [WEATHER, CLOCK]
    reply = await _chat(
        http, neuron.url, model=model, tools=tools, tool_choice="required", max_tokens=200, temperature=0
    )
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"] and all(_check_call(c, tools) for c in choice["message"]["tool_calls"])


async def test_named_tool_choice(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = await _chat(
        http, neuron.url, tools=[CLOCK, WEATHER], tool_choice=named, max_tokens=200, temperature=1.0, seed=5
    )
    calls = reply["choices"][0]["message"]["tool_calls"]
    assert [_check_call(c, [WEATHER]) for c in calls] == ["get_weather"]


async def test_unknown_named_tool_is_a_400(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    named = {"type": "function", "function": {"name": "missing"}}
    status, reply = await _post(http, neuron.url, tools=[WEATHER], tool_choice=named, max_tokens=5)
    assert status == 400 and reply["error"]["param"] == "tool_choice" and "missing" in reply["error"]["message"]


PATCH_GRAMMAR = 'start: "ADD " NAME ("," NAME){0,3}\nNAME: /[a-z]{1,6}/\n'
PATCH = {
    "type": "custom",
    "custom": {
        "name": "apply_patch",
        "description": "Apply a patch to the files.",
        "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": PATCH_GRAMMAR}},
    },
}


@pytest.mark.parametrize("model", [TINY, "tiny-tools"])
async def test_custom_grammar_tool_call(neuron: Daemon, http: aiohttp.ClientSession, model: str) -> None:
    """A custom tool with a Lark grammar: the call comes back as a custom tool call whose input is in the grammar."""
    import re

    body = {"model": model, "tools": [WEATHER, PATCH], "max_tokens": 120, "temperature": 0}
    named = {"type": "custom", "custom": {"name": "apply_patch"}}
    reply = await _chat(http, neuron.url, **body, tool_choice=named)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "custom" and call["custom"]["name"] == "apply_patch"
    assert re.fullmatch(r"ADD [a-z]{1,6}(,[a-z]{1,6}){0,3}", call["custom"]["input"]), call
    # The call and its result go back in the next turn.
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    history.append({"role": "tool", "tool_call_id": call["id"], "content": "patched"})
    status, again = await _post(http, neuron.url, **{**body, "max_tokens": 5}, messages=history)
    assert status == 200, again


async def test_bad_custom_tool_grammar_is_a_400(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    bad = {
        "type": "custom",
        "custom": {"name": "x", "format": {"type": "grammar", "syntax": "lark", "definition": "start: ("}},
    }
    status, reply = await _post(http, neuron.url, tools=[bad], tool_choice="required", max_tokens=5)
    assert status == 400, reply
    assert "does not compile" in reply["error"]["message"]
