"""OpenAI chat completion -> Responses `response` object: output items, status, usage.

Output items are, in order: reasoning (when the model thought), the message, then one
`function_call` or `custom_tool_call` item per tool call, named as the client declared the tool
(a namespaced tool's flat name split back into `namespace` and `name`), a `tool_search_call` item
for a call to the client-run tool search, or a `shell_call`, `local_shell_call` or `apply_patch_call`
item for a call to one of those built-in tools (`builtin_tools.py`).
"""

from __future__ import annotations

import time
from typing import Any

from cortex.core.errors import ApiError
from cortex.core.openai import cached_tokens
from cortex.gateway.dialects.responses import builtin_tools
from cortex.gateway.dialects.responses.request import (
    ResponsesRequest,
    TextFormat,
)
from cortex.gateway.dialects.responses.to_chat import _new_id, new_response_id
from cortex.gateway.dialects.responses.tool_search import is_search_call, tool_search_call_item
from cortex.gateway.dialects.responses.tools import (
    BuiltInTool,
    CustomTool,
    FunctionTool,
    HostedTool,
    NamespaceTool,
    RequestTool,
    ToolSearchTool,
)


def output_text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(
    item_id: str, text: str, status: str = "completed", logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    content = [output_text_part(text, logprobs)] if status == "completed" or text else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed", namespace: str | None = None
) -> dict[str, Any]:
    item = {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
    if namespace:
        item["namespace"] = namespace
    return item


def custom_tool_call_item(
    item_id: str, call_id: str, name: str, text: str, namespace: str | None = None
) -> dict[str, Any]:
    """A `custom_tool_call` output item (the spec gives it no `status`)."""
    item = {"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": name, "input": text}
    if namespace:
        item["namespace"] = namespace
    return item


def client_name(req: ResponsesRequest, flat: str) -> tuple[str | None, str]:
    """(namespace, name) of the tool the model called by its flat name; an undeclared name stays as is."""
    return req.tool_names().get(flat, (None, flat))


def tool_call_item(req: ResponsesRequest, call: dict[str, Any]) -> dict[str, Any]:
    """A chat tool call (function or custom) as the Responses output item the client expects."""
    call_id = call.get("id") or _new_id("call")
    if call.get("type") == "custom":
        custom = call.get("custom") or {}
        namespace, name = client_name(req, custom.get("name", ""))
        return custom_tool_call_item(_new_id("ctc"), call_id, name, custom.get("input") or "", namespace)
    function = call.get("function") or {}
    arguments = function.get("arguments") or ""
    if is_search_call(req, function.get("name", "")):
        return tool_search_call_item(_new_id("ts"), call_id, arguments)
    if kind := builtin_tools.call_kind(req.tools, function.get("name", "")):
        return builtin_tools.call_item(kind, _new_id(kind.removesuffix("_call")), call_id, arguments)
    namespace, name = client_name(req, function.get("name", ""))
    return function_call_item(_new_id("fc"), call_id, name, arguments, namespace=namespace)


def response_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """Responses usage: `input_tokens` includes the part the prefix cache served (`cached_tokens`)."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_object(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The `response` object, echoing the request's settings as OpenAI does."""
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model or req.model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "text": {"format": _echo_format(req)},
        "tool_choice": _echo_tool_choice(req.tool_choice),
        "tools": [_echo_tool(t) for t in req.tools or [] if not isinstance(t, HostedTool)],
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def _echo_format(req: ResponsesRequest) -> dict[str, Any]:
    fmt = req.text.format if req.text and req.text.format else TextFormat()
    return fmt.model_dump(by_alias=True, exclude_none=True)


def _echo_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any]:
    """The request's tool choice; a namespaced tool's without `namespace`, which the response's type lacks."""
    if isinstance(choice, dict) and "namespace" in choice:
        return {key: value for key, value in choice.items() if key != "namespace"}
    return "auto" if choice is None else choice


def _echo_tool(tool: RequestTool) -> dict[str, Any]:
    if isinstance(tool, NamespaceTool):
        inner = [_echo_tool(t) for t in tool.tools]
        return {"type": "namespace", "name": tool.name, "description": tool.description, "tools": inner}
    if isinstance(tool, ToolSearchTool):
        return tool.model_dump(exclude_none=True)
    if isinstance(tool, BuiltInTool):
        return {"type": tool.type}
    if isinstance(tool, CustomTool):
        echoed: dict[str, Any] = {"type": "custom", "name": tool.name}
        if tool.description is not None:
            echoed["description"] = tool.description
        if tool.format is not None:
            echoed["format"] = tool.format.model_dump(exclude_none=True)
        return echoed
    assert isinstance(tool, FunctionTool)
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": tool.strict,
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def to_response(response: dict[str, Any], req: ResponsesRequest, *, response_id: str | None = None) -> dict[str, Any]:
    """A non-streaming chat completion as a Responses `response`."""
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        output.append(reasoning_item(_new_id("rs"), message["reasoning_content"]))
    text = message.get("content")
    if text:
        logprobs = (choice.get("logprobs") or {}).get("content") if req.wants_logprobs() else None
        output.append(message_item(_new_id("msg"), text, logprobs=logprobs))
    for call in message.get("tool_calls") or []:
        output.append(tool_call_item(req, call))
    usage = response.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return response_object(
        req,
        response_id=response_id or new_response_id(),
        created_at=response.get("created") or int(time.time()),
        status=_status(choice.get("finish_reason")),
        output=output,
        usage=response_usage(prompt, completion, cached_tokens(usage)),
    )


def response_error(error: ApiError) -> dict[str, Any]:
    """`response.error` for a failed response; `code` must be one of OpenAI's listed codes."""
    code = {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(error.status, "server_error")
    return {"code": code, "message": error.message}


# ---------------------------------------------------------------------------------------------
# Streaming: Chat chunks -> Responses events
# ---------------------------------------------------------------------------------------------
