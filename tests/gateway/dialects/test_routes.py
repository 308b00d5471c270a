"""End to end: a real `cortex serve` process in front of the fake neuron replying by script, driven by the SDKs.

Covers `/v1/messages` (+ `?beta=true`), `/v1/messages/count_tokens` and `/v1/responses`: text,
streaming, two-turn tool loops for Anthropic, OpenAI Chat and Responses clients on one model,
every error path in the route's own envelope, keep-alives during cold loads and slow generations,
and Claude Code's real request shape. What reached the neuron is read back from its log.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest

from tests.support.claude_code import CLAUDE_CODE_HEADERS, SYSTEM_BLOCKS, TOOL_NAMES, claude_code_request
from tests.support.dialect_schemas import (
    assert_anthropic_event,
    assert_anthropic_message,
    assert_response,
    assert_responses_event,
)
from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_fake_neuron, run_gateway, wait_until
from tests.support.procs import Daemon, get_json
from tests.support.weather_tools import ANTHROPIC_TOOLS, CHAT_TOOLS, RESPONSES_TOOLS

MODEL = "scripted"
KEY = "sk-dialect-test"
MODELS_TOML = """
[[models]]
id = "scripted"
vram_mb = 100

[[models]]
id = "cold-anthropic"
vram_mb = 100

[[models]]
id = "cold-responses"
vram_mb = 100

[aliases]
claude-local = "scripted"
"""

TOOLS = ANTHROPIC_TOOLS


@dataclass
class Fleet:
    gateway: GatewayDaemon
    neuron: Daemon

    def neuron_log(self) -> dict[str, Any]:
        return get_json(f"{self.neuron.url}/_fake/log")

    def last_chat(self) -> dict[str, Any]:
        return self.neuron_log()["chat"][-1]

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.gateway.url, api_key=KEY, max_retries=0, timeout=30)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("dialects")
    spec = {
        "name": "scripted",
        "replies": "script",
        "preloaded": [MODEL],
        "load_delay_s": 1.2,
        "devices": [{"vram_total_mb": 80000}],
        "default_size_mb": 100,
        "context": 4096,
        "tool_call": True,
        "retry_after_s": 2,
    }
    with run_fake_neuron(tmp, spec) as neuron:
        config = cortex_toml({"scripted": neuron.url}, keepalive_interval_s=0.2)
        env = {"CORTEX_GATEWAY__API_KEYS": json.dumps([KEY]), "CORTEX_GATEWAY__MAX_BODY_BYTES": "200000"}
        with run_gateway(tmp, config, MODELS_TOML, env=env, wait_healthy=1) as gateway:
            yield Fleet(gateway, neuron)


# ------------------------------------------------------------------------------ raw HTTP helpers


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def frames(self) -> list[tuple[str, Any]]:
        """SSE frames in order: (event name, data) or ("comment", text)."""
        frames: list[tuple[str, Any]] = []
        for block in self.body.decode().split("\n\n"):
            if not block.strip():
                continue
            lines = block.split("\n")
            if all(line.startswith(":") for line in lines):
                frames.append(("comment", lines[0][1:].strip()))
                continue
            name = next((line[7:] for line in lines if line.startswith("event: ")), "")
            data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
            frames.append((name, json.loads(data)))
        return frames


def post(fleet: Fleet, path: str, body: Any, headers: dict[str, str] | None = None, *, raw: bytes | None = None) -> Raw:
    data = raw if raw is not None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", "x-api-key": KEY, **(headers or {})}
    request = urllib.request.Request(fleet.gateway.url + path, data=data, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Raw(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Raw(error.code, dict(error.headers), error.read())


def messages_body(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": text}], **fields}


def anthropic_events(raw: Raw) -> list[tuple[str, Any]]:
    assert raw.status == 200, raw.body
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    frames = raw.frames()
    for name, data in frames:
        assert name != "comment", "Anthropic streams keep alive with ping events"
        assert_anthropic_event(name, data)
    return frames


def responses_events(raw: Raw) -> list[tuple[str, Any]]:
    assert raw.status == 200, raw.body
    events = [(name, data) for name, data in raw.frames() if name != "comment"]
    for name, data in events:
        assert_responses_event(name, data)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    return events


# ------------------------------------------------------------------------------ Anthropic: text


def test_anthropic_text_and_system_verbatim(fleet: Fleet) -> None:
    system = [
        {"type": "text", "text": "  Rule one.\n"},
        {"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}},
    ]
    message = fleet.anthropic().messages.create(
        model=MODEL,
        max_tokens=100,
        system=system,
        messages=[{"role": "user", "content": "hello"}],  # type: ignore[arg-type]
    )
    assert message.content[0].text == "echo: hello"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.usage.input_tokens == 20 and message.model == MODEL
    sent = fleet.last_chat()
    assert sent["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": "  Rule one.\n"}, {"type": "text", "text": "Rule two."}],
    }
    assert sent["model"] == MODEL and sent["max_tokens"] == 100


def test_whole_replies_match_the_sdk_types_exactly(fleet: Fleet) -> None:
    message = post(fleet, "/v1/messages", messages_body("[call weather]", tools=TOOLS))
    assert message.status == 200 and message.headers["Content-Type"].startswith("application/json")
    parsed = assert_anthropic_message(message.json())
    assert [b.type for b in parsed.content] == ["text", "tool_use", "tool_use"]
    response = post(fleet, "/v1/responses", {"model": MODEL, "input": "[call weather]", "tools": RESPONSES_TOOLS})
    assert response.status == 200
    assert [o.type for o in assert_response(response.json()).output] == ["message", "function_call", "function_call"]


def test_anthropic_alias_is_echoed_and_resolved(fleet: Fleet) -> None:
    message = fleet.anthropic().messages.create(
        model="claude-local", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.model == "claude-local"
    assert fleet.last_chat()["model"] == MODEL


def test_anthropic_stream_exact_sequence_with_beta_query(fleet: Fleet) -> None:
    raw = post(fleet, "/v1/messages?beta=true", messages_body("hi there", stream=True), CLAUDE_CODE_HEADERS)
    events = anthropic_events(raw)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "echo: hi there"
    assert events[-2][1]["usage"]["input_tokens"] == 10 and events[-2][1]["usage"]["output_tokens"] > 0
    assert fleet.last_chat()["stream_options"] == {"include_usage": True}


def test_anthropic_stream_helper_and_thinking(fleet: Fleet) -> None:
    client = fleet.anthropic()
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    with client.messages.stream(
        model=MODEL, max_tokens=2048, thinking=thinking, messages=[{"role": "user", "content": "[think]"}]
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think. Twice."  # type: ignore[union-attr]
    assert final.content[1].text == "Thought it through."  # type: ignore[union-attr]
    with client.messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "[think]"}]
    ) as stream:
        plain = stream.get_final_message()
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == "Thought it through."  # type: ignore[union-attr]


def test_anthropic_stop_sequence_and_max_tokens(fleet: Fleet) -> None:
    client = fleet.anthropic()
    for stream in (False, True):
        body = messages_body("[stop at]", stop_sequences=["three"], stream=stream)
        if stream:
            events = anthropic_events(post(fleet, "/v1/messages", body))
            delta = next(d for n, d in events if n == "message_delta")["delta"]
        else:
            delta = post(fleet, "/v1/messages", body).json()
        assert (delta["stop_reason"], delta["stop_sequence"]) == ("stop_sequence", "three")
    assert fleet.last_chat()["stop"] == ["three"]
    cut = client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "[long]"}])
    assert cut.stop_reason == "max_tokens"


# ------------------------------------------------------------------------------ tool loops


def test_anthropic_two_turn_tool_loop_streaming(fleet: Fleet) -> None:
    client = fleet.anthropic()
    history: list[Any] = [{"role": "user", "content": "[call weather] in Oslo and Rome"}]
    with client.messages.stream(model=MODEL, max_tokens=200, tools=TOOLS, messages=history) as stream:  # type: ignore[arg-type]
        first = stream.get_final_message()
    uses = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use"
    assert [(u.id, u.name, u.input) for u in uses] == [
        ("call_oslo", "weather", {"city": "Oslo"}),
        ("call_rome", "weather", {"city": "Rome"}),
    ]
    results = [{"type": "tool_result", "tool_use_id": u.id, "content": f"{u.input['city']}: 21C"} for u in uses]  # type: ignore[index]
    history += [{"role": "assistant", "content": first.content}, {"role": "user", "content": results}]
    second = client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=history)  # type: ignore[arg-type]
    assert second.content[0].text == "results: Oslo: 21C; Rome: 21C"  # type: ignore[union-attr]
    sent = fleet.last_chat()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_oslo", "call_rome"]
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert [m["tool_call_id"] for m in sent[2:]] == ["call_oslo", "call_rome"]


def test_openai_chat_two_turn_tool_loop(fleet: Fleet) -> None:
    client = fleet.openai()
    history: list[Any] = [{"role": "user", "content": "[call weather] please"}]
    first = client.chat.completions.create(model=MODEL, messages=history, tools=CHAT_TOOLS)  # type: ignore[arg-type]
    calls = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"
    assert [c.id for c in calls] == ["call_oslo", "call_rome"]
    history.append(first.choices[0].message.model_dump(exclude_none=True))
    history += [{"role": "tool", "tool_call_id": c.id, "content": "rain"} for c in calls]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=CHAT_TOOLS)  # type: ignore[arg-type]
    assert second.choices[0].message.content == "results: rain; rain"


def test_responses_two_turn_tool_loop(fleet: Fleet) -> None:
    client = fleet.openai()
    history: list[Any] = [{"role": "user", "content": "[call weather] now"}]
    with client.responses.stream(model=MODEL, input=history, tools=RESPONSES_TOOLS, instructions="Be exact.") as stream:  # type: ignore[arg-type]
        first = stream.get_final_response()
    calls = [o for o in first.output if o.type == "function_call"]
    assert [(c.call_id, json.loads(c.arguments)) for c in calls] == [
        ("call_oslo", {"city": "Oslo"}),
        ("call_rome", {"city": "Rome"}),
    ]
    history += [o.model_dump(exclude_none=True, exclude={"parsed_arguments"}) for o in first.output]
    history += [{"type": "function_call_output", "call_id": c.call_id, "output": "snow"} for c in calls]
    second = client.responses.create(model=MODEL, input=history, tools=RESPONSES_TOOLS, instructions="Be exact.")  # type: ignore[arg-type]
    assert second.output_text == "results: snow; snow"
    sent = fleet.last_chat()["messages"]
    assert sent[0] == {"role": "system", "content": "Be exact."}
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "tool"]


def test_responses_text_stream_exact_sequence(fleet: Fleet) -> None:
    events = responses_events(post(fleet, "/v1/responses", {"model": MODEL, "input": "hey", "stream": True}))
    names = [name for name, _ in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    completed = events[-1][1]["response"]
    assert completed["output"][0]["content"][0]["text"] == "echo: hey"
    assert completed["usage"]["input_tokens"] == 10


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_unknown_model_is_not_found(fleet: Fleet, stream: bool) -> None:
    raw = post(fleet, "/v1/messages", {**messages_body("x", stream=stream), "model": "no-such-model"})
    assert raw.status == 404
    assert raw.json()["type"] == "error" and raw.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        (
            "/v1/messages",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens: Field required",
        ),
        ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": []}, "messages:"),
        ("/v1/messages/count_tokens", {"model": MODEL}, "messages: Field required"),
    ],
)
def test_anthropic_invalid_requests(fleet: Fleet, path: str, body: dict[str, Any], kind: str) -> None:
    raw = post(fleet, path, body)
    assert raw.status == 400
    assert raw.json()["error"]["type"] == "invalid_request_error" and kind in raw.json()["error"]["message"]


def test_anthropic_malformed_json_and_oversized_body(fleet: Fleet) -> None:
    bad = post(fleet, "/v1/messages", None, raw=b"{not json")
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    huge = post(fleet, "/v1/messages", messages_body("x" * 300_000))
    assert huge.status == 413 and huge.json() == {
        "type": "error",
        "error": {"type": "request_too_large", "message": huge.json()["error"]["message"]},
    }


def test_missing_key_is_401_in_each_dialect(fleet: Fleet) -> None:
    for path, body in (("/v1/messages", messages_body("x")), ("/v1/messages/count_tokens", messages_body("x"))):
        raw = post(fleet, path, body, {"x-api-key": "wrong"})
        assert raw.status == 401 and raw.json()["error"]["type"] == "authentication_error"
        assert raw.json()["type"] == "error"
    raw = post(fleet, "/v1/responses", {"model": MODEL, "input": "x"}, {"x-api-key": "wrong"})
    assert raw.status == 401 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=fleet.gateway.url, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_neuron_rate_limit_passes_through(fleet: Fleet, stream: bool) -> None:
    raw = post(fleet, "/v1/messages", messages_body("[error 429]", stream=stream))
    assert raw.status == 429 and raw.headers.get("Retry-After") == "2"
    assert raw.json() == {"type": "error", "error": {"type": "rate_limit_error", "message": "scripted error 429"}}


def test_anthropic_stream_cut_mid_way_ends_with_an_error_event(fleet: Fleet) -> None:
    events = anthropic_events(post(fleet, "/v1/messages", messages_body("[die]", stream=True)))
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [name for name, _ in events]
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        fleet.anthropic().messages.stream(
            model=MODEL, max_tokens=9, messages=[{"role": "user", "content": "[die]"}]
        ) as stream,
    ):
        stream.get_final_message()
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_responses_errors_are_openai_shaped(fleet: Fleet) -> None:
    stateful = post(fleet, "/v1/responses", {"model": MODEL, "input": "x", "previous_response_id": "resp_1"})
    assert stateful.status == 400 and stateful.json()["error"]["param"] == "previous_response_id"
    missing = post(fleet, "/v1/responses", {"model": "ghost", "input": "x", "stream": True})
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"
    limited = post(fleet, "/v1/responses", {"model": MODEL, "input": "[error 429]"})
    assert limited.status == 429 and limited.json()["error"]["message"] == "scripted error 429"
    with pytest.raises(openai.BadRequestError):
        fleet.openai().responses.create(model=MODEL, input="x", previous_response_id="resp_1")


def test_responses_stream_cut_mid_way_fails_the_response(fleet: Fleet) -> None:
    events = responses_events(post(fleet, "/v1/responses", {"model": MODEL, "input": "[die]", "stream": True}))
    assert [name for name, _ in events[-2:]] == ["error", "response.failed"]
    assert events[-2][1]["code"] == "stream_interrupted"
    assert events[-1][1]["response"]["status"] == "failed"


# ------------------------------------------------------------------------------ keep-alives


def test_anthropic_pings_while_the_model_is_slow(fleet: Fleet) -> None:
    events = anthropic_events(post(fleet, "/v1/messages", messages_body("[slow 1.0] hi", stream=True)))
    names = [name for name, _ in events]
    first_block = names.index("content_block_start")
    assert names.count("ping") >= 3 and names.index("ping") < first_block
    assert names[0] == "message_start" and names[-1] == "message_stop"


def test_anthropic_pings_while_the_model_thinks_unseen(fleet: Fleet) -> None:
    events = anthropic_events(post(fleet, "/v1/messages", messages_body("[ponder 1.2] hi", stream=True)))
    names = [name for name, _ in events]
    assert names.count("ping") >= 3 and names.index("ping") < names.index("content_block_start")
    assert [d["content_block"]["type"] for n, d in events if n == "content_block_start"] == ["text"]


def test_anthropic_pings_during_a_cold_load(fleet: Fleet) -> None:
    body = {**messages_body("hello cold", stream=True), "model": "cold-anthropic"}
    events = anthropic_events(post(fleet, "/v1/messages", body))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names.count("ping") >= 3
    assert names.index("ping") < names.index("content_block_start") and names[-1] == "message_stop"
    assert "cold-anthropic" in [load["model_id"] for load in fleet.neuron_log()["loads"]]


def test_responses_comments_during_a_cold_load(fleet: Fleet) -> None:
    raw = post(fleet, "/v1/responses", {"model": "cold-responses", "input": "hi", "stream": True})
    frames = raw.frames()
    assert [f for f in frames if f[0] == "comment"], "keep-alive comments while loading"
    events = responses_events(raw)
    assert events[-1][0] == "response.completed"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", messages_body("[slow 30] x", stream=True)),
        ("/v1/responses", {"model": MODEL, "input": "[slow 30] x", "stream": True}),
    ],
)
def test_client_disconnect_cancels_the_generation(fleet: Fleet, path: str, body: dict[str, Any]) -> None:
    before = fleet.neuron_log()["cancelled"]
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "x-api-key": KEY}
    request = urllib.request.Request(fleet.gateway.url + path, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.read(1)  # the stream started (message_start / response.created, then keep-alives)
    wait_until(lambda: fleet.neuron_log()["cancelled"] == before + 1, timeout=10, message="neuron saw the cancel")


# ------------------------------------------------------------------------------ count_tokens, Claude Code


def test_count_tokens_comes_from_the_neuron(fleet: Fleet) -> None:
    counted = fleet.anthropic().messages.count_tokens(
        model=MODEL,
        system="sys",
        messages=[{"role": "user", "content": "count me"}],
        tools=TOOLS,  # type: ignore[arg-type]
    )
    sent = fleet.neuron_log()["tokenize"][-1]
    assert sent["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "count me"}]
    assert sent["tools"][0]["function"]["name"] == "weather"
    assert counted.input_tokens == len(json.dumps(sent["messages"], separators=(",", ":"))) // 4


def test_claude_code_request_shape(fleet: Fleet) -> None:
    body = claude_code_request("claude-local")
    raw = post(fleet, "/v1/messages?beta=true", body, CLAUDE_CODE_HEADERS)
    events = anthropic_events(raw)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    sent = fleet.last_chat()
    assert sent["max_tokens"] == 32000 and sent["model"] == MODEL
    assert [t["function"]["name"] for t in sent["tools"]] == TOOL_NAMES
    assert sent["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": b["text"]} for b in SYSTEM_BLOCKS],
    }
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "system", "user", "system"]
    assert sent["messages"][-1] == {"role": "system", "content": "Reminder: be brief."}
    assert [m.get("tool_call_id") for m in sent["messages"][3:5]] == ["toolu_01A", "toolu_01B"]
    assert sent["user"] == body["metadata"]["user_id"]
    assert text == "echo: now summarise"


def test_claude_code_count_tokens(fleet: Fleet) -> None:
    body = {k: v for k, v in claude_code_request("claude-local").items() if k not in ("max_tokens", "stream")}
    raw = post(fleet, "/v1/messages/count_tokens?beta=true", body, CLAUDE_CODE_HEADERS)
    assert raw.status == 200 and set(raw.json()) == {"input_tokens"}
    sent = fleet.neuron_log()["tokenize"][-1]
    assert raw.json()["input_tokens"] == len(json.dumps(sent["messages"], separators=(",", ":"))) // 4
    assert "max_tokens" not in sent and len(sent["tools"]) == len(TOOL_NAMES)
    assert [m["role"] for m in sent["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "system",
        "user",
        "system",
    ]
