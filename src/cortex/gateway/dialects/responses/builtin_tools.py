"""OpenAI's built-in client-run tools on the Responses route: `shell`, `local_shell` and `apply_patch`.

The client runs them (Codex, the Agents SDK), so the gateway serves them as ordinary functions to the
model and as their own item types to the client:

- `{"type": "shell"}`: the function `shell` with the parameters of the call's action (`commands`,
  `timeout_ms`, `max_output_length`); a call is a `shell_call` item, answered by a `shell_call_output`
  (one stdout/stderr/outcome per command).
- `{"type": "local_shell"}`: the function `local_shell` with the fields of an `exec` action (`command`,
  `env`, `working_directory`, `timeout_ms`, `user`); a call is a `local_shell_call`, answered by a
  `local_shell_call_output` (its output a string).
- `{"type": "apply_patch"}`: the function `apply_patch` with an `operation` (`create_file`,
  `update_file` or `delete_file`, a `path` and a V4A `diff`); a call is an `apply_patch_call`, answered
  by an `apply_patch_call_output` (`completed` or `failed`, and a log).

In a later request the call items go back to the model as its call to that function (the action as
the arguments) and their outputs as the tool message (a shell output rendered compactly).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from cortex.gateway.dialects.responses.tools import BuiltInTool, Lenient

_STRING_LIST = {"type": "array", "items": {"type": "string"}}

PARAMETERS: dict[str, dict[str, Any]] = {
    "shell": {
        "type": "object",
        "properties": {
            "commands": {**_STRING_LIST, "description": "Shell commands to run, in order."},
            "timeout_ms": {"type": "integer", "description": "Time limit per command, in milliseconds."},
            "max_output_length": {"type": "integer", "description": "Characters of output to keep per command."},
        },
        "required": ["commands"],
        "additionalProperties": False,
    },
    "local_shell": {
        "type": "object",
        "properties": {
            "command": {**_STRING_LIST, "description": "The command and its arguments (argv)."},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "working_directory": {"type": "string"},
            "timeout_ms": {"type": "integer"},
            "user": {"type": "string"},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
    "apply_patch": {
        "type": "object",
        "properties": {
            "operation": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["create_file", "update_file", "delete_file"]},
                    "path": {"type": "string", "description": "The file's path, relative to the workspace."},
                    "diff": {"type": "string", "description": "The V4A diff (not for delete_file)."},
                },
                "required": ["type", "path"],
                "additionalProperties": False,
            }
        },
        "required": ["operation"],
        "additionalProperties": False,
    },
}

DESCRIPTIONS = {
    "shell": "Run shell commands on the user's machine and get their output.",
    "local_shell": "Run a command on the user's machine and get its output.",
    "apply_patch": "Create, update (with a V4A diff) or delete a file in the user's workspace.",
}

CALL_KINDS = {"shell": "shell_call", "local_shell": "local_shell_call", "apply_patch": "apply_patch_call"}


def chat_tool(tool: BuiltInTool) -> dict[str, Any]:
    """The function the model sees for a built-in tool."""
    return {
        "type": "function",
        "function": {"name": tool.type, "description": DESCRIPTIONS[tool.type], "parameters": PARAMETERS[tool.type]},
    }


def call_kind(tools: list[Any] | None, flat_name: str) -> str | None:
    """The item type of a model's call by this name when the request has that built-in tool, else None."""
    if any(isinstance(tool, BuiltInTool) and tool.type == flat_name for tool in tools or []):
        return CALL_KINDS[flat_name]
    return None


# ------------------------------------------------------------------------------------------------
# Output items: the model's call -> the client's item
# ------------------------------------------------------------------------------------------------


def _arguments(text: str) -> dict[str, Any]:
    """The model's arguments as an object (empty when they are not one: the item then holds defaults)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shell_action(args: dict[str, Any]) -> dict[str, Any]:
    return {
        "commands": _strings(args.get("commands")),
        "timeout_ms": _int(args.get("timeout_ms")),
        "max_output_length": _int(args.get("max_output_length")),
    }


def _local_shell_action(args: dict[str, Any]) -> dict[str, Any]:
    env = args.get("env")
    action: dict[str, Any] = {
        "type": "exec",
        "command": _strings(args.get("command")),
        "env": {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
    }
    for name in ("working_directory", "user"):
        if isinstance(args.get(name), str):
            action[name] = args[name]
    if (timeout := _int(args.get("timeout_ms"))) is not None:
        action["timeout_ms"] = timeout
    return action


def _operation(args: dict[str, Any]) -> dict[str, Any]:
    given = args.get("operation") if isinstance(args.get("operation"), dict) else args
    kind = given.get("type") if given.get("type") in ("create_file", "update_file", "delete_file") else "update_file"
    operation = {"type": kind, "path": str(given.get("path") or "")}
    if kind != "delete_file":
        operation["diff"] = str(given.get("diff") or "")
    return operation


def call_item(kind: str, item_id: str, call_id: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    """The output item (`shell_call`, `local_shell_call`, `apply_patch_call`) for a model's call."""
    args = _arguments(arguments)
    item: dict[str, Any] = {"id": item_id, "type": kind, "call_id": call_id, "status": status}
    if kind == "shell_call":
        item["action"] = _shell_action(args)
    elif kind == "local_shell_call":
        item["action"] = _local_shell_action(args)
    else:
        item["operation"] = _operation(args)
    return item


# ------------------------------------------------------------------------------------------------
# Input items: a later request's calls and outputs -> the chat conversation
# ------------------------------------------------------------------------------------------------


class ShellAction(Lenient):
    commands: list[str]
    timeout_ms: int | None = None
    max_output_length: int | None = None


class _CallItem(Lenient):
    """What every earlier built-in tool call carries besides its own `type` and arguments."""

    call_id: str
    id: str | None = None


class ShellCallItem(_CallItem):
    type: Literal["shell_call"]
    action: ShellAction


class ShellOutcome(Lenient):
    type: Literal["exit", "timeout"]
    exit_code: int | None = None


class ShellOutput(Lenient):
    stdout: str = ""
    stderr: str = ""
    outcome: ShellOutcome | None = None


class ShellCallOutputItem(_CallItem):
    type: Literal["shell_call_output"]
    output: list[ShellOutput]


class LocalShellAction(Lenient):
    type: Literal["exec"] = "exec"
    command: list[str]
    env: dict[str, str] | None = None
    working_directory: str | None = None
    timeout_ms: int | None = None
    user: str | None = None


class LocalShellCallItem(_CallItem):
    type: Literal["local_shell_call"]
    action: LocalShellAction


class LocalShellCallOutputItem(Lenient):
    """The spec names the call it answers by `id` (the model's call id); `call_id` is taken too."""

    type: Literal["local_shell_call_output"]
    output: str
    id: str | None = None
    call_id: str | None = None


class ApplyPatchOperation(Lenient):
    type: Literal["create_file", "update_file", "delete_file"]
    path: str
    diff: str | None = None


class ApplyPatchCallItem(_CallItem):
    type: Literal["apply_patch_call"]
    operation: ApplyPatchOperation


class ApplyPatchCallOutputItem(_CallItem):
    type: Literal["apply_patch_call_output"]
    status: Literal["completed", "failed"]
    output: str | None = None


BuiltInCallItem = ShellCallItem | LocalShellCallItem | ApplyPatchCallItem
BuiltInOutputItem = ShellCallOutputItem | LocalShellCallOutputItem | ApplyPatchCallOutputItem
BUILT_IN_ITEMS = {
    "shell_call": ShellCallItem,
    "shell_call_output": ShellCallOutputItem,
    "local_shell_call": LocalShellCallItem,
    "local_shell_call_output": LocalShellCallOutputItem,
    "apply_patch_call": ApplyPatchCallItem,
    "apply_patch_call_output": ApplyPatchCallOutputItem,
}


def chat_call(item: BuiltInCallItem) -> dict[str, Any]:
    """An earlier built-in call as the chat tool call the model made: its action as the arguments."""
    if isinstance(item, ShellCallItem):
        name, arguments = "shell", item.action.model_dump(exclude_none=True)
    elif isinstance(item, LocalShellCallItem):
        name, arguments = "local_shell", item.action.model_dump(exclude_none=True, exclude={"type"})
    else:
        name, arguments = "apply_patch", {"operation": item.operation.model_dump(exclude_none=True)}
    return {"id": item.call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def output_call_id(item: BuiltInOutputItem) -> str:
    if isinstance(item, LocalShellCallOutputItem):
        return item.call_id or item.id or ""
    return item.call_id


def output_text(item: BuiltInOutputItem) -> str:
    """The tool message answering a built-in call: a shell's commands' outcome, stdout and stderr compactly."""
    if isinstance(item, LocalShellCallOutputItem):
        return item.output
    if isinstance(item, ApplyPatchCallOutputItem):
        return f"{item.status}\n{item.output}" if item.output else item.status
    parts = []
    for output in item.output:
        outcome = output.outcome
        if outcome is None:
            head = "[done]"
        elif outcome.type == "timeout":
            head = "[timed out]"
        else:
            head = f"[exit {outcome.exit_code if outcome.exit_code is not None else '?'}]"
        lines = [head]
        if output.stdout:
            lines.append(output.stdout.rstrip("\n"))
        if output.stderr:
            lines.append("stderr:\n" + output.stderr.rstrip("\n"))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "[no output]"
