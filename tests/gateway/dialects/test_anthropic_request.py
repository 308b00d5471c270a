"""Anthropic Messages request -> OpenAI chat body."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.core.errors import ApiError
from cortex.core.openai import ChatCompletionRequest
from cortex.gateway.dialects.anthropic.request import parse_count_tokens_request, parse_messages_request
from cortex.gateway.dialects.anthropic.to_chat import to_chat_request
from cortex.gateway.dialects.optional_tools import optional_tools
from tests.support.claude_code import SYSTEM_BLOCKS, TOOL_NAMES, claude_code_request


def translate(**fields: Any) -> dict[str, Any]:
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}
    chat = to_chat_request(parse_messages_request(body))
    ChatCompletionRequest.model_validate(chat)  # what we send must be what the neuron accepts
    return chat


WEATHER = {"name": "weather", "input_schema": {"type": "object", "properties": {}}}


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}


def rejected(body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        to_chat_request(parse_messages_request(body))
    assert caught.value.status == 400
    assert caught.value.anthropic_body()["error"]["type"] == "invalid_request_error"
    return caught.value


def test_minimal_request() -> None:
    assert translate() == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}


def test_system_string_is_first_and_verbatim() -> None:
    system = "  You are terse.\n\nReally.  "
    assert translate(system=system)["messages"][0] == {"role": "system", "content": system}


def test_system_blocks_keep_order_and_boundaries_and_drop_cache_control() -> None:
    chat = translate(system=SYSTEM_BLOCKS)
    assert chat["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": block["text"]} for block in SYSTEM_BLOCKS],
    }


def test_single_system_block_is_a_plain_string() -> None:
    chat = translate(system=[{"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}])
    assert chat["messages"][0] == {"role": "system", "content": "Be kind."}


def test_empty_system_adds_nothing() -> None:
    assert [m["role"] for m in translate(system="")["messages"]] == ["user"]
    assert [m["role"] for m in translate(system=[])["messages"]] == ["user"]


def test_system_role_messages_stay_where_they_are_even_last() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "mid"},
        {"role": "user", "content": "b"},
        {"role": "system", "content": [{"type": "text", "text": "last"}]},
    ]
    chat = translate(system="top", messages=messages)
    assert chat["messages"] == [
        {"role": "system", "content": "top"},
        {"role": "user", "content": "a"},
        {"role": "system", "content": "mid"},
        {"role": "user", "content": "b"},
        {"role": "system", "content": "last"},
    ]


def test_text_blocks_stay_separate_parts() -> None:
    content = [{"type": "text", "text": "<system-reminder>x</system-reminder>"}, {"type": "text", "text": "do it"}]
    chat = translate(messages=[{"role": "user", "content": content}])
    assert chat["messages"] == [{"role": "user", "content": [{"type": "text", "text": t["text"]} for t in content]}]


def test_images_base64_and_url() -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    chat = translate(messages=[{"role": "user", "content": content}])
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]


def test_text_document_becomes_text_and_pdf_is_refused_clearly() -> None:
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "the text"}}
    assert translate(messages=[{"role": "user", "content": [doc]}])["messages"][0]["content"] == "the text"
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    error = rejected({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [pdf]}]})
    assert "plain-text documents" in error.message and "base64" in error.message
    assert error.message.startswith("messages.0.content.0.document.source")


def test_tool_use_becomes_tool_calls_with_json_arguments() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Zürich", "days": 2}},
                {"type": "tool_use", "id": "toolu_2", "name": "clock", "input": {}},
            ],
        },
    ]
    assistant = translate(messages=messages)["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["content"] == "Checking."
    assert assistant["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Zürich", "days": 2}'},
        },
        {"id": "toolu_2", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
    ]


def test_assistant_with_only_tool_calls_has_null_content() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
    ]
    assistant = translate(messages=messages)["messages"][1]
    assert assistant["content"] is None and len(assistant["tool_calls"]) == 1


def test_thinking_blocks_become_reasoning_content_and_redacted_ones_are_skipped() -> None:
    content = [
        {"type": "thinking", "thinking": "step 1. ", "signature": "sig"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "thinking", "thinking": "step 2."},
        {"type": "text", "text": "Answer."},
    ]
    chat = translate(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])
    assert chat["messages"][1] == {"role": "assistant", "content": "Answer.", "reasoning_content": "step 1. step 2."}


def test_tool_results_come_first_as_tool_messages_then_user_text() -> None:
    content = [
        {"type": "text", "text": "here you go"},
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {
            "type": "tool_result",
            "tool_use_id": "toolu_2",
            "content": [{"type": "text", "text": "12:00"}, {"type": "text", "text": "UTC"}],
            "is_error": False,
            "cache_control": {"type": "ephemeral"},
        },
    ]
    chat = translate(messages=[{"role": "user", "content": content}])
    assert chat["messages"] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {
            "role": "tool",
            "tool_call_id": "toolu_2",
            "content": [{"type": "text", "text": "12:00"}, {"type": "text", "text": "UTC"}],
        },
        {"role": "user", "content": "here you go"},
    ]


def test_tool_result_error_content_is_verbatim_and_empty_result_is_empty_string() -> None:
    content = [
        {
            "type": "tool_result",
            "tool_use_id": "a",
            "content": "<tool_use_error>boom</tool_use_error>",
            "is_error": True,
        },
        {"type": "tool_result", "tool_use_id": "b"},
        {"type": "tool_result", "tool_use_id": "c", "content": []},
    ]
    chat = translate(messages=[{"role": "user", "content": content}])
    assert chat["messages"] == [
        {"role": "tool", "tool_call_id": "a", "content": "<tool_use_error>boom</tool_use_error>"},
        {"role": "tool", "tool_call_id": "b", "content": ""},
        {"role": "tool", "tool_call_id": "c", "content": ""},
    ]


def test_images_in_tool_results_move_to_the_following_user_message() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    content = [
        {"type": "tool_result", "tool_use_id": "r", "content": [{"type": "text", "text": "screenshot:"}, image]},
        {"type": "text", "text": "what changed?"},
    ]
    chat = translate(messages=[{"role": "user", "content": content}])
    assert chat["messages"] == [
        {"role": "tool", "tool_call_id": "r", "content": "screenshot:"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "what changed?"},
            ],
        },
    ]


def test_tools_and_every_tool_choice() -> None:
    tools = [
        {"name": "weather", "description": "Get weather", "input_schema": {"type": "object", "properties": {}}},
        {"name": "bare", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
    ]
    chat = translate(tools=tools)
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {}},
                "description": "Get weather",
            },
        },
        {"type": "function", "function": {"name": "bare", "parameters": {"type": "object"}}},
    ]
    assert "tool_choice" not in chat
    expected = {"auto": "auto", "any": "required", "none": "none"}
    for anthropic_type, openai_choice in expected.items():
        assert translate(tools=tools, tool_choice={"type": anthropic_type})["tool_choice"] == openai_choice
    forced = translate(tools=tools, tool_choice={"type": "tool", "name": "weather"})
    assert forced["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    serial = translate(tools=tools, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert serial["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"type": "computer_20250124", "name": "computer", "display_width_px": 1024, "display_height_px": 768},
        {"type": "mcp_toolset", "mcp_server_name": "x"},
    ],
)
def test_vendor_run_tools_are_refused_by_name(tool: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        to_chat_request(parse_messages_request(request(tools=[WEATHER, tool])))
    error = caught.value
    assert error.status == 400 and error.param == "tools.1.type" and repr(tool["type"]) in error.message
    assert error.anthropic_body()["error"]["type"] == "invalid_request_error"


def test_optional_vendor_tools_are_dropped_and_tool_choice_needs_tools() -> None:
    server_tools = [{"type": "web_search_20250305", "name": "web_search"}, {"type": "web_fetch_20250910"}]
    for optional in ("web_search, web_fetch_20250910", "*"):
        req = parse_messages_request(request(tools=server_tools, tool_choice={"type": "any"}), optional_tools(optional))
        chat = to_chat_request(req)
        assert "tools" not in chat and "tool_choice" not in chat


def test_mcp_connector_is_refused_unless_optional() -> None:
    servers = [{"type": "url", "url": "https://mcp.example/sse", "name": "x"}]
    with pytest.raises(ApiError, match="mcp_servers"):
        parse_messages_request(request(mcp_servers=servers))
    assert "tools" not in to_chat_request(parse_messages_request(request(mcp_servers=servers), optional_tools("*")))


def test_custom_tool_needs_input_schema() -> None:
    with pytest.raises(ApiError, match=r"tools\.0\.input_schema"):
        parse_messages_request(request(tools=[{"name": "bare"}]))


def test_client_run_anthropic_tools_get_their_documented_schemas() -> None:
    tools = [
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool", "max_characters": 10000},
        {"type": "memory_20250818", "name": "memory"},
    ]
    chat = translate(tools=tools, tool_choice={"type": "tool", "name": "bash"})
    functions = [t["function"] for t in chat["tools"]]
    assert [f["name"] for f in functions] == ["bash", "str_replace_based_edit_tool", "memory"]
    assert set(functions[0]["parameters"]["properties"]) == {"command", "restart"}
    assert functions[1]["parameters"]["required"] == ["command", "path"]
    assert "rename" in functions[2]["parameters"]["properties"]["command"]["enum"]
    assert all(f["description"] for f in functions)
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "bash"}}


def test_sampling_fields() -> None:
    chat = translate(
        temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:", "END"], metadata={"user_id": "u-1"}
    )
    assert chat["temperature"] == 0.2 and chat["top_p"] == 0.9 and chat["top_k"] == 40
    assert chat["stop"] == ["\n\nHuman:", "END"]
    assert chat["user"] == "u-1"


def test_streaming_is_kept() -> None:
    """Usage is asked for by the relay, for every stream (test_relay.py); the translation keeps `stream`."""
    assert translate(stream=True)["stream"] is True
    assert "stream" not in translate(stream=False)


def test_huge_max_tokens_passes_for_the_neuron_to_clip() -> None:
    assert translate(max_tokens=32000)["max_tokens"] == 32000


def test_max_tokens_is_required() -> None:
    error = rejected({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert error.message == "max_tokens: Field required" and error.param == "max_tokens"


def test_count_tokens_needs_no_max_tokens_and_sends_no_sampling() -> None:
    req = parse_count_tokens_request({"model": "m", "system": "s", "messages": [{"role": "user", "content": "hi"}]})
    assert to_chat_request(req) == {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
    }


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "m", "max_tokens": 1, "messages": []}, "messages: List should have at least 1 item"),
        ({"model": "", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}, "model:"),
        ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens:"),
        ({"model": "m", "max_tokens": 1, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        (
            {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "sparkle"}]}]},
            "Input tag 'sparkle'",
        ),
        (
            {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text.text: Field required",
        ),
        (
            {"model": "m", "max_tokens": 1, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]},
            "temperature:",
        ),
        (
            {
                "model": "m",
                "max_tokens": 1,
                "tool_choice": {"type": "tool"},
                "messages": [{"role": "user", "content": "x"}],
            },
            "tool_choice of type 'tool' needs a 'name'",
        ),
    ],
)
def test_invalid_requests_are_400_with_a_path(body: dict[str, Any], fragment: str) -> None:
    assert fragment in rejected(body).message


def test_body_must_be_an_object() -> None:
    with pytest.raises(ApiError) as caught:
        parse_messages_request([1, 2])
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("role", "block"),
    [
        ("user", {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
        ("user", {"type": "thinking", "thinking": "x"}),
        ("assistant", {"type": "tool_result", "tool_use_id": "t", "content": "x"}),
        ("assistant", {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}),
        ("system", {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}),
    ],
)
def test_misplaced_blocks_are_400(role: str, block: dict[str, Any]) -> None:
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": role, "content": [block]}]}
    assert f"a '{block['type']}' block cannot appear in a '{role}' message" in rejected(body).message


def test_unknown_fields_are_ignored() -> None:
    chat = translate(
        thinking={"type": "enabled", "budget_tokens": 1024},
        context_management={"edits": []},
        output_config={"effort": "low"},
        service_tier="auto",
        container="c",
        mcp_servers=[],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "citations": None, "novel": 1}]}],
    )
    assert chat["messages"] == [{"role": "user", "content": "hi"}]


def test_claude_code_request_translates_completely() -> None:
    body = claude_code_request("m")
    chat = to_chat_request(parse_messages_request(body))
    ChatCompletionRequest.model_validate(chat)
    assert chat["max_tokens"] == 32000 and chat["stream"] is True
    assert chat["user"] == body["metadata"]["user_id"]
    assert [t["function"]["name"] for t in chat["tools"]] == TOOL_NAMES
    roles = [m["role"] for m in chat["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "system", "user", "system"]
    assert chat["messages"][0]["content"] == [{"type": "text", "text": b["text"]} for b in SYSTEM_BLOCKS]
    assert chat["messages"][2]["reasoning_content"] == "I should run ls."
    assert [c["id"] for c in chat["messages"][2]["tool_calls"]] == ["toolu_01A", "toolu_01B"]
    assert chat["messages"][4] == {
        "role": "tool",
        "tool_call_id": "toolu_01B",
        "content": "<tool_use_error>No such file</tool_use_error>",
    }
    assert chat["messages"][5] == {"role": "system", "content": "The user switched to plan mode."}
    assert chat["messages"][7] == {"role": "system", "content": "Reminder: be brief."}


def test_top_p_zero_is_the_top_token_alone() -> None:
    chat = translate(top_p=0, temperature=0.5)
    assert "top_p" not in chat and chat["top_k"] == 1


def test_search_result_blocks_are_text_with_their_source() -> None:
    result = {
        "type": "search_result",
        "source": "https://example.com/doc",
        "title": "Doc",
        "content": [{"type": "text", "text": "Paris is the capital."}],
        "citations": {"enabled": True},
    }
    chat = translate(
        messages=[
            {"role": "user", "content": [result, {"type": "text", "text": "What is the capital?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "search", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [result]}]},
        ]
    )
    text = "Search result: Doc (https://example.com/doc)\nParis is the capital."
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": text},
        {"type": "text", "text": "What is the capital?"},
    ]
    assert chat["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": text}
