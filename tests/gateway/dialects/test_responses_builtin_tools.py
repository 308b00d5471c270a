"""OpenAI's built-in client-run tools on the Responses route (`shell`, `local_shell`, `apply_patch`): each is a
function to the model, its calls are items of their own (`shell_call`, `local_shell_call`, `apply_patch_call`),
streamed as added/done, and a later request's calls and outputs become the chat turns. Every output item and
event is checked against the openai SDK's types; `computer` stays a 400."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import (
    ResponseApplyPatchToolCall,
    ResponseFunctionShellToolCall,
    ResponseInputItemParam,
)
from openai.types.responses.response_input_item import (
    ApplyPatchCall,
    ApplyPatchCallOutput,
    LocalShellCall,
    LocalShellCallOutput,
    ShellCall,
    ShellCallOutput,
)
from openai.types.responses.response_output_item import LocalShellCall as LocalShellCallOut

from cortex.gateway.dialects.responses.reply import to_response
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.stream import ResponsesStream
from tests.support.dialect_schemas import assert_exact, assert_response, assert_responses_event
from tests.support.responses_translate import rejected, translate

WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SHELL, LOCAL_SHELL, APPLY_PATCH = {"type": "shell"}, {"type": "local_shell"}, {"type": "apply_patch"}


def functions(chat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {tool["function"]["name"]: tool["function"] for tool in chat["tools"]}


def test_each_builtin_tool_is_a_function_with_its_actions_parameters() -> None:
    listed = functions(translate(tools=[SHELL, LOCAL_SHELL, APPLY_PATCH, WEATHER]))
    assert list(listed) == ["shell", "local_shell", "apply_patch", "weather"]
    assert set(listed["shell"]["parameters"]["properties"]) == {"commands", "timeout_ms", "max_output_length"}
    assert listed["shell"]["parameters"]["required"] == ["commands"]
    local = listed["local_shell"]["parameters"]["properties"]
    assert set(local) == {"command", "env", "working_directory", "timeout_ms", "user"}
    operation = listed["apply_patch"]["parameters"]["properties"]["operation"]
    assert operation["properties"]["type"]["enum"] == ["create_file", "update_file", "delete_file"]
    assert all(listed[name]["description"] for name in ("shell", "local_shell", "apply_patch"))


@pytest.mark.parametrize("choice", [{"type": "shell"}, {"type": "function", "name": "shell"}])
def test_a_forced_shell_call_is_a_forced_function(choice: dict[str, Any]) -> None:
    chat = translate(tools=[SHELL, WEATHER], tool_choice=choice)
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "shell"}}


def test_apply_patch_choice_and_allowed_tools_name_builtins_by_type() -> None:
    assert translate(tools=[APPLY_PATCH], tool_choice={"type": "apply_patch"})["tool_choice"] == {
        "type": "function",
        "function": {"name": "apply_patch"},
    }
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "shell"}]}
    chat = translate(tools=[SHELL, WEATHER], tool_choice=allowed)
    assert list(functions(chat)) == ["shell"] and chat["tool_choice"] == "required"


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "shell"}}, "'shell'"),
        ({"tools": [{"type": "computer_use_preview", "display_width": 1024}]}, "screenshots"),
        ({"tools": [{"type": "computer"}]}, "screenshots"),
        ({"tools": [SHELL, {**WEATHER, "name": "shell"}]}, "two tools are called 'shell'"),
    ],
)
def test_refused(fields: dict[str, Any], fragment: str) -> None:
    error = rejected(input="hi", **fields)
    assert fragment in error.message


def completion(calls: list[dict[str, Any]]) -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    return {"id": "c", "created": 1, "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}


def call(call_id: str, name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


PATCH = {"operation": {"type": "update_file", "path": "src/a.py", "diff": "@@\n-x = 1\n+x = 2\n"}}


def test_calls_come_back_as_their_own_items() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [SHELL, LOCAL_SHELL, APPLY_PATCH, WEATHER]})
    calls = [
        call("c1", "shell", {"commands": ["ls -la", "pwd"], "timeout_ms": 5000}),
        call("c2", "local_shell", {"command": ["ls", "-l"], "working_directory": "/tmp"}),
        call("c3", "apply_patch", PATCH),
        call("c4", "weather", {"city": "Oslo"}),
    ]
    response = to_response(completion(calls), req)
    parsed = assert_response(response)
    shell, local, patch, weather = response["output"]
    assert isinstance(parsed.output[0], ResponseFunctionShellToolCall)
    assert shell["call_id"] == "c1" and shell["status"] == "completed"
    assert shell["action"] == {"commands": ["ls -la", "pwd"], "timeout_ms": 5000, "max_output_length": None}
    assert isinstance(parsed.output[1], LocalShellCallOut)
    assert local["action"] == {"type": "exec", "command": ["ls", "-l"], "env": {}, "working_directory": "/tmp"}
    assert isinstance(parsed.output[2], ResponseApplyPatchToolCall)
    assert patch["call_id"] == "c3" and patch["operation"] == PATCH["operation"]
    assert weather["type"] == "function_call"
    assert response["tools"][:3] == [SHELL, LOCAL_SHELL, APPLY_PATCH]  # echoed as sent


def test_a_delete_has_no_diff_and_arguments_that_are_no_object_give_an_empty_action() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [SHELL, APPLY_PATCH]})
    delete = {"operation": {"type": "delete_file", "path": "old.txt", "diff": "ignored"}}
    response = to_response(completion([call("d", "apply_patch", delete), call("s", "shell", "not json")]), req)
    assert_response(response)
    patch, shell = response["output"]
    assert patch["operation"] == {"type": "delete_file", "path": "old.txt"}
    assert shell["action"]["commands"] == []


def test_without_the_builtin_tool_a_function_called_shell_stays_a_function_call() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [{**WEATHER, "name": "shell"}]})
    [item] = to_response(completion([call("c", "shell", {"city": "x"})]), req)["output"]
    assert item["type"] == "function_call" and item["name"] == "shell"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_streamed_calls_are_added_then_done_whole() -> None:
    req = parse_responses_request({"model": "m", "input": "hi", "stream": True, "tools": [SHELL, APPLY_PATCH]})
    stream = ResponsesStream(req, response_id="resp_b")
    patch = json.dumps(PATCH)
    chunks = [
        chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "shell"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"commands": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '["make test"]}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "apply_patch", "arguments": patch}}]}),
        chunk({}, "tool_calls"),
    ]
    events = stream.start()
    for piece in chunks:
        events += stream.feed(piece)
    events += stream.finish()
    for name, data in events:
        assert_responses_event(name, data)
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.output_item.done",
        "response.output_item.added",
        "response.output_item.done",
        "response.completed",
    ]
    added, done = events[2][1]["item"], events[3][1]["item"]
    assert added["type"] == done["type"] == "shell_call" and added["status"] == "in_progress"
    assert done["action"]["commands"] == ["make test"] and done["call_id"] == "c1" and done["status"] == "completed"
    assert events[4][1]["item"]["operation"] == PATCH["operation"] and events[4][1]["output_index"] == 1
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["shell_call", "apply_patch_call"]
    assert_response(final)


SHELL_CALL = {
    "type": "shell_call",
    "id": "sh_1",
    "call_id": "c1",
    "action": {"commands": ["ls", "cat missing"], "timeout_ms": 1000},
    "status": "completed",
}
SHELL_OUTPUT = {
    "type": "shell_call_output",
    "call_id": "c1",
    "output": [
        {"stdout": "a.txt\nb.txt\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}},
        {"stdout": "", "stderr": "cat: missing: No such file\n", "outcome": {"type": "exit", "exit_code": 1}},
    ],
}
LOCAL_CALL = {
    "type": "local_shell_call",
    "id": "lsh_1",
    "call_id": "c2",
    "action": {"type": "exec", "command": ["uname"], "env": {}},
    "status": "completed",
}
LOCAL_OUTPUT = {"type": "local_shell_call_output", "id": "c2", "output": '{"stdout": "Linux"}'}
PATCH_CALL = {
    "type": "apply_patch_call",
    "call_id": "c3",
    "operation": {"type": "create_file", "path": "new.txt", "diff": "+hello\n"},
    "status": "completed",
}
PATCH_OUTPUT = {"type": "apply_patch_call_output", "call_id": "c3", "status": "failed", "output": "exists"}
ITEM_TYPES = {
    "shell_call": ShellCall,
    "shell_call_output": ShellCallOutput,
    "local_shell_call": LocalShellCall,
    "local_shell_call_output": LocalShellCallOutput,
    "apply_patch_call": ApplyPatchCall,
    "apply_patch_call_output": ApplyPatchCallOutput,
}


def test_a_later_turns_calls_and_outputs_become_tool_calls_and_tool_messages() -> None:
    items: list[ResponseInputItemParam] = [SHELL_CALL, SHELL_OUTPUT, LOCAL_CALL, LOCAL_OUTPUT, PATCH_CALL, PATCH_OUTPUT]  # type: ignore[list-item]
    for item in items:
        ITEM_TYPES[item["type"]].model_validate(item)  # the shapes the SDK sends
    chat = translate(input=[{"role": "user", "content": "go"}, *items], tools=[SHELL, LOCAL_SHELL, APPLY_PATCH])
    user, shell, shell_out, local, local_out, patch, patch_out = chat["messages"]
    assert user == {"role": "user", "content": "go"}
    [shell_call] = shell["tool_calls"]
    assert shell_call["id"] == "c1" and shell_call["function"]["name"] == "shell"
    assert json.loads(shell_call["function"]["arguments"]) == {"commands": ["ls", "cat missing"], "timeout_ms": 1000}
    assert shell_out == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "[exit 0]\na.txt\nb.txt\n\n[exit 1]\nstderr:\ncat: missing: No such file",
    }
    assert json.loads(local["tool_calls"][0]["function"]["arguments"]) == {"command": ["uname"], "env": {}}
    assert local_out == {"role": "tool", "tool_call_id": "c2", "content": '{"stdout": "Linux"}'}
    assert json.loads(patch["tool_calls"][0]["function"]["arguments"]) == {"operation": PATCH_CALL["operation"]}
    assert patch_out == {"role": "tool", "tool_call_id": "c3", "content": "failed\nexists"}


def test_a_timed_out_command_says_so() -> None:
    output = {**SHELL_OUTPUT, "output": [{"stdout": "partial", "stderr": "", "outcome": {"type": "timeout"}}]}
    chat = translate(input=[SHELL_CALL, output], tools=[SHELL])
    assert chat["messages"][-1]["content"] == "[timed out]\npartial"


def test_a_search_cannot_load_a_builtin_tool() -> None:
    output = {"type": "tool_search_output", "call_id": "s", "execution": "client", "tools": [SHELL]}
    error = rejected(input=[output], tools=[{"type": "tool_search", "execution": "client"}])
    assert "'shell'" in error.message


def test_exact_item_shapes() -> None:
    """The output items hold exactly the SDK's fields (no extras)."""
    req = parse_responses_request({"model": "m", "input": "hi", "tools": [SHELL, APPLY_PATCH]})
    shell, patch = to_response(
        completion([call("a", "shell", {"commands": ["x"]}), call("b", "apply_patch", PATCH)]), req
    )["output"]
    assert_exact(ResponseFunctionShellToolCall, shell)
    assert_exact(ResponseApplyPatchToolCall, patch)
