"""Anthropic's versioned tools: which the client runs (given to the model as function tools with
their documented input schemas) and which only Anthropic's servers run (refused, 400 naming them).

Anthropic-defined client tools (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview)
are declared by `type` and `name` alone; Claude knows their schemas by training. A local model does
not, so the gateway writes the documented input schema out. Their calls come back as ordinary
`tool_use` blocks and their results go back as `tool_result` blocks, as with Claude.

`computer_…` is refused: it drives a screen through screenshots, which a text model cannot see, and
its action set changes with each version. Server tools (`web_search_…`, `web_fetch_…`,
`code_execution_…`, `tool_search_tool_…`, `mcp_toolset`, …) run on Anthropic's servers: refused
unless the client marked them optional (`optional_tools.py`: Anthropic's API has no such marker),
then dropped.
"""

from __future__ import annotations

import re
from typing import Any

from cortex.core.errors import bad_request
from cortex.gateway.dialects.optional_tools import OPTIONAL_TOOLS_HEADER, is_optional

_STRING = {"type": "string"}
_LINE_RANGE = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}

BASH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "description": "The bash command to run."},
        "restart": {"type": "boolean", "description": "Restart the shell session instead of running a command."},
    },
}

TEXT_EDITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
        "path": {"type": "string", "description": "Absolute path of the file or directory."},
        "view_range": {**_LINE_RANGE, "description": "view: [first line, last line] (1-based, -1 for the end)."},
        "file_text": {"type": "string", "description": "create: the new file's content."},
        "old_str": {"type": "string", "description": "str_replace: the exact text to replace."},
        "new_str": {"type": "string", "description": "str_replace / insert: the new text."},
        "insert_line": {"type": "integer", "description": "insert: the line after which to insert (0: the top)."},
        "insert_text": {"type": "string", "description": "insert: the text to insert (newer versions)."},
    },
    "required": ["command", "path"],
}

MEMORY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "delete", "rename"]},
        "path": {"type": "string", "description": "Path under /memories."},
        "view_range": _LINE_RANGE,
        "file_text": _STRING,
        "old_str": _STRING,
        "new_str": _STRING,
        "insert_line": {"type": "integer"},
        "insert_text": _STRING,
        "old_path": _STRING,
        "new_path": _STRING,
    },
    "required": ["command"],
}

_DESCRIPTIONS = {
    "bash": "Run a command in a persistent bash shell on the user's machine.",
    "text_editor": "View, create and edit text files on the user's machine.",
    "memory": "View, create, edit, rename and delete files in the /memories directory, kept across conversations.",
}
_SCHEMAS = {"bash": BASH_SCHEMA, "text_editor": TEXT_EDITOR_SCHEMA, "memory": MEMORY_SCHEMA}

_VERSIONED = re.compile(r"\A(?P<family>[a-z_]+?)_(?P<date>\d{8})\Z")


def tool_family(tool_type: str) -> str:
    """`bash_20250124` -> `bash`; an unversioned type is its own family."""
    match = _VERSIONED.match(tool_type)
    return match.group("family") if match else tool_type


def client_tool_schema(tool_type: str) -> tuple[dict[str, Any], str] | None:
    """(input schema, description) of an Anthropic-defined tool the client runs; None for any other."""
    family = tool_family(tool_type)
    if family not in _SCHEMAS:
        return None
    return _SCHEMAS[family], _DESCRIPTIONS[family]


def refuse_or_drop(index: int, tool_type: str, optional: frozenset[str]) -> None:
    """Returns (the tool is dropped) when the client marked it optional; else a 400 naming it."""
    if is_optional(tool_type, optional, tool_family(tool_type)):
        return
    if tool_family(tool_type) == "computer":
        why = "computer use drives a screen through screenshots, which this server's models cannot see"
    else:
        why = "it runs on Anthropic's servers, and there is nothing here to run it"
    raise bad_request(
        f"tools.{index}: the tool type {tool_type!r} is not available: {why}; leave it out, or list it in the "
        f"{OPTIONAL_TOOLS_HEADER} header to have it dropped",
        param=f"tools.{index}.type",
    )
