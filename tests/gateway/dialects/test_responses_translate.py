"""OpenAI Responses <-> Chat: requests, whole replies, streamed events."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.core.errors import ApiError
from cortex.gateway.dialects.optional_tools import optional_tools
from cortex.gateway.dialects.responses.reply import to_response
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.stream import ResponsesStream
from cortex.gateway.dialects.responses.to_chat import to_chat_request
from tests.support.dialect_schemas import assert_response, assert_responses_event
from tests.support.responses_translate import rejected, translate

WEATHER_TOOL = {
    "type": "function",
    "name": "weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


# ------------------------------------------------------------------------------ requests


def test_string_input_and_instructions_first_verbatim() -> None:
    chat = translate(instructions="  Be brief.\n", max_output_tokens=50, temperature=0.3, top_p=0.5)
    assert chat == {
        "model": "m",
        "messages": [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "hi"}],
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.5,
    }


def test_message_items_with_typed_parts() -> None:
    items = [
        {"role": "developer", "content": "dev rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}]},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "and this"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
            ],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
        {"role": "system", "content": "late system"},
    ]
    assert translate(input=items)["messages"] == [
        {"role": "developer", "content": "dev rules"},
        {"role": "user", "content": "look"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "late system"},
    ]


def test_function_calls_and_outputs_match_by_call_id() -> None:
    items = [
        {"role": "user", "content": "weather in Oslo and Rome?"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "two calls"}],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "Checking both."}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city":"Oslo"}', "id": "fc_1"},
        {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "sun"}]},
    ]
    chat = translate(input=items, tools=[WEATHER_TOOL])
    assert chat["messages"] == [
        {"role": "user", "content": "weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "reasoning_content": "two calls",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sun"},
    ]


def test_function_call_without_preceding_assistant_text() -> None:
    items = [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "done"},
    ]
    messages = translate(input=items)["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


def test_tools_flat_to_nested_and_tool_choice() -> None:
    chat = translate(tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False)
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": WEATHER_TOOL["parameters"],
                "description": "Weather for a city",
                "strict": True,
            },
        }
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    forced = translate(tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "weather"})
    assert forced["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    other = {**WEATHER_TOOL, "name": "news"}
    subset = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "weather"}]}
    allowed = translate(tools=[WEATHER_TOOL, other], tool_choice=subset)
    assert allowed["tool_choice"] == "required"
    assert [t["function"]["name"] for t in allowed["tools"]] == ["weather"]  # the model sees only the subset
    namespaced = {
        "type": "allowed_tools",
        "mode": "auto",
        "tools": [{"type": "custom", "name": "tell", "namespace": "multi_agent_v1"}],
    }
    assert [t["custom"]["name"] for t in translate(tools=[WEATHER_TOOL, AGENTS], tool_choice=namespaced)["tools"]] == [
        "multi_agent_v1__tell"
    ]


def test_text_format_becomes_response_format() -> None:
    assert translate(text={"format": {"type": "text"}}).get("response_format") is None
    assert translate(text={"format": {"type": "json_object"}})["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = translate(text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }


def test_streaming_is_kept() -> None:
    """Usage is asked for by the relay, for every stream (test_relay.py); the translation keeps `stream`."""
    assert translate(stream=True)["stream"] is True


def test_unknown_fields_are_ignored() -> None:
    chat = translate(
        store=True, reasoning={"effort": "high"}, include=["reasoning.encrypted_content"], truncation="auto"
    )
    assert chat["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"input": "x", "conversation": "conv_1"}, "conversation", "stateless"),
        ({"input": "x", "background": True}, "background", "background"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "stateless"),
        ({"input": [{"type": "computer_call_output", "call_id": "x"}]}, "input.0", "'computer_call_output'"),
        ({"input": [{"type": {"content": 1}}]}, "input.0.type", "valid string"),  # a `type` that cannot be a key
        ({"input": [{"type": ["message"]}]}, "input.0.type", "valid string"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, None, "input_file"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, None, "file_id"),
        ({"input": "x", "tool_choice": "sometimes", "tools": [WEATHER_TOOL]}, "tool_choice", "sometimes"),
        ({"input": "x", "tool_choice": {"type": "web_search"}, "tools": [WEATHER_TOOL]}, "tool_choice", "web_search"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools.0.name", "Field required"),
        ({"input": "x", "tools": [{"type": "custom", "name": "p", "format": {"type": "grammar"}}]}, None, "syntax"),
        ({"input": "x", "tools": [WEATHER_TOOL, {"type": "web_search"}]}, "tools[1].type", "'web_search'"),
        ({"input": "x", "tools": [{"type": "code_interpreter", "container": {}}]}, "tools[0].type", "OpenAI's servers"),
        ({"input": "x", "tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools", "two tools are called 'weather'"),
        ({"input": "x", "tools": [{"type": "computer"}]}, "tools[0].type", "declare function tools for it instead"),
        (
            {
                "input": "x",
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []},
            },
            "tool_choice.tools",
            "none of the request's tools",
        ),
        (
            {"input": "x", "tool_choice": {"type": "custom", "name": "nope"}, "tools": [WEATHER_TOOL]},
            "tool_choice",
            "nope",
        ),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({}, "input", "Field required"),
    ],
)
def test_refusals_are_clear_400s(fields: dict[str, Any], param: str | None, fragment: str) -> None:
    error = rejected(**fields)
    assert fragment in error.message
    if param:
        assert error.param == param
    assert error.openai_body()["error"]["type"] == "invalid_request_error"


def test_image_in_function_output_is_refused() -> None:
    output = [{"type": "input_image", "image_url": "https://x/y.png"}]
    error = rejected(input=[{"type": "function_call_output", "call_id": "c", "output": output}])
    assert "text only" in error.message


# ------------------------------------------------------------------------------ whole replies


def chat_completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-9",
        "created": 1700000000,
        "model": "neuron",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }


def test_text_response_object() -> None:
    req = parse_responses_request({"model": "alias", "input": "hi", "instructions": "sys", "metadata": {"k": "v"}})
    response = to_response(chat_completion({"content": "Hello"}), req, response_id="resp_1")
    parsed = assert_response(response)
    assert parsed.output_text == "Hello"
    assert response["id"] == "resp_1" and response["object"] == "response" and response["status"] == "completed"
    assert response["model"] == "alias" and response["instructions"] == "sys" and response["metadata"] == {"k": "v"}
    assert response["usage"]["input_tokens"] == 20 and response["usage"]["output_tokens"] == 5
    assert response["usage"]["total_tokens"] == 25
    assert response["output"][0]["id"].startswith("msg_")


def test_function_call_items() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [WEATHER_TOOL]})
    reply = chat_completion(
        {
            "content": None,
            "reasoning_content": "need weather",
            "tool_calls": [{"id": "call_7", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        finish="tool_calls",
    )
    response = to_response(reply, req)
    assert_response(response)
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["reasoning", "function_call"]
    call = response["output"][1]
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == (
        "call_7",
        "weather",
        "{}",
        "completed",
    )
    assert call["id"].startswith("fc_")
    assert response["tools"][0]["name"] == "weather"


def test_length_makes_an_incomplete_response() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "max_output_tokens": 5})
    response = to_response(chat_completion({"content": "trunc"}, finish="length"), req)
    assert_response(response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


# ------------------------------------------------------------------------------ streaming


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def stream_events(chunks: list[dict[str, Any]], **fields: Any) -> list[tuple[str, dict[str, Any]]]:
    req = parse_responses_request({"model": "m", "input": "hi", **fields})
    stream = ResponsesStream(req, response_id="resp_s")
    events = stream.start()
    for item in chunks:
        events += stream.feed(item)
    events += stream.finish()
    for name, data in events:
        assert_responses_event(name, data)
    return events


def test_text_stream_sequence() -> None:
    events = stream_events(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk({}, "stop"),
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        ]
    )
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert events[6][1]["text"] == "Hello"
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 5
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []


def test_function_call_stream_sequence() -> None:
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    events = stream_events(
        [
            chunk({"tool_calls": [head]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "weather", "arguments": "{}"}}]}),
            chunk({}, "tool_calls"),
        ],
        tools=[WEATHER_TOOL],
    )
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[5][1]["arguments"] == '{"city":"Oslo"}'
    outputs = events[-1][1]["response"]["output"]
    assert [(o["call_id"], o["arguments"]) for o in outputs] == [("call_1", '{"city":"Oslo"}'), ("call_2", "{}")]
    assert [o["id"] for o in outputs] == [events[2][1]["item"]["id"], events[7][1]["item"]["id"]]


def test_reasoning_then_text_stream() -> None:
    events = stream_events([chunk({"reasoning_content": "hmm"}), chunk({"content": "yes"}), chunk({}, "stop")])
    names = [name for name, _ in events]
    assert names[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
    ]
    assert [o["type"] for o in events[-1][1]["response"]["output"]] == ["reasoning", "message"]


def test_length_stream_ends_incomplete() -> None:
    events = stream_events([chunk({"content": "a"}), chunk({}, "length")])
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_failure_mid_stream() -> None:
    req = parse_responses_request({"model": "m", "input": "hi"})
    stream = ResponsesStream(req)
    events = stream.start() + stream.feed(chunk({"content": "par"}))
    events += stream.fail(ApiError(503, "model is recovering", code="model_recovering"))
    for name, data in events:
        assert_responses_event(name, data)
    assert events[-2][1] == {
        "type": "error",
        "sequence_number": events[-2][1]["sequence_number"],
        "code": "model_recovering",
        "message": "model is recovering",
        "param": None,
    }
    failed = events[-1][1]["response"]
    assert events[-1][0] == "response.failed" and failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "model is recovering"}
    assert stream.finish() == [] and stream.fail(ApiError(500, "again")) == []


def test_interleaved_function_arguments_fail_loudly() -> None:
    req = parse_responses_request({"model": "m", "input": "hi"})
    stream = ResponsesStream(req)
    stream.feed(chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{"}}]}))
    stream.feed(chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}]}))
    with pytest.raises(ApiError):
        stream.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}))


def test_cached_prompt_tokens_are_reported_as_cached_input() -> None:
    req = parse_responses_request({"model": "m", "input": "hi"})
    reply = chat_completion({"content": "Hello"})
    reply["usage"]["prompt_tokens_details"] = {"cached_tokens": 16}
    usage = to_response(reply, req)["usage"]
    assert (usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]) == (20, 16)

    stream = ResponsesStream(req)
    stream.start()
    stream.feed({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]})
    usage_chunk = {"prompt_tokens": 20, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 16}}
    stream.feed({"choices": [], "usage": usage_chunk})
    done = [data for name, data in stream.finish() if name == "response.completed"]
    assert done[0]["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 16


# ------------------------------------------------------------------------------ custom, namespace and hosted tools

PATCH_GRAMMAR = 'start: "*** Begin Patch\\n" LINE* "*** End Patch"\nLINE: /[^\\n]*\\n/'
PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files",
    "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_GRAMMAR},
}
NOTE_TOOL = {"type": "custom", "name": "note", "format": {"type": "text"}}
AGENTS = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Sub-agents",
    "tools": [
        {"type": "function", "name": "spawn", "parameters": {"type": "object", "properties": {}}},
        {"type": "custom", "name": "tell"},
    ],
}


def test_custom_tools_become_the_neurons_custom_tools() -> None:
    chat = translate(tools=[PATCH_TOOL, NOTE_TOOL], tool_choice={"type": "custom", "name": "apply_patch"})
    assert chat["tools"] == [
        {
            "type": "custom",
            "custom": {
                "name": "apply_patch",
                "description": "Edit files",
                "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": PATCH_GRAMMAR}},
            },
        },
        {"type": "custom", "custom": {"name": "note", "format": {"type": "text"}}},
    ]
    assert chat["tool_choice"] == {"type": "custom", "custom": {"name": "apply_patch"}}


def test_custom_tool_call_and_output_items_become_the_conversation() -> None:
    chat = translate(
        tools=[PATCH_TOOL, AGENTS],
        input=[
            {"role": "user", "content": "fix it"},
            {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch\n"},
            {
                "type": "function_call",
                "call_id": "c2",
                "name": "spawn",
                "namespace": "multi_agent_v1",
                "arguments": "{}",
            },
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done!"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "ok"}]},
        ],
    )
    assert chat["messages"] == [
        {"role": "user", "content": "fix it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch\n"}},
                {"id": "c2", "type": "function", "function": {"name": "multi_agent_v1__spawn", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Done!"},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"},
    ]


def test_namespace_tools_are_flattened() -> None:
    chat = translate(tools=[AGENTS], tool_choice={"type": "function", "name": "spawn", "namespace": "multi_agent_v1"})
    assert [t["type"] for t in chat["tools"]] == ["function", "custom"]
    assert chat["tools"][0]["function"]["name"] == "multi_agent_v1__spawn"
    assert chat["tools"][1]["custom"]["name"] == "multi_agent_v1__tell"
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "multi_agent_v1__spawn"}}


def test_optional_hosted_tools_are_dropped() -> None:
    optional = optional_tools("web_search, image_generation")
    req = parse_responses_request(
        {"model": "m", "input": "x", "tools": [{"type": "web_search"}, WEATHER_TOOL, {"type": "image_generation"}]},
        optional,
    )
    assert [t["function"]["name"] for t in to_chat_request(req)["tools"]] == ["weather"]
    with pytest.raises(ApiError, match="'file_search'"):
        parse_responses_request({"model": "m", "input": "x", "tools": [{"type": "file_search"}]}, optional)
    everything = parse_responses_request({"model": "m", "input": "x", "tools": [{"type": "mcp"}]}, optional_tools("*"))
    assert "tools" not in to_chat_request(everything)


def test_custom_and_namespaced_calls_in_the_reply() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [PATCH_TOOL, AGENTS]})
    calls = [
        {"id": "call_1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch\n"}},
        {"id": "call_2", "type": "function", "function": {"name": "multi_agent_v1__spawn", "arguments": "{}"}},
        {"id": "call_3", "type": "custom", "custom": {"name": "multi_agent_v1__tell", "input": "hi"}},
    ]
    response = to_response(chat_completion({"content": None, "tool_calls": calls}, finish="tool_calls"), req)
    assert_response(response)
    patch, spawn, tell = response["output"]
    assert patch == {
        "id": patch["id"],
        "type": "custom_tool_call",
        "call_id": "call_1",
        "name": "apply_patch",
        "input": "*** Begin Patch\n",
    }
    assert (spawn["type"], spawn["name"], spawn["namespace"]) == ("function_call", "spawn", "multi_agent_v1")
    assert (tell["type"], tell["name"], tell["namespace"], tell["input"]) == (
        "custom_tool_call",
        "tell",
        "multi_agent_v1",
        "hi",
    )
    assert [t["type"] for t in response["tools"]] == ["custom", "namespace"]


def test_custom_tool_call_stream_sequence() -> None:
    head = {"index": 0, "id": "call_1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin"}}
    spawn = {"index": 1, "id": "call_2", "type": "function", "function": {"name": "multi_agent_v1__spawn"}}
    events = stream_events(
        [
            chunk({"tool_calls": [head]}),
            chunk({"tool_calls": [{"index": 0, "type": "custom", "custom": {"input": " Patch\n"}}]}),
            chunk({"tool_calls": [spawn]}),
            chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
            chunk({}, "tool_calls"),
        ],
        tools=[PATCH_TOOL, AGENTS],
    )
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[2][1]["item"]["input"] == "" and events[5][1]["input"] == "*** Begin Patch\n"
    assert events[7][1]["item"]["namespace"] == "multi_agent_v1" and events[7][1]["item"]["name"] == "spawn"
    patch, call = events[-1][1]["response"]["output"]
    assert (patch["type"], patch["name"], patch["input"]) == ("custom_tool_call", "apply_patch", "*** Begin Patch\n")
    assert (call["name"], call["namespace"], call["arguments"]) == ("spawn", "multi_agent_v1", "{}")


def test_logprobs_stream_on_the_text_events() -> None:
    def entry(token: str) -> dict[str, Any]:
        top = [{"token": token, "logprob": -0.1, "bytes": list(token.encode())}]
        return {"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": top}

    def logprobs(*tokens: str) -> dict[str, Any]:
        choice = {"index": 0, "delta": {}, "logprobs": {"content": [entry(t) for t in tokens]}, "finish_reason": None}
        return {"object": "chat.completion.chunk", "choices": [choice]}

    chunks = [
        logprobs("Hel", "lo"),
        chunk({"content": "Hello"}),
        logprobs("!"),
        chunk({"content": "!"}),
        chunk({}, "stop"),
    ]
    events = dict(stream_events(chunks, include=["message.output_text.logprobs"], top_logprobs=1))
    deltas = [
        data
        for name, data in stream_events(chunks, include=["message.output_text.logprobs"])
        if name.endswith("text.delta")
    ]
    assert [[p["token"] for p in d["logprobs"]] for d in deltas] == [["Hel", "lo"], ["!"]]
    assert deltas[0]["logprobs"][0] == {
        "token": "Hel",
        "logprob": -0.1,
        "top_logprobs": [{"token": "Hel", "logprob": -0.1}],
    }
    assert [p["token"] for p in events["response.output_text.done"]["logprobs"]] == ["Hel", "lo", "!"]
    part = events["response.completed"]["response"]["output"][0]["content"][0]
    assert [p["token"] for p in part["logprobs"]] == ["Hel", "lo", "!"] and part["logprobs"][0]["bytes"] == [
        72,
        101,
        108,
    ]
    without = [data for name, data in stream_events(chunks) if name.endswith("text.delta")]
    assert all(d["logprobs"] == [] for d in without)
