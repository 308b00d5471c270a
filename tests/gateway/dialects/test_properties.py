"""Property tests: nothing is lost in translation, and streaming equals non-streaming."""

from __future__ import annotations

import itertools
import json
from typing import Any

from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.core.openai import ChatCompletionRequest
from cortex.gateway.dialects.anthropic.reply import to_anthropic_message
from cortex.gateway.dialects.anthropic.request import parse_messages_request
from cortex.gateway.dialects.anthropic.stream import AnthropicStream
from cortex.gateway.dialects.anthropic.to_chat import to_chat_request
from tests.support.anthropic_inverse import canonical, chat_to_anthropic
from tests.support.dialect_schemas import assert_anthropic_event, assert_anthropic_message

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(min_size=1, max_size=30)
ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
tool_input = st.dictionaries(text, json_value, max_size=4)
cache_control = st.sampled_from([{}, {"cache_control": {"type": "ephemeral"}}])


@st.composite
def text_block(draw: st.DrawFn) -> dict[str, Any]:
    return {"type": "text", "text": draw(text), **draw(cache_control)}


@st.composite
def image_block(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        data = draw(st.from_regex(r"[A-Za-z0-9+/]{4,24}={0,2}", fullmatch=True))
        media_type = draw(st.sampled_from(["image/png", "image/jpeg", "image/webp"]))
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    url = "https://example.com/" + draw(st.from_regex(r"[a-z0-9]{1,12}\.png", fullmatch=True))
    return {"type": "image", "source": {"type": "url", "url": url}}


@st.composite
def document_block(draw: st.DrawFn) -> dict[str, Any]:
    return {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": draw(text)}}


@st.composite
def tool_result_block(draw: st.DrawFn, tool_id: str) -> dict[str, Any]:
    content = draw(st.none() | text | st.lists(st.one_of(text_block(), image_block(), document_block()), max_size=3))
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id, **draw(cache_control)}
    if content is not None:
        block["content"] = content
    if draw(st.booleans()):
        block["is_error"] = draw(st.booleans())
    return block


@st.composite
def tool_use_block(draw: st.DrawFn) -> dict[str, Any]:
    tool_id = "toolu_" + draw(st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True))
    return {"type": "tool_use", "id": tool_id, "name": draw(ident), "input": draw(tool_input)}


@st.composite
def assistant_message(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"role": "assistant", "content": draw(text)}
    thinking = draw(
        st.lists(st.builds(lambda t: {"type": "thinking", "thinking": t, "signature": "s"}, text), max_size=2)
    )
    redacted = draw(st.lists(st.just({"type": "redacted_thinking", "data": "x"}), max_size=1))
    body = draw(st.lists(st.one_of(text_block(), tool_use_block()), min_size=1, max_size=4))
    return {"role": "assistant", "content": thinking + redacted + body}


@st.composite
def user_message(draw: st.DrawFn, open_tool_ids: list[str]) -> dict[str, Any]:
    if not open_tool_ids and draw(st.booleans()):
        return {"role": "user", "content": draw(text)}
    results = [draw(tool_result_block(tool_id)) for tool_id in open_tool_ids]
    own = draw(
        st.lists(st.one_of(text_block(), image_block(), document_block()), min_size=0 if results else 1, max_size=3)
    )
    blocks = draw(st.permutations(results + own))
    return {"role": "user", "content": blocks}


@st.composite
def system_message(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"role": "system", "content": draw(text)}
    return {"role": "system", "content": draw(st.lists(text_block(), min_size=1, max_size=3))}


@st.composite
def conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    open_ids: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        messages.append(draw(user_message(open_ids)))
        open_ids = []
        if draw(st.integers(0, 4)) == 0:
            messages.append(draw(system_message()))
        if draw(st.booleans()):
            assistant = draw(assistant_message())
            messages.append(assistant)
            if isinstance(assistant["content"], list):
                open_ids = [b["id"] for b in assistant["content"] if b["type"] == "tool_use"]
    if open_ids:
        messages.append(draw(user_message(open_ids)))
    return messages


@st.composite
def tool_definition(draw: st.DrawFn) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": draw(ident), "input_schema": {"type": "object", "properties": {}}}
    if draw(st.booleans()):
        tool["description"] = draw(text)
    return {**tool, **draw(cache_control)}


@st.composite
def messages_request(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(ident),
        "max_tokens": draw(st.integers(1, 64000)),
        "messages": draw(conversation()),
    }
    system = draw(st.none() | text | st.lists(text_block(), min_size=1, max_size=3))
    if system is not None:
        body["system"] = system
    tools = draw(st.lists(tool_definition(), max_size=4))
    if tools:
        body["tools"] = tools
        choice = draw(st.sampled_from([None, "auto", "any", "none", "tool"]))
        if choice is not None:
            body["tool_choice"] = {"type": choice}
            if choice == "tool":
                body["tool_choice"]["name"] = tools[0]["name"]
            if draw(st.booleans()):
                body["tool_choice"]["disable_parallel_tool_use"] = draw(st.booleans())
    optional = {
        "temperature": st.floats(0, 1),
        "top_p": st.floats(0, 1, exclude_min=True),
        "top_k": st.integers(0, 100),
        "stop_sequences": st.lists(text, max_size=4),
        "metadata": st.builds(lambda u: {"user_id": u}, text),
        "thinking": st.sampled_from([{"type": "adaptive"}, {"type": "enabled", "budget_tokens": 2048}]),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return body


def _tool_ids_in(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    uses, results = [], []
    for message in body["messages"]:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block["type"] == "tool_use":
                uses.append(block["id"])
            elif block["type"] == "tool_result":
                results.append(block["tool_use_id"])
    return uses, results


@SETTINGS
@given(messages_request())
def test_anthropic_request_round_trips_through_openai(body: dict[str, Any]) -> None:
    original = parse_messages_request(body)
    chat = to_chat_request(original)
    ChatCompletionRequest.model_validate(chat)
    back = parse_messages_request(chat_to_anthropic(chat))
    assert canonical(back) == canonical(original)
    # The canonical form must not hide a loss: every id survives, literally.
    assert _tool_ids_in(chat_to_anthropic(chat)) == _tool_ids_in(body)


@SETTINGS
@given(messages_request())
def test_system_text_reaches_the_neuron_verbatim_and_in_order(body: dict[str, Any]) -> None:
    chat = to_chat_request(parse_messages_request(body))

    def texts(content: Any) -> list[str]:
        if isinstance(content, str):
            return [content] if content else []
        return [b["text"] for b in content]

    expected = texts(body.get("system") or [])
    expected += [t for m in body["messages"] if m["role"] == "system" for t in texts(m["content"])]
    sent = [t for m in chat["messages"] if m["role"] == "system" for t in texts(m["content"])]
    assert sent == expected


# ------------------------------------------------------------------------------ streaming == whole


@st.composite
def completion_script(draw: st.DrawFn) -> dict[str, Any]:
    """A model's output: optional reasoning, text, tool calls; and how it ended."""
    calls = draw(
        st.lists(
            st.tuples(st.from_regex(r"call_[a-z0-9]{1,8}", fullmatch=True), ident, tool_input),
            max_size=3,
            unique_by=lambda c: c[0],
        )
    )
    finish = draw(st.sampled_from(["stop", "length", "tool_calls"]))
    return {
        "reasoning": draw(st.text(max_size=40)),
        "content": draw(st.text(max_size=60)),
        "calls": [(cid, name, json.dumps(args)) for cid, name, args in calls],
        "finish": finish,
        "stop_sequence": draw(st.none() | text) if finish == "stop" else None,
        "usage": (draw(st.integers(0, 5000)), draw(st.integers(0, 5000))),
    }


def _pieces(draw: st.DrawFn, value: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(value) - 1)), max_size=4))) if len(value) > 1 else []
    bounds = [0, *cuts, len(value)]
    return [value[a:b] for a, b in itertools.pairwise(bounds) if value[a:b]]


@st.composite
def chunked(draw: st.DrawFn, script: dict[str, Any]) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], **choice: Any) -> dict[str, Any]:
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, **choice}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"reasoning_content": p}) for p in _pieces(draw, script["reasoning"])]
    chunks += [chunk({"content": p}) for p in _pieces(draw, script["content"])]
    for index, (call_id, name, arguments) in enumerate(script["calls"]):
        head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        chunks.append(chunk({"tool_calls": [head]}))
        for piece in _pieces(draw, arguments):
            chunks.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    last: dict[str, Any] = {"finish_reason": script["finish"]}
    if script["stop_sequence"] is not None:
        last["stop_sequence"] = script["stop_sequence"]
    chunks.append(chunk({}, **last))
    prompt, completion = script["usage"]
    chunks.append({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})
    return chunks


def _whole(script: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": script["content"] or None}
    if script["reasoning"]:
        message["reasoning_content"] = script["reasoning"]
    if script["calls"]:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in script["calls"]
        ]
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": script["finish"]}
    if script["stop_sequence"] is not None:
        choice["stop_sequence"] = script["stop_sequence"]
    prompt, completion = script["usage"]
    return {"choices": [choice], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


@SETTINGS
@given(st.data(), completion_script(), st.booleans())
def test_stream_accumulates_to_the_non_streaming_message(
    data: st.DataObject, script: dict[str, Any], thinking: bool
) -> None:
    chunks = data.draw(chunked(script))
    stream = AnthropicStream("m", thinking=thinking, message_id="msg_x")
    events = [e for c in chunks for e in stream.feed(c)] + stream.finish()
    snapshot = None
    json_buffers: dict[int, bytes] = {}
    for name, payload in events:
        assert_anthropic_event(name, payload)
        snapshot = accumulate_event(event=payload, current_snapshot=snapshot, json_bufs=json_buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    whole = to_anthropic_message(_whole(script), model="m", thinking=thinking, message_id="msg_x")
    assert_anthropic_message(whole)
    assert snapshot.to_dict(exclude_none=True) == {k: v for k, v in whole.items() if v is not None}
    indices = [p["index"] for n, p in events if n == "content_block_start"]
    assert indices == list(range(len(indices)))
