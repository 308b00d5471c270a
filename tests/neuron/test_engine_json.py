"""`response_format: json_object`: the automaton, and constrained generation through a real neuron."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.neuron.engine.json_constraint import JsonPrefix
from tests.neuron.conftest import TINY
from tests.support.procs import Daemon

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def accepts(text: str) -> JsonPrefix | None:
    state = JsonPrefix()
    return state if state.feed_text(text) else None


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), st.booleans(), st.booleans())
def test_every_serialised_object_is_accepted_to_completion(obj: dict[str, Any], indent: bool, ascii_only: bool) -> None:
    text = json.dumps(obj, indent=2 if indent else None, ensure_ascii=ascii_only)
    state = accepts(text)
    assert state is not None, text
    assert state.done


@pytest.mark.parametrize(
    "text",
    ['{"a": 1}', '{"a": [1, 2.5, -3e+4, true, false, null, "x\\u00e9\\n"]}', '  {"nested": {"k": {}}} ', "{}"],
)
def test_valid_objects_complete(text: str) -> None:
    state = accepts(text)
    assert state is not None and state.done


@pytest.mark.parametrize(
    "text",
    [
        "[1]",  # top level must be an object
        '"a"',
        "{a: 1}",  # unquoted key
        '{"a" 1}',
        '{"a": 01}',  # leading zero
        '{"a": 1.}',
        '{"a": tru }',
        '{"a": 1,}',  # trailing comma
        '{"a": "\\x"}',  # bad escape
        '{"a": "line\nbreak"}',  # raw control character in a string
        '{"a": 1}}',
        '{"a": 1} {',
        '{"a": [1}',
        "{" + " " * 40 + "}",  # whitespace runs are capped
    ],
)
def test_invalid_text_is_rejected(text: str) -> None:
    assert accepts(text) is None


def test_prefixes_are_accepted_but_not_done() -> None:
    for prefix in ['{"a', '{"a": -', '{"a": [1, {"b": nu', '{"k": "\\u00']:
        state = accepts(prefix)
        assert state is not None and not state.done, prefix


async def _chat(http: aiohttp.ClientSession, url: str, **body: Any) -> dict[str, Any]:
    async with http.post(f"{url}/v1/chat/completions", json={"model": TINY, **body}) as resp:
        reply = await resp.json()
        assert resp.status == 200, reply
        return reply


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_k": 40, "seed": 3}])
async def test_random_model_output_is_json_when_constrained(
    neuron: Daemon, http: aiohttp.ClientSession, sampling: dict[str, Any]
) -> None:
    """Random weights would never write JSON on their own: the constraint is what makes this hold."""
    messages = [{"role": "user", "content": "Reply with a JSON object."}]
    reply = await _chat(
        http, neuron.url, messages=messages, max_tokens=120, response_format={"type": "json_object"}, **sampling
    )
    choice = reply["choices"][0]
    content = choice["message"]["content"]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # ran out of tokens: still a valid prefix of a JSON object
        assert choice["finish_reason"] == "length"
        assert accepts(content) is not None, content
    free = await _chat(http, neuron.url, messages=messages, max_tokens=40, **sampling)
    assert accepts(free["choices"][0]["message"]["content"]) is None, "the unconstrained output is not JSON"


async def test_json_schema_is_refused_clearly(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "x"}]}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    async with http.post(f"{neuron.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "response_format" and "json_object" in error["message"]
