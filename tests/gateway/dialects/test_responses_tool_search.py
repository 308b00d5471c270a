"""Responses client-run tool search (`tool_search` with `execution: "client"`, Codex's) and deferred tools:
the search is a function to the model, its calls are `tool_search_call` items, and `tool_search_output`
items load tools into the request. Every output item and event is checked against the openai SDK's types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import ResponseToolSearchCall

from cortex.gateway.dialects.responses.reply import to_response
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.stream import ResponsesStream
from tests.support.dialect_schemas import assert_response, assert_responses_event
from tests.support.responses_translate import rejected, translate

SEARCH_PARAMETERS = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "limit": {"type": "number"}},
    "required": ["query"],
    "additionalProperties": False,
}
# As Codex 0.171.0 sends it (description shortened).
SEARCH_TOOL = {
    "type": "tool_search",
    "execution": "client",
    "description": "# Tool discovery\nSearches over deferred tool metadata with BM25.",
    "parameters": SEARCH_PARAMETERS,
}
ORDERS = {
    "type": "function",
    "name": "list_open_orders",
    "description": "List open orders for a customer ID.\nMore detail the search answer leaves out.",
    "parameters": {"type": "object", "properties": {"customer_id": {"type": "string"}}, "required": ["customer_id"]},
}
CRM = {"type": "namespace", "name": "crm", "description": "CRM tools.", "tools": [ORDERS]}
WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SEARCH_CALL = {
    "type": "tool_search_call",
    "call_id": "search-1",
    "execution": "client",
    "arguments": {"query": "open orders", "limit": 1},
    "status": "completed",
}
SEARCH_OUTPUT = {
    "type": "tool_search_output",
    "call_id": "search-1",
    "execution": "client",
    "status": "completed",
    "tools": [CRM],
}


def functions(chat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"] for t in chat.get("tools", []) if t["type"] == "function"}


def test_client_tool_search_is_a_function_with_the_clients_description_and_parameters() -> None:
    chat = translate(tools=[SEARCH_TOOL, WEATHER])
    search = functions(chat)["tool_search"]
    assert search == {"name": "tool_search", "description": SEARCH_TOOL["description"], "parameters": SEARCH_PARAMETERS}
    assert set(functions(chat)) == {"tool_search", "weather"}
    bare = functions(translate(tools=[{"type": "tool_search", "execution": "client"}]))["tool_search"]
    assert bare["parameters"]["required"] == ["paths"] and bare["description"]  # the Agents SDK's default shape


@pytest.mark.parametrize("tool", [{"type": "tool_search"}, {"type": "tool_search", "execution": "server"}])
def test_hosted_tool_search_is_refused_naming_it(tool: dict[str, Any]) -> None:
    error = rejected(input="x", tools=[WEATHER, tool])
    assert error.param == "tools[1].type"
    assert "tool search" in error.message and '"execution": "client"' in error.message


def test_a_forced_call_to_the_search_is_allowed() -> None:
    chat = translate(tools=[SEARCH_TOOL], tool_choice={"type": "function", "name": "tool_search"})
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "tool_search"}}


def test_deferred_tools_are_listed_by_name_and_description_until_loaded() -> None:
    deferred = {**ORDERS, "defer_loading": True}
    patch = {
        "type": "custom",
        "name": "patch",
        "defer_loading": True,
        "format": {"type": "grammar", "syntax": "regex", "definition": "a+"},
    }
    chat = translate(tools=[SEARCH_TOOL, WEATHER, deferred, patch])
    listed = functions(chat)
    assert listed["list_open_orders"] == {
        "name": "list_open_orders",
        "description": ORDERS["description"],
        "parameters": {"type": "object"},
    }
    assert listed["weather"]["parameters"] == WEATHER["parameters"]
    [custom] = [t["custom"] for t in chat["tools"] if t["type"] == "custom"]
    assert custom["format"] == {"type": "text"}
    # Once a tool search loaded it, it has its schema.
    loaded = {**SEARCH_OUTPUT, "tools": [deferred]}
    chat = translate(input=[{"role": "user", "content": "orders?"}, SEARCH_CALL, loaded], tools=[SEARCH_TOOL, deferred])
    assert functions(chat)["list_open_orders"]["parameters"] == ORDERS["parameters"]


def test_search_call_and_output_become_a_tool_call_its_answer_and_the_loaded_tools() -> None:
    reasoning = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Find it."}]}
    items = [{"role": "user", "content": "Orders of 42?"}, reasoning, SEARCH_CALL, SEARCH_OUTPUT]
    chat = translate(input=items, tools=[SEARCH_TOOL, WEATHER])
    user, call, answer = chat["messages"]
    assert user == {"role": "user", "content": "Orders of 42?"}
    arguments = json.dumps(SEARCH_CALL["arguments"])
    assert call == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Find it.",
        "tool_calls": [
            {"id": "search-1", "type": "function", "function": {"name": "tool_search", "arguments": arguments}}
        ],
    }
    assert answer["role"] == "tool" and answer["tool_call_id"] == "search-1"
    assert (
        answer["content"]
        == "Tools loaded (you can call them now):\n- crm__list_open_orders: List open orders for a customer ID."
    )
    # The loaded namespace's tool is callable under its flat name, after the request's own tools.
    assert list(functions(chat)) == ["tool_search", "weather", "crm__list_open_orders"]
    assert functions(chat)["crm__list_open_orders"]["parameters"] == ORDERS["parameters"]
    forced = translate(
        input=items,
        tools=[SEARCH_TOOL],
        tool_choice={"type": "function", "name": "list_open_orders", "namespace": "crm"},
    )
    assert forced["tool_choice"] == {"type": "function", "function": {"name": "crm__list_open_orders"}}


def test_a_hosted_searchs_items_without_call_ids_pair_in_order() -> None:
    call = {
        "type": "tool_search_call",
        "id": "ts_1",
        "call_id": None,
        "execution": "server",
        "arguments": {"query": "x"},
        "status": "completed",
    }
    output = {
        "type": "tool_search_output",
        "id": "tso_1",
        "call_id": None,
        "execution": "server",
        "status": "completed",
        "tools": [],
    }
    chat = translate(input=[{"role": "user", "content": "x"}, call, output])
    assert chat["messages"][1]["tool_calls"][0]["id"] == chat["messages"][2]["tool_call_id"] == "ts_1"
    assert chat["messages"][2]["content"] == "No tools were found."


def test_a_search_can_load_only_client_tools() -> None:
    output = {**SEARCH_OUTPUT, "tools": [WEATHER, {"type": "mcp", "server_label": "x"}]}
    error = rejected(input=[SEARCH_CALL, output], tools=[SEARCH_TOOL])
    assert error.param == "input[1].tools[1].type" and "'mcp'" in error.message


# ------------------------------------------------------------------------------ replies


def completion(calls: list[dict[str, Any]]) -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    return {"id": "c", "created": 1, "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}


SEARCH = {"id": "call_s", "type": "function", "function": {"name": "tool_search", "arguments": '{"query": "orders"}'}}


def test_a_call_to_the_search_is_a_tool_search_call_item() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [SEARCH_TOOL, WEATHER]})
    weather = {"id": "call_w", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    response = to_response(completion([SEARCH, weather]), req)
    parsed = assert_response(response)
    search, call = response["output"]
    assert isinstance(parsed.output[0], ResponseToolSearchCall)
    assert search["type"] == "tool_search_call" and search["call_id"] == "call_s" and search["execution"] == "client"
    assert search["arguments"] == {"query": "orders"} and search["status"] == "completed"
    assert call["type"] == "function_call" and call["name"] == "weather"
    assert response["tools"][0] == SEARCH_TOOL  # echoed as sent


def test_without_a_client_search_a_function_called_tool_search_stays_a_function_call() -> None:
    plain = {**WEATHER, "name": "tool_search"}
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [plain]})
    [item] = to_response(completion([SEARCH]), req)["output"]
    assert item["type"] == "function_call"


def test_a_streamed_search_call_is_added_then_done() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "stream": True, "tools": [SEARCH_TOOL]})
    stream = ResponsesStream(req, response_id="resp_s")
    head = {
        "index": 0,
        "id": "call_s",
        "type": "function",
        "function": {"name": "tool_search", "arguments": '{"query":'},
    }
    chunks = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [head]}, "finish_reason": None}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' "orders"}'}}]},
                    "finish_reason": None,
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    events = stream.start()
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    for name, data in events:
        assert_responses_event(name, data)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.output_item.done",
        "response.completed",
    ]
    added, done = events[2][1]["item"], events[3][1]["item"]
    assert added["type"] == "tool_search_call" and added["status"] == "in_progress" and added["id"] == done["id"]
    assert done["arguments"] == {"query": "orders"} and done["status"] == "completed" and done["call_id"] == "call_s"
    assert events[-1][1]["response"]["output"] == [done]
