"""The official SDKs parse what the translators emit: typed objects, streaming helpers, errors.

Each test replays scripted OpenAI chunks through the real translators over HTTP (`replay.py`)
and drives the async `anthropic` / `openai` clients at it. The typed results are also checked
field by field, and every raw event is validated strictly against the SDK's own types elsewhere
(`test_*_reply.py`, `test_properties.py`), so a schema mismatch fails here or there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from cortex.core.errors import ApiError, model_not_found
from tests.support import weather_tools
from tests.support.replay_neuron import ReplayServer, Script, chunk, tool_call_chunks, usage_chunk

TOOLS = weather_tools.ANTHROPIC_TOOLS
RESPONSES_TOOLS = [{**tool, "strict": False} for tool in weather_tools.RESPONSES_TOOLS]


def text_script(*pieces: str, prompt: int = 9) -> list[dict[str, Any]]:
    return [
        chunk({"role": "assistant", "content": ""}),
        *[chunk({"content": p}) for p in pieces],
        chunk({}, "stop"),
        usage_chunk(prompt, len(pieces)),
    ]


def tool_script() -> list[dict[str, Any]]:
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking "}),
        chunk({"content": "both."}),
        *tool_call_chunks(0, "call_oslo", "weather", {"city": "Oslo"}),
        *tool_call_chunks(1, "call_rome", "weather", {"city": "Rome", "units": ["C", "F"]}),
        chunk({}, "tool_calls"),
        usage_chunk(40, 17),
    ]


@pytest.fixture
async def replay() -> AsyncIterator[ReplayServer]:
    server = ReplayServer()
    await server.start()
    yield server
    await server.close()


def anthropic_client(replay: ReplayServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=replay.url, api_key="test-key", max_retries=0)


def openai_client(replay: ReplayServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=replay.url + "/v1", api_key="test-key", max_retries=0)


USER = [{"role": "user", "content": "weather in Oslo and Rome?"}]

# ------------------------------------------------------------------------------ Anthropic


async def test_anthropic_create_text(replay: ReplayServer) -> None:
    replay.script = Script(text_script("Hello", " there"))
    message = await anthropic_client(replay).messages.create(model="m", max_tokens=100, messages=USER)
    assert isinstance(message, anthropic.types.Message)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.usage.input_tokens == 9 and message.usage.output_tokens == 2
    assert message.id.startswith("msg_") and message.model == "m"


async def test_anthropic_stream_helper_text(replay: ReplayServer) -> None:
    replay.script = Script(text_script("Hel", "lo", "!"))
    async with anthropic_client(replay).messages.stream(model="m", max_tokens=100, messages=USER) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == ["Hel", "lo", "!"]
    assert final.content[0].text == "Hello!"  # type: ignore[union-attr]
    assert final.usage.input_tokens == 9 and final.usage.output_tokens == 3


async def test_anthropic_stream_tool_calls_equal_non_streaming(replay: ReplayServer) -> None:
    replay.script = Script(tool_script())
    client = anthropic_client(replay)
    async with client.messages.stream(model="m", max_tokens=100, messages=USER, tools=TOOLS) as stream:
        streamed = await stream.get_final_message()
    whole = await client.messages.create(model="m", max_tokens=100, messages=USER, tools=TOOLS)
    for message in (streamed, whole):
        assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
        assert message.content[0].text == "Checking both."  # type: ignore[union-attr]
        uses = [b for b in message.content if b.type == "tool_use"]
        assert [(u.id, u.name, u.input) for u in uses] == [
            ("call_oslo", "weather", {"city": "Oslo"}),
            ("call_rome", "weather", {"city": "Rome", "units": ["C", "F"]}),
        ]
        assert message.stop_reason == "tool_use"
        assert message.usage.output_tokens == 17
    assert streamed.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})
    assert replay.chat_bodies[0]["tools"][0]["function"]["name"] == "weather"


async def test_anthropic_beta_stream_with_pings(replay: ReplayServer) -> None:
    replay.script = Script(text_script("pinged"), pings=True)
    client = anthropic_client(replay)
    async with client.beta.messages.stream(model="m", max_tokens=10, messages=USER, betas=["x-2025"]) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "pinged"  # type: ignore[union-attr]


async def test_anthropic_raw_event_stream_order(replay: ReplayServer) -> None:
    replay.script = Script(text_script("a"), pings=True)
    events = await anthropic_client(replay).messages.create(model="m", max_tokens=10, messages=USER, stream=True)
    kinds = [event.type async for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_anthropic_thinking_stream(replay: ReplayServer) -> None:
    script = [chunk({"reasoning_content": "think "}), chunk({"reasoning_content": "hard"}), *text_script("42")]
    replay.script = Script(script)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    async with anthropic_client(replay).messages.stream(
        model="m",
        max_tokens=2048,
        messages=USER,
        thinking=thinking,  # type: ignore[arg-type]
    ) as stream:
        final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "think hard"  # type: ignore[union-attr]
    assert final.content[1].text == "42"  # type: ignore[union-attr]


async def test_anthropic_stop_sequence(replay: ReplayServer) -> None:
    replay.script = Script([chunk({"content": "one two"}), chunk({}, "stop", stop_sequence="three"), usage_chunk(3, 2)])
    client = anthropic_client(replay)
    whole = await client.messages.create(model="m", max_tokens=9, messages=USER, stop_sequences=["three"])
    async with client.messages.stream(model="m", max_tokens=9, messages=USER, stop_sequences=["three"]) as stream:
        streamed = await stream.get_final_message()
    for message in (whole, streamed):
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "three")
    assert replay.chat_bodies[0]["stop"] == ["three"]


async def test_anthropic_error_mid_stream_raises_with_anthropic_type(replay: ReplayServer) -> None:
    replay.script = Script(text_script("partial", "never"), fail_after=2)
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with anthropic_client(replay).messages.stream(model="m", max_tokens=10, messages=USER) as stream:
            await stream.get_final_message()
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "The model's server went away"},
    }


@pytest.mark.parametrize(
    ("error", "exception", "kind"),
    [
        (model_not_found("nope"), anthropic.NotFoundError, "not_found_error"),
        (ApiError(429, "busy", retry_after=2), anthropic.RateLimitError, "rate_limit_error"),
        (ApiError(503, "recovering"), anthropic.InternalServerError, "overloaded_error"),
        (ApiError(413, "too big"), anthropic.APIStatusError, "request_too_large"),
    ],
)
async def test_anthropic_errors_are_typed(
    replay: ReplayServer, error: ApiError, exception: type[Exception], kind: str
) -> None:
    replay.script = Script([], error=error)
    with pytest.raises(exception) as caught:
        await anthropic_client(replay).messages.create(model="m", max_tokens=5, messages=USER)
    assert caught.value.body["error"]["type"] == kind  # type: ignore[attr-defined]


async def test_anthropic_invalid_request_is_bad_request(replay: ReplayServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await anthropic_client(replay).messages.create(model="m", max_tokens=5, messages=[])
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


async def test_anthropic_two_turn_tool_loop(replay: ReplayServer) -> None:
    client = anthropic_client(replay)
    replay.script = Script(tool_script())
    async with client.messages.stream(model="m", max_tokens=100, messages=USER, tools=TOOLS) as stream:
        first = await stream.get_final_message()
    results = [
        {"type": "tool_result", "tool_use_id": block.id, "content": f"sunny in {block.input['city']}"}  # type: ignore[index]
        for block in first.content
        if block.type == "tool_use"
    ]
    history = [*USER, {"role": "assistant", "content": first.content}, {"role": "user", "content": results}]
    replay.script = Script(text_script("Both sunny."))
    second = await client.messages.create(model="m", max_tokens=100, messages=history, tools=TOOLS)  # type: ignore[arg-type]
    assert second.content[0].text == "Both sunny."  # type: ignore[union-attr]
    sent = replay.chat_bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_oslo", "call_rome"]
    assert [(m["tool_call_id"], m["content"]) for m in sent[2:]] == [
        ("call_oslo", "sunny in Oslo"),
        ("call_rome", "sunny in Rome"),
    ]


# ------------------------------------------------------------------------------ OpenAI Responses


async def test_responses_create_text(replay: ReplayServer) -> None:
    replay.script = Script(text_script("Hi", " you"))
    response = await openai_client(replay).responses.create(model="m", input="hello", instructions="Be nice.")
    assert response.output_text == "Hi you"
    assert response.status == "completed" and response.usage is not None and response.usage.total_tokens == 11
    assert replay.chat_bodies[0]["messages"][0] == {"role": "system", "content": "Be nice."}


async def test_responses_stream_helper(replay: ReplayServer) -> None:
    replay.script = Script(text_script("str", "eam"))
    async with openai_client(replay).responses.stream(model="m", input="hello") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert deltas == ["str", "eam"]
    assert final.output_text == "stream" and final.status == "completed"


async def test_responses_stream_function_calls(replay: ReplayServer) -> None:
    replay.script = Script(tool_script())
    client = openai_client(replay)
    async with client.responses.stream(model="m", input="weather?", tools=RESPONSES_TOOLS) as stream:  # type: ignore[arg-type]
        final = await stream.get_final_response()
    whole = await client.responses.create(model="m", input="weather?", tools=RESPONSES_TOOLS)  # type: ignore[arg-type]
    for response in (final, whole):
        assert [o.type for o in response.output] == ["message", "function_call", "function_call"]
        calls = [o for o in response.output if o.type == "function_call"]
        assert [(c.call_id, c.name) for c in calls] == [("call_oslo", "weather"), ("call_rome", "weather")]
        assert calls[1].arguments == '{"city": "Rome", "units": ["C", "F"]}'
        assert response.output_text == "Checking both."


async def test_responses_raw_stream_sequence_numbers(replay: ReplayServer) -> None:
    replay.script = Script(text_script("x"))
    events = await openai_client(replay).responses.create(model="m", input="hello", stream=True)
    seen = [event async for event in events]
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert seen[0].type == "response.created" and seen[-1].type == "response.completed"


async def test_responses_failure_mid_stream(replay: ReplayServer) -> None:
    replay.script = Script(text_script("partial", "never"), fail_after=2)
    events = await openai_client(replay).responses.create(model="m", input="hello", stream=True)
    seen = [event async for event in events]
    assert [e.type for e in seen[-2:]] == ["error", "response.failed"]
    assert seen[-1].response.error is not None  # type: ignore[union-attr]
    assert seen[-1].response.error.message == "The model's server went away"  # type: ignore[union-attr]


async def test_responses_errors_are_openai_shaped(replay: ReplayServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(replay).responses.create(model="m", input="x", previous_response_id="resp_old")
    assert caught.value.code is None or isinstance(caught.value.code, str)
    assert "stateless" in caught.value.message
    replay.script = Script([], error=model_not_found("ghost"))
    with pytest.raises(openai.NotFoundError) as missing:
        await openai_client(replay).responses.create(model="ghost", input="x")
    assert missing.value.code == "model_not_found"


async def test_responses_two_turn_tool_loop(replay: ReplayServer) -> None:
    client = openai_client(replay)
    replay.script = Script(tool_script())
    first = await client.responses.create(model="m", input=USER, tools=RESPONSES_TOOLS)  # type: ignore[arg-type]
    outputs = [
        {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}
        for item in first.output
        if item.type == "function_call"
    ]
    replay.script = Script(text_script("Both sunny."))
    history = [*USER, *[item.model_dump(exclude_none=True) for item in first.output], *outputs]
    second = await client.responses.create(model="m", input=history, tools=RESPONSES_TOOLS)  # type: ignore[arg-type]
    assert second.output_text == "Both sunny."
    sent = replay.chat_bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert sent[1]["content"] == "Checking both."
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_oslo", "call_rome"]
