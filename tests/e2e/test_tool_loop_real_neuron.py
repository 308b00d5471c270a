"""A two-turn tool loop end to end: official SDKs -> real gateway -> real neuron -> a model that calls tools.

The model is tiny and trained for exactly this loop (tests/support/trained_tool_model.py): asked for
the weather in Paris with a `get_weather` tool, it writes a Hermes `<tool_call>`; given the tool's
result, it answers in text. Each test checks the structured tool call each dialect hands its client
(so the neuron's tool-call parsing and the gateway's translations are both on the line), sends the
result back the way that SDK's users do, and checks the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.support.gateway_procs import run_single_model_fleet
from tests.support.trained_tool_model import (
    QUESTION,
    SYSTEM_PROMPT,
    TOOL_ARGUMENTS,
    TOOL_DESCRIPTION,
    TOOL_NAME,
    TOOL_PARAMETERS,
    TOOL_RESULT,
    build_tool_calling_model,
    chat_tool,
)

MODEL = "tiny-tool-loop"
MAX_TOKENS = 64  # both replies are about 30 tokens


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tool-loop")
    model_dir = build_tool_calling_model(tmp / "models" / MODEL)
    with run_single_model_fleet(tmp, MODEL, model_dir) as fleet:
        yield fleet.gateway.url


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _anthropic(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)


def _anthropic_tool() -> Any:
    return {"name": TOOL_NAME, "description": TOOL_DESCRIPTION, "input_schema": TOOL_PARAMETERS}


# OpenAI Chat Completions


def test_openai_chat_tool_loop(gateway_url: str) -> None:
    client = _openai(gateway_url)
    tools: Any = [chat_tool()]
    messages: Any = [{"role": "user", "content": QUESTION}]

    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert len(calls) == 1, choice.message
    call = calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == TOOL_NAME
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS
    assert "<tool_call>" not in (choice.message.content or "")

    messages.append({"role": "assistant", "content": choice.message.content, "tool_calls": [call.model_dump()]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT})
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=MAX_TOKENS, temperature=0
    )
    answer = second.choices[0]
    assert answer.finish_reason == "stop", answer
    assert not answer.message.tool_calls
    assert "sunny" in (answer.message.content or ""), answer.message


def _stream_chat(client: openai.OpenAI, messages: Any, tools: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """Text, tool calls reassembled from their deltas (by index), and the finish reason of one stream."""
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish: str | None = None
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            text.append(delta.content or "")
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                if part.function is not None:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
            finish = choice.finish_reason or finish
    return "".join(text), [calls[i] for i in sorted(calls)], finish


def test_openai_chat_streaming_tool_loop(gateway_url: str) -> None:
    client = _openai(gateway_url)
    tools: Any = [chat_tool(description=False)]
    messages: Any = [{"role": "user", "content": QUESTION}]

    text, calls, finish = _stream_chat(client, messages, tools)
    assert finish == "tool_calls", (text, calls)
    assert len(calls) == 1, calls
    call = calls[0]
    assert call["id"] and call["name"] == TOOL_NAME
    assert json.loads(call["arguments"]) == TOOL_ARGUMENTS
    assert "<tool_call>" not in text

    function = {"name": call["name"], "arguments": call["arguments"]}
    messages.append(
        {
            "role": "assistant",
            "content": text,
            "tool_calls": [{"id": call["id"], "type": "function", "function": function}],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": TOOL_RESULT})
    text, calls, finish = _stream_chat(client, messages, tools)
    assert finish == "stop", (text, calls)
    assert not calls
    assert "sunny" in text, text


# Anthropic Messages


def _tool_use_turn(message: anthropic.types.Message) -> anthropic.types.ToolUseBlock:
    assert message.stop_reason == "tool_use", message
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1, message.content
    use = uses[0]
    assert use.id and use.name == TOOL_NAME
    assert use.input == TOOL_ARGUMENTS
    assert all("<tool_call>" not in block.text for block in message.content if block.type == "text")
    return use


def _answer_text(message: anthropic.types.Message) -> str:
    assert message.stop_reason == "end_turn", message
    assert not [block for block in message.content if block.type == "tool_use"]
    return "".join(block.text for block in message.content if block.type == "text")


def test_anthropic_tool_loop(gateway_url: str) -> None:
    client = _anthropic(gateway_url)
    tools: Any = [_anthropic_tool()]
    messages: Any = [{"role": "user", "content": QUESTION}]

    first = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, tools=tools, messages=messages)
    use = _tool_use_turn(first)

    messages.append({"role": "assistant", "content": first.content})
    messages.append(
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": TOOL_RESULT}]}
    )
    second = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, tools=tools, messages=messages)
    assert "sunny" in _answer_text(second), second


def test_anthropic_streaming_tool_loop(gateway_url: str) -> None:
    client = _anthropic(gateway_url)
    tools: Any = [_anthropic_tool()]
    messages: Any = [{"role": "user", "content": QUESTION}]

    def turn() -> anthropic.types.Message:
        with client.messages.stream(
            model=MODEL, max_tokens=MAX_TOKENS, system=SYSTEM_PROMPT, tools=tools, messages=messages
        ) as stream:
            return stream.get_final_message()

    first = turn()
    use = _tool_use_turn(first)

    messages.append({"role": "assistant", "content": first.content})
    result = {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": TOOL_RESULT}]}
    messages.append({"role": "user", "content": [result]})
    second = turn()
    assert "sunny" in _answer_text(second), second


# OpenAI Responses


def test_openai_responses_tool_loop(gateway_url: str) -> None:
    client = _openai(gateway_url)
    tool = {"type": "function", "name": TOOL_NAME, "description": TOOL_DESCRIPTION, "parameters": TOOL_PARAMETERS}
    tools: Any = [tool]
    items: Any = [{"role": "user", "content": QUESTION}]

    first = client.responses.create(
        model=MODEL, input=items, tools=tools, instructions=SYSTEM_PROMPT, max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert first.status == "completed", first
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1, first.output
    call = calls[0]
    assert call.call_id and call.name == TOOL_NAME
    assert json.loads(call.arguments) == TOOL_ARGUMENTS
    assert "<tool_call>" not in first.output_text

    items.append({"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments})
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT})
    second = client.responses.create(
        model=MODEL, input=items, tools=tools, instructions=SYSTEM_PROMPT, max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert second.status == "completed", second
    assert not [item for item in second.output if item.type == "function_call"]
    assert "sunny" in second.output_text, second.output
