"""Client-run tool search on the Responses route (`{"type": "tool_search", "execution": "client"}`).

The client (Codex, the Agents SDK) keeps a catalogue of deferred tools and searches it itself. The
model sees the search as an ordinary function, `tool_search`, with the client's description and
parameters; a call to it comes back as a `tool_search_call` item (`arguments` a JSON object, as the
spec and Codex read it). The client answers in a later request with the call and a
`tool_search_output` item listing the tools it loaded: the call goes back to the model as a
`tool_search` function call, the output as that call's tool message (a short list of the loaded
tools), and the loaded tools are added to the tools the model may call in that request (namespaces
flattened as usual, `<namespace>__<name>`).

A tool marked `defer_loading: true` is listed by name and description only (parameters: any object;
a custom tool's input: free text) until a `tool_search_output` in `input` loads it, as the spec
describes for deferred functions: the search defers the schema, not the name.
"""

from __future__ import annotations

import json
from typing import Any

from cortex.gateway.dialects.responses.request import (
    ResponsesRequest,
    ToolSearchOutputItem,
)
from cortex.gateway.dialects.responses.tools import (
    flat_tool_name,
    flatten_tools,
)

# What the model is told when the client gave no description or parameters (the Agents SDK's default
# client search takes a list of tool paths).
DEFAULT_DESCRIPTION = "Search the deferred tools and load the matching ones, which you can call from the next turn on."
DEFAULT_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"paths": {"type": "array", "items": {"type": "string"}}},
    "required": ["paths"],
}
_SUMMARY_CHARS = 200  # of a loaded tool's description, in the search's answer to the model


def search_call(call_id: str, arguments: Any) -> dict[str, Any]:
    """An earlier `tool_search_call` as the chat tool call the model made (arguments as a JSON string)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {})
    return {"id": call_id, "type": "function", "function": {"name": "tool_search", "arguments": text}}


def search_result(item: ToolSearchOutputItem) -> str:
    """The tool message answering a tool search: the loaded tools by the names the model calls them."""
    lines = []
    for namespace, tool in flatten_tools(item.tools):
        summary = (tool.description or "").strip().split("\n", 1)[0][:_SUMMARY_CHARS]
        name = flat_tool_name(namespace, tool.name)
        lines.append(f"- {name}: {summary}" if summary else f"- {name}")
    if not lines:
        return "No tools were found."
    return "Tools loaded (you can call them now):\n" + "\n".join(lines)


def search_arguments(text: str) -> Any:
    """A `tool_search_call`'s `arguments`: the model's JSON object (its text as is when it is not JSON)."""
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return text


def tool_search_call_item(item_id: str, call_id: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    """The `tool_search_call` output item for a model's call to the client-run search."""
    return {
        "id": item_id,
        "type": "tool_search_call",
        "call_id": call_id,
        "execution": "client",
        "arguments": search_arguments(arguments) if status == "completed" else {},
        "status": status,
    }


def is_search_call(req: ResponsesRequest, flat_name: str) -> bool:
    """Whether the model's call by this name is to the request's client-run tool search."""
    name = req.tool_search_name()
    return name is not None and flat_name == name
