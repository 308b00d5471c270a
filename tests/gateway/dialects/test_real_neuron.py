"""The dialects once end to end through a real neuron: a tiny random-weight model whose chat
template renders tools (Hermes/Qwen style) and rejects a system message that is not first.

The model's output is gibberish, so these tests check what a real template and tokenizer do with
translated conversations: Claude Code's whole request shape (system blocks, system-role messages
mid-conversation and last, a tool-use history, 14 tools, `max_tokens: 32000` clipped), tool
results rendered, token counting by the model's own tokenizer, and valid streams in both dialects.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.support.claude_code import CLAUDE_CODE_HEADERS, claude_code_request
from tests.support.dialect_schemas import assert_anthropic_event, assert_response, assert_responses_event
from tests.support.gateway_procs import RealFleet, run_single_model_fleet
from tests.support.models import build_tiny_model

MODEL = "tiny-tools"


@pytest.fixture(scope="module")
def real_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealFleet]:
    tmp = tmp_path_factory.mktemp("real-dialects")
    # Claude Code's 14 tool schemas alone are ~1,000 tokens: a wider context than the shared tiny model's.
    model_dir = build_tiny_model(tmp / "models" / "tiny-tools-2k", seed=3, context=2048, tools=True)
    with run_single_model_fleet(tmp, MODEL, model_dir) as fleet:
        yield fleet


def _post_json(url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _post_stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[tuple[str, Any]]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        raw = response.read().decode()
    frames = []
    for block in raw.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            name = next(line[7:] for line in lines if line.startswith("event: "))
            frames.append((name, json.loads(next(line[6:] for line in lines if line.startswith("data: ")))))
    return frames


def test_claude_code_request_through_a_real_template(real_fleet: RealFleet) -> None:
    body = claude_code_request(MODEL)
    events = _post_stream(f"{real_fleet.gateway.url}/v1/messages?beta=true", body, CLAUDE_CODE_HEADERS)
    for name, data in events:
        assert_anthropic_event(name, data)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop", names[-3:]
    delta = next(data for name, data in events if name == "message_delta")
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")
    # The prompt really was the whole conversation: far more than a bare question.
    assert delta["usage"]["input_tokens"] > 800 and delta["usage"]["output_tokens"] > 0


def test_models_list_reports_the_tool_mode(real_fleet: RealFleet) -> None:
    with urllib.request.urlopen(f"{real_fleet.gateway.url}/v1/models", timeout=30) as response:
        entries = json.loads(response.read())["data"]
    assert [e["tool_call_format"] for e in entries if e["id"] == MODEL] == ["native:hermes"]


def test_count_tokens_uses_the_models_tokenizer(real_fleet: RealFleet) -> None:
    client = anthropic.Anthropic(base_url=real_fleet.gateway.url, api_key="unused", max_retries=0)
    short = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    longer = client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "hi " * 50}], system="You are terse."
    )
    assert 0 < short.input_tokens < longer.input_tokens
    tools: Any = [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    with_tools = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert with_tools.input_tokens > short.input_tokens + 20


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long_uses_anthropics_wording(real_fleet: RealFleet, stream: bool) -> None:
    """Claude Code compacts the conversation when it reads Anthropic's "prompt is too long" error."""
    client = anthropic.Anthropic(base_url=real_fleet.gateway.url, api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(anthropic.BadRequestError) as err:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=16, messages=messages) as events:
                events.get_final_message()
        else:
            client.messages.create(model=MODEL, max_tokens=16, messages=messages)
    body: Any = err.value.body
    assert body["error"]["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 2048 maximum", body["error"]["message"])


def test_system_messages_mid_conversation_are_rendered_not_dropped(real_fleet: RealFleet) -> None:
    """The template refuses a late system message; the neuron must fold it in, never drop it."""
    body = {k: v for k, v in claude_code_request(MODEL).items() if k not in ("max_tokens", "stream")}
    without = {**body, "messages": [m for m in body["messages"] if m["role"] != "system"]}
    url = f"{real_fleet.gateway.url}/v1/messages/count_tokens?beta=true"
    counted, counted_without = (_post_json(url, b, CLAUDE_CODE_HEADERS)["input_tokens"] for b in (body, without))
    # "The user switched to plan mode." and "Reminder: be brief." are more than 8 tokens together.
    assert counted >= counted_without + 8


def test_anthropic_tool_history_renders_and_streams(real_fleet: RealFleet) -> None:
    client = anthropic.Anthropic(base_url=real_fleet.gateway.url, api_key="unused", max_retries=0, timeout=120)
    tools: Any = [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    history: Any = [
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain, 8C"}]},
    ]
    with client.messages.stream(
        model=MODEL, max_tokens=16, system="Answer briefly.", tools=tools, messages=history
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.usage.output_tokens > 0


def test_responses_stream_with_function_tools(real_fleet: RealFleet) -> None:
    client = openai.OpenAI(base_url=f"{real_fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    tools: Any = [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}]
    items: Any = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    events = client.responses.create(
        model=MODEL, input=items, tools=tools, instructions="Be brief.", max_output_tokens=12, stream=True
    )
    seen = list(events)
    for event in seen:
        assert_responses_event(event.type, event.model_dump(exclude_unset=True))
    assert seen[0].type == "response.created" and seen[-1].type in ("response.completed", "response.incomplete")


# A bounded patch grammar: a random-weight model forced into it always finishes the call.
PATCH_LARK = 'start: "*** Begin Patch\\n" ("+" WORD "\\n")~1..3 "*** End Patch"\nWORD: /[a-z]{1,6}/'
PATCH_INPUT = re.compile(r"\A\*\*\* Begin Patch\n(\+[a-z]{1,6}\n){1,3}\*\*\* End Patch\Z")
PATCH_TOOL: Any = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch to the workspace.",
    "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_LARK},
}


def test_responses_custom_grammar_tool_call_and_its_output(real_fleet: RealFleet) -> None:
    """Codex's `apply_patch` loop: the forced call comes back as a `custom_tool_call` whose input
    satisfies the tool's Lark grammar (random weights: the grammar alone makes it so), and the call
    with its output goes back in the next turn's `input`."""
    client = openai.OpenAI(base_url=f"{real_fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    first = client.responses.create(
        model=MODEL,
        input="Add a file.",
        tools=[PATCH_TOOL],
        tool_choice={"type": "custom", "name": "apply_patch"},
        max_output_tokens=120,
    )
    assert_response(first.model_dump(mode="json", exclude_unset=True))
    calls = [item for item in first.output if item.type == "custom_tool_call"]
    assert len(calls) == 1, first.output
    call = calls[0]
    assert call.name == "apply_patch" and PATCH_INPUT.match(call.input), call.input
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Add a file."},
            {"type": "custom_tool_call", "call_id": call.call_id, "name": call.name, "input": call.input},
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"},
        ],
        tools=[PATCH_TOOL],
        max_output_tokens=8,
    )
    assert second.status in ("completed", "incomplete")
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]


def test_responses_custom_tool_call_streams(real_fleet: RealFleet) -> None:
    client = openai.OpenAI(base_url=f"{real_fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    regex_tool: Any = {
        "type": "custom",
        "name": "pick",
        "format": {"type": "grammar", "syntax": "regex", "definition": "(red|green|blue)"},
    }
    namespace: Any = {
        "type": "namespace",
        "name": "multi_agent_v1",
        "description": "Sub-agents",
        "tools": [regex_tool],
    }
    events = list(
        client.responses.create(
            model=MODEL,
            input="Pick a colour.",
            tools=[namespace],
            tool_choice="required",
            max_output_tokens=60,
            stream=True,
        )
    )
    for event in events:
        assert_responses_event(event.type, event.model_dump(exclude_unset=True))
    names = [event.type for event in events]
    assert "response.custom_tool_call_input.done" in names, names
    final = events[-1]
    assert final.type == "response.completed"
    (call,) = [item for item in final.response.output if item.type == "custom_tool_call"]
    assert (call.name, call.namespace) == ("pick", "multi_agent_v1") and call.input in ("red", "green", "blue")


# Codex's client-run tool search, with bounded schemas: a random-weight model forced into them finishes the call.
SEARCH_TOOL: Any = {
    "type": "tool_search",
    "execution": "client",
    "description": "Searches over deferred tool metadata and loads the matching tools.",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string", "enum": ["orders", "weather"]}},
        "required": ["query"],
        "additionalProperties": False,
    },
}
ORDERS_TOOL: Any = {
    "type": "function",
    "name": "list_open_orders",
    "description": "List open orders for a customer.",
    "defer_loading": True,
    "parameters": {
        "type": "object",
        "properties": {"customer_id": {"type": "string", "enum": ["42", "7"]}},
        "required": ["customer_id"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.mark.parametrize("stream", [False, True])
def test_responses_client_tool_search_call_then_its_output_loads_a_tool(real_fleet: RealFleet, stream: bool) -> None:
    """A forced call to the client-run tool search comes back as a `tool_search_call` item; sent back with a
    `tool_search_output` loading a namespaced function, that function can be called in the next turn."""
    client = openai.OpenAI(base_url=f"{real_fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    question: Any = {"role": "user", "content": "Open orders of customer 42?"}
    force_search: Any = {"type": "function", "name": "tool_search"}
    asked = dict(model=MODEL, input=[question], tools=[SEARCH_TOOL], tool_choice=force_search, max_output_tokens=120)
    if stream:
        events = list(client.responses.create(**asked, stream=True))  # type: ignore[call-overload]
        for event in events:
            assert_responses_event(event.type, event.model_dump(exclude_unset=True))
        searches = [e for e in events if e.type.startswith("response.output_item") and e.item.type != "message"]
        assert [e.type for e in searches] == ["response.output_item.added", "response.output_item.done"]
        first = events[-1].response
    else:
        first = client.responses.create(**asked)  # type: ignore[call-overload]
        assert_response(first.model_dump(mode="json", exclude_unset=True))
    assert first.status == "completed", first.output
    (search,) = [item for item in first.output if item.type != "message"]  # random weights may talk first
    assert search.type == "tool_search_call" and search.execution == "client" and search.status == "completed"
    assert search.arguments in ({"query": "orders"}, {"query": "weather"}), search.arguments
    crm = {"type": "namespace", "name": "crm", "description": "CRM tools.", "tools": [ORDERS_TOOL]}
    loaded: Any = {"type": "tool_search_output", "call_id": search.call_id, "execution": "client", "tools": [crm]}
    force_orders: Any = {"type": "function", "name": "list_open_orders", "namespace": "crm"}
    second = client.responses.create(
        model=MODEL,
        input=[question, search.model_dump(exclude_none=True), loaded],
        tools=[SEARCH_TOOL],
        tool_choice=force_orders,
        max_output_tokens=120,
    )
    assert_response(second.model_dump(mode="json", exclude_unset=True))
    assert second.status == "completed", second.output
    (call,) = [item for item in second.output if item.type != "message"]
    assert call.type == "function_call" and (call.namespace, call.name) == ("crm", "list_open_orders")
    assert json.loads(call.arguments) in ({"customer_id": "42"}, {"customer_id": "7"}), call.arguments


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_custom_grammar_is_a_400_in_openais_envelope(real_fleet: RealFleet, stream: bool) -> None:
    """The grammar compiles off the neuron's event loop, and its error still reaches the client as a 400."""
    client = openai.OpenAI(base_url=f"{real_fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    bad: Any = {
        "type": "custom",
        "name": "p",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: x"},
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="x", tools=[bad], tool_choice="required", stream=stream)
    assert "does not compile" in caught.value.message, caught.value.message


def test_anthropic_client_run_bash_tool_gets_its_schema_and_server_tools_a_400(real_fleet: RealFleet) -> None:
    client = anthropic.Anthropic(base_url=real_fleet.gateway.url, api_key="unused", max_retries=0, timeout=120)
    messages: Any = [{"role": "user", "content": "List the files."}]
    bash: Any = {"type": "bash_20250124", "name": "bash"}
    message = client.messages.create(
        model=MODEL, max_tokens=60, messages=messages, tools=[bash], tool_choice={"type": "tool", "name": "bash"}
    )
    calls = [block for block in message.content if block.type == "tool_use"]
    assert calls and calls[0].name == "bash" and message.stop_reason == "tool_use"
    assert isinstance(calls[0].input, dict) and set(calls[0].input) <= {"command", "restart"}
    search: Any = {"type": "web_search_20250305", "name": "web_search"}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=8, messages=messages, tools=[bash, search])
    assert "'web_search_20250305'" in caught.value.message
    optional = client.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=messages,
        tools=[bash, search],
        extra_headers={"X-Cortex-Optional-Tools": "web_search"},
    )
    assert optional.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_anthropic_prefill_is_continued_not_closed(real_fleet: RealFleet) -> None:
    """An assistant message last is Anthropic's prefill: the prompt leaves that turn open (no end-of-turn,
    no new assistant header), as the OpenAI route does with vLLM's `continue_final_message`."""
    url = real_fleet.gateway.url
    messages: Any = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Sure, the answer is"}]

    def chat_prompt_tokens(**extra: Any) -> int:
        body = {"model": MODEL, "messages": messages, "max_tokens": 1, **extra}
        return _post_json(f"{url}/v1/chat/completions", body, {})["usage"]["prompt_tokens"]

    closed, continued = chat_prompt_tokens(), chat_prompt_tokens(continue_final_message=True)
    assert continued < closed  # `<|im_end|>\n<|im_start|>assistant\n` is not there
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)
    message = client.messages.create(model=MODEL, max_tokens=1, messages=messages)
    usage = message.usage  # Anthropic counts the prompt's cached part apart
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == continued
    assert client.messages.count_tokens(model=MODEL, messages=messages).input_tokens == continued
    bad = {"model": MODEL, "messages": messages[:1], "max_tokens": 1, "continue_final_message": True}
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post_json(f"{url}/v1/chat/completions", bad, {})
    assert caught.value.code == 400


@pytest.mark.parametrize("stream", [False, True])
def test_responses_builtin_shell_tool_is_served_and_its_items_render(real_fleet: RealFleet, stream: bool) -> None:
    """OpenAI's built-in `shell` tool through a real neuron: a forced call (`tool_choice: {"type": "shell"}`) is
    decoded under the function's schema (random weights rarely close its free-text commands within the limit:
    any call item is a `shell_call`, every item and event valid for the SDK); a later turn's `shell_call` and
    `shell_call_output` render through the model's template as the call and its tool message."""
    client = openai.OpenAI(base_url=f"{real_fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    question: Any = {"role": "user", "content": "List the files here."}
    shell: Any = {"type": "shell"}
    asked = dict(model=MODEL, input=[question], tools=[shell], tool_choice={"type": "shell"}, max_output_tokens=32)
    if stream:
        events = list(client.responses.create(**asked, stream=True))  # type: ignore[call-overload]
        for event in events:
            assert_responses_event(event.type, event.model_dump(exclude_unset=True))
        first = events[-1].response
    else:
        first = client.responses.create(**asked)  # type: ignore[call-overload]
        assert_response(first.model_dump(mode="json", exclude_unset=True))
    assert first.status in ("completed", "incomplete") and first.tools[0].type == "shell"
    assert all(item.type in ("message", "shell_call") for item in first.output), first.output
    call: Any = {"type": "shell_call", "call_id": "call_ls", "action": {"commands": ["ls"]}, "status": "completed"}
    output: Any = {
        "type": "shell_call_output",
        "call_id": "call_ls",
        "output": [{"stdout": "a.txt\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}],
    }
    later = dict(model=MODEL, tools=[shell], tool_choice="none", max_output_tokens=8)
    second = client.responses.create(input=[question, call, output], **later)  # type: ignore[call-overload]
    assert_response(second.model_dump(mode="json", exclude_unset=True))
    assert second.status in ("completed", "incomplete") and [item.type for item in second.output] == ["message"]
    alone = client.responses.create(input=[question], **later)  # type: ignore[call-overload]
    assert second.usage is not None and alone.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens + 10  # the call and its output were rendered


@pytest.mark.parametrize(
    ("tool", "choice", "item_type"),
    [
        ({"type": "apply_patch"}, {"type": "apply_patch"}, "apply_patch_call"),
        ({"type": "local_shell"}, {"type": "function", "name": "local_shell"}, "local_shell_call"),
    ],
)
def test_responses_builtin_apply_patch_and_local_shell_are_served(
    real_fleet: RealFleet, tool: Any, choice: Any, item_type: str
) -> None:
    """The neuron decodes a forced call under `apply_patch`'s and `local_shell`'s schemas (an operation enum, an
    env map); any call item is of the tool's own type, the response valid for the SDK."""
    client = openai.OpenAI(base_url=f"{real_fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.responses.create(
        model=MODEL, input="Fix the bug.", tools=[tool], tool_choice=choice, max_output_tokens=24
    )
    assert_response(response.model_dump(mode="json", exclude_unset=True))
    assert response.status in ("completed", "incomplete") and response.tools[0].type == tool["type"]
    assert all(item.type in ("message", item_type) for item in response.output), response.output
