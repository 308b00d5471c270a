"""OpenAI Responses request -> OpenAI chat body.

Stateless: every request carries its whole conversation in `input`. `instructions` becomes the
first system message, verbatim. Function and custom tools change shape (flat in Responses, nested
in Chat); a namespace's tools are listed one by one under flat names (`flat_tool_name`). Function
and custom calls and their outputs map onto assistant `tool_calls` and `tool` messages, matched by
`call_id`. Client-run tool search, its items and deferred tools: `tool_search.py`; the built-in tools the
client runs (shell, local_shell, apply_patch) and their items: `builtin_tools.py`.
"""

from __future__ import annotations

import uuid
from typing import Any

from cortex.core.errors import bad_request
from cortex.core.openai import function_tool
from cortex.gateway.dialects.responses import builtin_tools
from cortex.gateway.dialects.responses.request import (
    ContentPart,
    CustomToolCallItem,
    CustomToolCallOutputItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    MessageItem,
    ReasoningItem,
    Refusal,
    ResponsesRequest,
    TextFormat,
    ToolSearchCallItem,
    ToolSearchOutputItem,
)
from cortex.gateway.dialects.responses.tool_search import (
    DEFAULT_DESCRIPTION,
    DEFAULT_PARAMETERS,
    search_call,
    search_result,
)
from cortex.gateway.dialects.responses.tools import (
    BuiltInTool,
    ClientTool,
    CustomTool,
    ToolSearchTool,
    flat_tool_name,
)

ChatMessage = dict[str, Any]
Part = dict[str, Any]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def new_response_id() -> str:
    return _new_id("resp")


def to_chat_request(req: ResponsesRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "messages": to_chat_messages(req)}
    allowed = allowed_tools(req.tool_choice)
    deferred = req.deferred_names()
    tools = [
        to_chat_tool(t, ns, deferred=flat_tool_name(ns, t.name) in deferred)
        for ns, t in req.client_tools()
        if allowed is None or (ns, t.name) in allowed
    ]
    if allowed is not None and not tools:
        raise bad_request("tool_choice.tools names none of the request's tools", param="tool_choice.tools")
    if tools:
        body["tools"] = tools
        if req.tool_choice is not None:
            body["tool_choice"] = to_chat_tool_choice(req.tool_choice, req)
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "user"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    response_format = to_chat_response_format(req.text.format if req.text else None)
    if response_format is not None:
        body["response_format"] = response_format
    if req.wants_logprobs():  # computed by the neuron from the distribution it sampled from
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    if req.stream:
        body["stream"] = True
    return body


def allowed_tools(choice: str | dict[str, Any] | None) -> set[tuple[str | None, str]] | None:
    """The (namespace, name) pairs `tool_choice: {"type": "allowed_tools", "tools": [...]}` permits, or None.

    The neuron has no per-request filter, so the model is shown only the permitted tools: a call can
    then only be to one of them (calls are decoded under a grammar of the tools listed)."""
    if not isinstance(choice, dict) or choice.get("type") != "allowed_tools":
        return None
    permitted = choice.get("tools")
    if not isinstance(permitted, list):
        raise bad_request("tool_choice.tools must be a list of tools", param="tool_choice.tools")
    names: set[tuple[str | None, str]] = set()
    for entry in permitted:
        if isinstance(entry, dict) and entry.get("type") in builtin_tools.CALL_KINDS:
            names.add((None, entry["type"]))  # a built-in tool is named by its type
        elif not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad_request("each allowed tool needs its 'type' and 'name'", param="tool_choice.tools")
        else:
            names.add((entry.get("namespace"), entry["name"]))
    return names


def to_chat_tool(tool: ClientTool, namespace: str | None = None, *, deferred: bool = False) -> dict[str, Any]:
    """A function tool in Chat's nested shape, or a custom tool as the neuron's chat API takes it
    (`{"type": "custom", "custom": {name, description, format}}`, a grammar nested as Chat nests it).
    A client-run tool search is the function `tool_search`; a deferred tool has no schema or grammar yet."""
    name = flat_tool_name(namespace, tool.name)
    if isinstance(tool, BuiltInTool):
        return builtin_tools.chat_tool(tool)
    if isinstance(tool, ToolSearchTool):
        parameters = tool.parameters or DEFAULT_PARAMETERS
        return function_tool(name, parameters, tool.description or DEFAULT_DESCRIPTION)
    if not isinstance(tool, CustomTool):
        return function_tool(name, None if deferred else tool.parameters, tool.description, tool.strict)
    custom: dict[str, Any] = {"name": name}
    if tool.description is not None:
        custom["description"] = tool.description
    fmt = tool.format
    if fmt is not None and fmt.type == "grammar" and not deferred:
        custom["format"] = {"type": "grammar", "grammar": {"syntax": fmt.syntax, "definition": fmt.definition}}
    else:
        custom["format"] = {"type": "text"}
    return {"type": "custom", "custom": custom}


def to_chat_tool_choice(choice: str | dict[str, Any], req: ResponsesRequest | None = None) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(f"tool_choice {choice!r} is not one of 'auto', 'none', 'required'", param="tool_choice")
        return choice
    kind = choice.get("type")
    if kind in ("function", "custom") and isinstance(choice.get("name"), str) and choice["name"]:
        name = flat_tool_name(choice.get("namespace"), choice["name"])
        if req is not None and name not in req.tool_names():
            raise bad_request(f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice")
        return {"type": kind, kind: {"name": name}}
    if kind in ("shell", "apply_patch"):  # the spec's choices of a built-in tool, named by its type
        if req is not None and kind not in req.tool_names():
            raise bad_request(f"tool_choice names {kind!r}, which is not one of the tools", param="tool_choice")
        return {"type": "function", "function": {"name": kind}}
    if kind == "allowed_tools":  # the subset is applied to the tools listed (`allowed_tools`)
        return "required" if choice.get("mode") == "required" else "auto"
    raise bad_request(f"tool_choice of type {kind!r} is not supported; use a function tool", param="tool_choice")


def to_chat_response_format(fmt: TextFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_ or {}}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def to_chat_messages(req: ResponsesRequest) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        return messages
    reasoning: list[str] = []  # reasoning items wait for the assistant turn they belong to
    search_id = ""  # a hosted search's items have no call_id: its output answers the call just before
    for item in req.input:
        if isinstance(item, ReasoningItem):
            reasoning.append(item.text())
        elif isinstance(item, ToolSearchCallItem):
            search_id = item.call_id or item.id or _new_id("call")
            _append_call(messages, search_call(search_id, item.arguments), reasoning)
        elif isinstance(item, ToolSearchOutputItem):
            call_id = item.call_id or search_id
            messages.append({"role": "tool", "tool_call_id": call_id, "content": search_result(item)})
        elif isinstance(item, FunctionCallItem | CustomToolCallItem):
            _append_call(messages, _chat_call(item), reasoning)
        elif isinstance(item, FunctionCallOutputItem | CustomToolCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _tool_output(item.output)})
        elif isinstance(item, builtin_tools.BuiltInCallItem):
            _append_call(messages, builtin_tools.chat_call(item), reasoning)
        elif isinstance(item, builtin_tools.BuiltInOutputItem):
            call_id = builtin_tools.output_call_id(item)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": builtin_tools.output_text(item)})
        elif isinstance(item, MessageItem):
            messages.append(_message(item, reasoning))
    return messages


def _message(item: MessageItem, reasoning: list[str]) -> ChatMessage:
    message: ChatMessage = {"role": item.role, "content": _content(item.content)}
    if item.role == "assistant":
        _take_reasoning(message, reasoning)
    return message


def _chat_call(item: FunctionCallItem | CustomToolCallItem) -> dict[str, Any]:
    name = flat_tool_name(item.namespace, item.name)
    if isinstance(item, CustomToolCallItem):
        return {"id": item.call_id, "type": "custom", "custom": {"name": name, "input": item.input}}
    return {"id": item.call_id, "type": "function", "function": {"name": name, "arguments": item.arguments}}


def _append_call(messages: list[ChatMessage], call: dict[str, Any], reasoning: list[str]) -> None:
    """Consecutive tool calls (and the assistant text just before them) are one Chat turn."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant":
        last = {"role": "assistant", "content": None}
        messages.append(last)
    _take_reasoning(last, reasoning)
    last.setdefault("tool_calls", []).append(call)


def _take_reasoning(message: ChatMessage, reasoning: list[str]) -> None:
    text = "".join(reasoning)
    reasoning.clear()
    if text:
        message["reasoning_content"] = message.get("reasoning_content", "") + text


def _part(part: ContentPart) -> Part:
    if isinstance(part, InputImage):
        return {"type": "image_url", "image_url": {"url": part.image_url}}
    if isinstance(part, Refusal):
        return {"type": "text", "text": part.refusal}
    return {"type": "text", "text": part.text}


def _content(content: str | list[ContentPart]) -> str | list[Part]:
    """A string stays a string; one text part becomes a string (what every template renders)."""
    if isinstance(content, str):
        return content
    parts = [_part(p) for p in content]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _tool_output(output: str | list[ContentPart]) -> str | list[Part]:
    content = _content(output)
    if isinstance(content, list) and any(p["type"] != "text" for p in content):
        raise bad_request("a tool call's output may hold text only", param="input")
    return content


# ---------------------------------------------------------------------------------------------
# Reply: Chat -> Responses
# ---------------------------------------------------------------------------------------------
