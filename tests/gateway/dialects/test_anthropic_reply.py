"""OpenAI chat completion (whole or streamed) -> Anthropic message / events."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.core.errors import ApiError
from cortex.gateway.dialects.anthropic.reply import parse_tool_arguments, stop_reason, to_anthropic_message
from cortex.gateway.dialects.anthropic.stream import AnthropicStream, error_event, ping_event
from cortex.gateway.dialects.anthropic.to_chat import RAW_ARGUMENTS_KEY
from tests.support.dialect_schemas import assert_anthropic_event, assert_anthropic_message


def completion(
    message: dict[str, Any], finish: str = "stop", usage: tuple[int, int] = (11, 7), **choice: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "neuron-model",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# ------------------------------------------------------------------------------ whole replies


def test_text_reply() -> None:
    message = to_anthropic_message(completion({"content": "Hello!"}), model="alias", message_id="msg_1")
    assert_anthropic_message(message)
    assert message == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "alias",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 11,
            "output_tokens": 7,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def test_generated_message_id_has_anthropic_prefix() -> None:
    assert to_anthropic_message(completion({"content": "x"}), model="m")["id"].startswith("msg_")


def test_tool_calls_are_never_dropped_and_inputs_are_objects() -> None:
    reply = completion(
        {
            "content": "Let me look.",
            "tool_calls": [call("call_1", "read", '{"path": "a.py"}'), call("call_2", "ls", "")],
        },
        finish="tool_calls",
    )
    message = to_anthropic_message(reply, model="m")
    assert_anthropic_message(message)
    assert message["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "read", "input": {"path": "a.py"}},
        {"type": "tool_use", "id": "call_2", "name": "ls", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"


def test_tool_calls_with_finish_reason_stop_still_mean_tool_use() -> None:
    message = to_anthropic_message(completion({"content": None, "tool_calls": [call("c", "f", "{}")]}), model="m")
    assert message["stop_reason"] == "tool_use"
    assert message["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]


def test_missing_tool_call_id_gets_an_anthropic_one() -> None:
    reply = completion({"tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]})
    assert to_anthropic_message(reply, model="m")["content"][0]["id"].startswith("toolu_")


@pytest.mark.parametrize(
    ("finish", "sequence", "used_tools", "expected"),
    [
        ("stop", None, False, ("end_turn", None)),
        ("stop", "END", False, ("stop_sequence", "END")),
        ("stop", "", False, ("stop_sequence", "")),
        ("length", None, False, ("max_tokens", None)),
        ("length", None, True, ("max_tokens", None)),
        ("tool_calls", None, True, ("tool_use", None)),
        ("function_call", None, False, ("tool_use", None)),
        ("content_filter", None, False, ("refusal", None)),
        (None, None, False, ("end_turn", None)),
    ],
)
def test_stop_reasons(finish: str | None, sequence: str | None, used_tools: bool, expected: tuple[str, Any]) -> None:
    assert stop_reason(finish, sequence, used_tools) == expected


def test_stop_sequence_reported_by_the_neuron() -> None:
    message = to_anthropic_message(completion({"content": "one two"}, stop_sequence="three"), model="m")
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "three")
    assert_anthropic_message(message)


def test_length_is_max_tokens() -> None:
    assert (
        to_anthropic_message(completion({"content": "tru"}, finish="length"), model="m")["stop_reason"] == "max_tokens"
    )


def test_reasoning_becomes_a_thinking_block_only_when_thinking_was_asked() -> None:
    reply = completion({"content": "42", "reasoning_content": "6 times 7"})
    with_thinking = to_anthropic_message(reply, model="m", thinking=True)
    assert_anthropic_message(with_thinking)
    assert with_thinking["content"] == [
        {"type": "thinking", "thinking": "6 times 7", "signature": ""},
        {"type": "text", "text": "42"},
    ]
    assert to_anthropic_message(reply, model="m")["content"] == [{"type": "text", "text": "42"}]


def test_empty_reply_has_no_blocks_and_missing_usage_is_zero() -> None:
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}
    message = to_anthropic_message(reply, model="m")
    assert_anthropic_message(message)
    assert message["content"] == []
    assert message["usage"]["input_tokens"] == 0 and message["usage"]["output_tokens"] == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  {"a": [1, 2]}\n', {"a": [1, 2]}),
        ("", {}),
        (None, {}),
        ("null", {}),
        ("{}", {}),
        ('```json\n{"path": "x"}\n```', {"path": "x"}),
        ('{"a": 1}}', {"a": 1}),
        ('Sure: {"q": "z"} done', {"q": "z"}),
        ("[1, 2]", {RAW_ARGUMENTS_KEY: "[1, 2]"}),
        ('"just a string"', {RAW_ARGUMENTS_KEY: '"just a string"'}),
        ('{"a": ', {RAW_ARGUMENTS_KEY: '{"a": '}),
        ("not json", {RAW_ARGUMENTS_KEY: "not json"}),
    ],
)
def test_tool_arguments_best_effort(raw: str | None, expected: dict[str, Any]) -> None:
    assert parse_tool_arguments(raw) == expected


# ------------------------------------------------------------------------------ streaming


def chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "neuron-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}],
    }


def usage_chunk(prompt: int, completion_tokens: int) -> dict[str, Any]:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}


def tool_delta(index: int, *, call_id: str | None = None, name: str | None = None, args: str = "") -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        fragment["id"] = call_id
        fragment["type"] = "function"
    if name:
        fragment["function"]["name"] = name
    return {"tool_calls": [fragment]}


def run_stream(chunks: list[dict[str, Any]], **options: Any) -> list[tuple[str, dict[str, Any]]]:
    stream = AnthropicStream("alias", message_id="msg_s", **options)
    events = stream.start()
    for item in chunks:
        events += stream.feed(item)
    events += stream.finish()
    for name, data in events:
        assert_anthropic_event(name, data)
    return events


def names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in events]


def test_text_stream_exact_events() -> None:
    events = run_stream(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk({}, "stop"),
            usage_chunk(12, 2),
        ]
    )
    empty_usage = {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert events == [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_s",
                    "type": "message",
                    "role": "assistant",
                    "model": "alias",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": empty_usage,
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {
                    "input_tokens": 12,
                    "output_tokens": 2,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def test_known_input_tokens_go_in_message_start() -> None:
    events = run_stream([chunk({"content": "x"}, "stop")], input_tokens=321)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 321


def test_message_start_is_emitted_once_even_without_start_call() -> None:
    stream = AnthropicStream("m")
    events = stream.feed(chunk({"content": "a"})) + stream.feed(chunk({"content": "b"})) + stream.finish()
    assert names(events).count("message_start") == 1 and names(events)[0] == "message_start"
    assert stream.finish() == [] and stream.feed(chunk({"content": "late"})) == []


def test_tool_call_in_pieces_after_text() -> None:
    events = run_stream(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Looking"}),
            chunk(tool_delta(0, call_id="call_a", name="read")),
            chunk(tool_delta(0, args='{"pa')),
            chunk(tool_delta(0, args='th": "x.py"}')),
            chunk({}, "tool_calls"),
            usage_chunk(30, 9),
        ]
    )
    assert names(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[4][1]
    assert start == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_a", "name": "read", "input": {}},
    }
    assert events[5][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"path": "x.py"}'}
    assert events[5][1]["index"] == 1 and events[6][1]["index"] == 1
    assert events[7][1]["delta"]["stop_reason"] == "tool_use"
    assert events[7][1]["usage"]["output_tokens"] == 9


def test_several_tool_calls_get_consecutive_indices() -> None:
    events = run_stream(
        [
            chunk(tool_delta(0, call_id="c0", name="a", args="{}")),
            chunk(tool_delta(1, call_id="c1", name="b", args='{"x":')),
            chunk(tool_delta(1, args=" 1}")),
            chunk(tool_delta(2, call_id="c2", name="c", args='{"y": 2}')),
            chunk({}, "tool_calls"),
        ]
    )
    starts = [data for name, data in events if name == "content_block_start"]
    assert [(s["index"], s["content_block"]["id"]) for s in starts] == [(0, "c0"), (1, "c1"), (2, "c2")]
    partials = [data["delta"]["partial_json"] for name, data in events if name == "content_block_delta"]
    assert partials == ["{}", '{"x": 1}', '{"y": 2}']


def test_tool_block_waits_for_the_name() -> None:
    events = run_stream(
        [
            chunk({"tool_calls": [{"index": 0, "id": "late", "type": "function", "function": {"arguments": ""}}]}),
            chunk(tool_delta(0, name="named", args='{"k": true}')),
            chunk({}, "tool_calls"),
        ]
    )
    start = next(data for name, data in events if name == "content_block_start")
    assert start["content_block"] == {"type": "tool_use", "id": "late", "name": "named", "input": {}}


def test_invalid_streamed_arguments_are_repaired_like_whole_replies() -> None:
    events = run_stream([chunk(tool_delta(0, call_id="c", name="f", args="oops")), chunk({}, "tool_calls")])
    delta = next(data for name, data in events if name == "content_block_delta")
    assert delta["delta"]["partial_json"] == '{"raw_arguments": "oops"}'


def test_interleaved_tool_arguments_fail_loudly() -> None:
    stream = AnthropicStream("m")
    stream.feed(chunk(tool_delta(0, call_id="a", name="f", args="{")))
    stream.feed(chunk(tool_delta(1, call_id="b", name="g", args="{}")))
    with pytest.raises(ApiError) as caught:
        stream.feed(chunk(tool_delta(0, args="}")))
    assert caught.value.status == 502


def test_unnamed_tool_call_fails_at_the_end() -> None:
    stream = AnthropicStream("m")
    stream.feed(chunk({"tool_calls": [{"index": 0, "id": "x", "function": {"arguments": "{}"}}]}))
    with pytest.raises(ApiError):
        stream.finish()


def test_thinking_then_text_keeps_the_text() -> None:
    events = run_stream(
        [
            chunk({"reasoning_content": "Let me "}),
            chunk({"reasoning_content": "think."}),
            chunk({"content": "Answer"}),
            chunk({"content": "!"}),
            chunk({}, "stop"),
        ],
        thinking=True,
    )
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert starts == [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "text", "text": ""}]
    deltas = [(data["index"], data["delta"]) for name, data in events if name == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "Let me "}),
        (0, {"type": "thinking_delta", "thinking": "think."}),
        (1, {"type": "text_delta", "text": "Answer"}),
        (1, {"type": "text_delta", "text": "!"}),
    ]


def test_reasoning_is_dropped_without_thinking_but_text_is_not() -> None:
    events = run_stream([chunk({"reasoning_content": "hidden"}), chunk({"content": "shown"}), chunk({}, "stop")])
    starts = [data for name, data in events if name == "content_block_start"]
    assert len(starts) == 1 and starts[0]["index"] == 0
    assert [d["delta"] for n, d in events if n == "content_block_delta"] == [{"type": "text_delta", "text": "shown"}]


def test_text_after_a_tool_call_opens_a_new_block() -> None:
    events = run_stream(
        [chunk(tool_delta(0, call_id="c", name="f", args="{}")), chunk({"content": "after"}), chunk({}, "tool_calls")]
    )
    assert [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"] == [
        (0, "tool_use"),
        (1, "text"),
    ]


def test_stream_stop_sequence_and_max_tokens() -> None:
    stopped = run_stream([chunk({"content": "a"}), chunk({}, "stop", stop_sequence="###")])
    assert stopped[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "###"}
    cut = run_stream([chunk({"content": "a"}), chunk({}, "length")])
    assert cut[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


def test_empty_stream_still_completes() -> None:
    events = run_stream([])
    assert names(events) == ["message_start", "message_delta", "message_stop"]


def test_ping_and_error_events() -> None:
    assert ping_event() == ("ping", {"type": "ping"})
    name, data = error_event(ApiError(503, "model is recovering"))
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "overloaded_error", "message": "model is recovering"}}
    assert error_event(ApiError(429, "busy"))[1]["error"]["type"] == "rate_limit_error"
    assert error_event(ApiError(404, "no such model"))[1]["error"]["type"] == "not_found_error"
    assert error_event(ApiError(502, "neuron died"))[1]["error"]["type"] == "api_error"


# ------------------------------------------------------------------------------ prefix cache


def test_cached_prompt_tokens_are_cache_reads() -> None:
    """OpenAI's prompt_tokens include the cached part; Anthropic's input_tokens do not: they add up."""
    reply = completion({"content": "Hi"}, usage=(100, 3))
    reply["usage"]["prompt_tokens_details"] = {"cached_tokens": 64}
    usage = to_anthropic_message(reply, model="m")["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (
        36,
        64,
        0,
    )

    cached = usage_chunk(100, 3)
    cached["usage"]["prompt_tokens_details"] = {"cached_tokens": 64}
    events = run_stream([chunk({"content": "Hi"}), chunk({}, "stop"), cached])
    delta = next(data for name, data in events if name == "message_delta")
    assert (delta["usage"]["input_tokens"], delta["usage"]["cache_read_input_tokens"]) == (36, 64)
