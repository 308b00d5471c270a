"""Chat rendering with the model's own template: tools reach it, no message is ever dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cortex.neuron.engine import EngineError
from cortex.neuron.engine.chat import ChatRenderer, fold_all_system_messages, fold_later_system_messages

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tool_renderer(tiny_tool_model: Path) -> ChatRenderer:
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(tiny_tool_model))


@pytest.fixture(scope="module")
def plain_renderer(tiny_model: Path) -> ChatRenderer:
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(tiny_model))


def in_order(text: str, *parts: str) -> bool:
    position = 0
    for part in parts:
        position = text.find(part, position)
        if position < 0:
            return False
        position += len(part)
    return True


def test_tools_reach_the_template(tool_renderer: ChatRenderer) -> None:
    text = tool_renderer.render_text([{"role": "user", "content": "Weather in Lyon?"}], tools=[WEATHER_TOOL])
    assert "get_weather" in text and "Current weather for a city" in text and "<tools>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_render_returns_the_encoded_template(tool_renderer: ChatRenderer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    ids = tool_renderer.render(messages)
    assert ids == tool_renderer._tokenizer.encode(tool_renderer.render_text(messages), add_special_tokens=False)


@pytest.mark.parametrize(
    "messages",
    [
        # Claude Code: a system message between user turns ...
        [
            {"role": "system", "content": "SYS-A"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"},
            {"role": "system", "content": "SYS-B"},
            {"role": "user", "content": "U2"},
        ],
        # ... and as the very last message.
        [
            {"role": "system", "content": "SYS-A"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"},
            {"role": "system", "content": "SYS-B"},
        ],
    ],
)
def test_system_messages_after_the_first_are_folded_not_dropped(
    tool_renderer: ChatRenderer, messages: list[dict[str, Any]]
) -> None:
    text = tool_renderer.render_text(messages, tools=[WEATHER_TOOL])
    order = [m["content"] for m in messages]
    assert in_order(text, *order[:3]) and all(m in text for m in order)
    assert text.count("SYS-B") == 1
    sys_b_then_u2 = order.index("SYS-B") < order.index("U2")
    assert in_order(text, "SYS-B", "U2") if sys_b_then_u2 else in_order(text, "U2", "SYS-B")


def test_templates_that_allow_it_keep_the_system_message_where_it_was(plain_renderer: ChatRenderer) -> None:
    messages = [
        {"role": "user", "content": "U1"},
        {"role": "system", "content": "SYS-MID"},
        {"role": "assistant", "content": "A1"},
    ]
    assert "<|im_start|>system\nSYS-MID<|im_end|>" in plain_renderer.render_text(messages)


def test_content_parts_and_tool_call_arguments_are_normalised(tool_renderer: ChatRenderer) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = tool_renderer.render_text(messages, tools=[WEATHER_TOOL])
    assert in_order(text, "part one\npart two", '{"name": "get_weather", "arguments": {"city": "Lyon"}}', "sunny")


def test_images_are_refused_clearly(tool_renderer: ChatRenderer) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(EngineError, match="does not accept images"):
        tool_renderer.render([{"role": "user", "content": [{"type": "text", "text": "what is this"}, image]}])


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "no role"}], [{"role": "user", "content": 42}]])
def test_malformed_messages_are_engine_errors(tool_renderer: ChatRenderer, messages: Any) -> None:
    with pytest.raises(EngineError):
        tool_renderer.render(messages)


def test_folding_rules_keep_every_text_in_order() -> None:
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "U1"},
        {"role": "system", "content": "S3"},
        {"role": "assistant", "content": "A1"},
        {"role": "tool", "content": "T1"},
        {"role": "system", "content": "S4"},
        {"role": "assistant", "content": "A2"},
    ]
    assert fold_later_system_messages(messages) == [
        {"role": "system", "content": "S1\n\nS2"},
        {"role": "user", "content": "U1\n\nS3"},
        {"role": "assistant", "content": "A1"},
        {"role": "tool", "content": "T1"},
        {"role": "user", "content": "S4"},
        {"role": "assistant", "content": "A2"},
    ]
    assert fold_all_system_messages(messages[:5]) == [
        {"role": "user", "content": "S1\n\nS2\n\nU1\n\nS3"},
        {"role": "assistant", "content": "A1"},
    ]
