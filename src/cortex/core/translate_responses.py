"""OpenAI Responses <-> OpenAI Chat Completions: pure functions plus a streaming state machine.

Stateless: every request carries its whole conversation in `input`. `instructions` becomes the
first system message, verbatim. Function tools change shape (flat in Responses, nested in Chat);
function calls and their outputs map onto assistant `tool_calls` and `tool` messages, matched by
`call_id`. Output items are, in order: reasoning (when the model thought), the message, then one
`function_call` item per tool call.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from cortex.core.chunk_translator import ChunkTranslator
from cortex.core.errors import ApiError, bad_request
from cortex.core.responses import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputImage,
    MessageItem,
    ReasoningItem,
    Refusal,
    ResponsesRequest,
    TextFormat,
)
from cortex.core.sse import SseEvent

ChatMessage = dict[str, Any]
Part = dict[str, Any]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def new_response_id() -> str:
    return _new_id("resp")


# ---------------------------------------------------------------------------------------------
# Request: Responses -> Chat
# ---------------------------------------------------------------------------------------------


def to_chat_request(req: ResponsesRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "messages": to_chat_messages(req)}
    tools = [to_chat_tool(t) for t in req.function_tools()]
    if tools:
        body["tools"] = tools
        if req.tool_choice is not None:
            body["tool_choice"] = to_chat_tool_choice(req.tool_choice)
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
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def to_chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def to_chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(f"tool_choice {choice!r} is not one of 'auto', 'none', 'required'", param="tool_choice")
        return choice
    kind = choice.get("type")
    if kind == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools":
        # The neuron cannot restrict to a subset; the mode is what it can honour.
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
    for item in req.input:
        if isinstance(item, ReasoningItem):
            reasoning.append(item.text())
        elif isinstance(item, FunctionCallItem):
            _append_call(messages, item, reasoning)
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _tool_output(item.output)})
        elif isinstance(item, MessageItem):
            messages.append(_message(item, reasoning))
    return messages


def _message(item: MessageItem, reasoning: list[str]) -> ChatMessage:
    message: ChatMessage = {"role": item.role, "content": _content(item.content)}
    if item.role == "assistant":
        _take_reasoning(message, reasoning)
    return message


def _append_call(messages: list[ChatMessage], item: FunctionCallItem, reasoning: list[str]) -> None:
    """Consecutive function calls (and the assistant text just before them) are one Chat turn."""
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
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
        raise bad_request("function_call_output may hold text only", param="input")
    return content


# ---------------------------------------------------------------------------------------------
# Reply: Chat -> Responses
# ---------------------------------------------------------------------------------------------


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [output_text_part(text)] if status == "completed" or text else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
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
        "tools": [_echo_tool(t) for t in req.function_tools()],
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def _echo_format(req: ResponsesRequest) -> dict[str, Any]:
    fmt = req.text.format if req.text and req.text.format else TextFormat()
    return fmt.model_dump(by_alias=True, exclude_none=True)


def _echo_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any]:
    return "auto" if choice is None else choice


def _echo_tool(tool: FunctionTool) -> dict[str, Any]:
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
        output.append(message_item(_new_id("msg"), text))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        call_id = call.get("id") or _new_id("call")
        output.append(
            function_call_item(_new_id("fc"), call_id, function.get("name", ""), function.get("arguments") or "")
        )
    usage = response.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return response_object(
        req,
        response_id=response_id or new_response_id(),
        created_at=response.get("created") or int(time.time()),
        status=_status(choice.get("finish_reason")),
        output=output,
        usage=response_usage(prompt, completion),
    )


def response_error(error: ApiError) -> dict[str, Any]:
    """`response.error` for a failed response; `code` must be one of OpenAI's listed codes."""
    code = {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(error.status, "server_error")
    return {"code": code, "message": error.message}


# ---------------------------------------------------------------------------------------------
# Streaming: Chat chunks -> Responses events
# ---------------------------------------------------------------------------------------------


class _OpenItem:
    """The output item being streamed: a message, a reasoning item or a function call."""

    def __init__(self, kind: str, item_id: str, output_index: int) -> None:
        self.kind = kind
        self.item_id = item_id
        self.output_index = output_index
        self.text: list[str] = []
        self.call_id = ""
        self.name = ""


class ResponsesStream(ChunkTranslator):
    """Feeds OpenAI chat chunks (parsed dicts), emits the Responses stream events in the documented
    order, each with its `sequence_number`:

    `response.created`, `response.in_progress`; per message `response.output_item.added`,
    `response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
    `response.content_part.done`, `response.output_item.done`; per function call
    `response.output_item.added`, `response.function_call_arguments.delta`..., `.done`,
    `response.output_item.done`; and last `response.completed` (or `response.incomplete` when the
    output hit `max_output_tokens`). Reasoning streams as a `reasoning` item with
    `response.reasoning_text.delta` events.
    """

    def __init__(self, req: ResponsesRequest, *, response_id: str | None = None) -> None:
        self.req = req
        self.response_id = response_id or new_response_id()
        self.created_at = int(time.time())
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.model = req.model
        self._sequence = 0
        self._started = False
        self._finished = False
        self._open: _OpenItem | None = None
        self._tool_items: dict[int, _OpenItem] = {}
        self._done_items: list[dict[str, Any]] = []
        self._finish_reason: str | None = None

    # -- public ------------------------------------------------------------------------------

    def start(self) -> list[SseEvent]:
        if self._started:
            return []
        self._started = True
        snapshot = self._response("in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def _note_usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
        self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)

    def finish(self) -> list[SseEvent]:
        events = self.start()
        if self._finished:
            return events
        events.extend(self._close_open())
        self._finished = True
        status = _status(self._finish_reason)
        usage = response_usage(self.prompt_tokens, self.completion_tokens)
        final = self._response(status, output=self._done_items, usage=usage)
        events.append(self._event(f"response.{status}", response=final))
        return events

    def fail(self, error: ApiError) -> list[SseEvent]:
        """A failure mid-stream: an `error` event, then `response.failed` with what was done."""
        events = self.start()
        if self._finished:
            return events
        self._finished = True
        code = error.code or error.type
        events.append(self._event("error", code=code, message=error.message, param=error.param))
        failed = self._response("failed", output=self._done_items, error=response_error(error))
        events.append(self._event("response.failed", response=failed))
        return events

    # -- chunk handling ----------------------------------------------------------------------

    def _feed_choice(self, choice: dict[str, Any]) -> list[SseEvent]:
        events: list[SseEvent] = []
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content"):
            events.extend(self._stream_text("reasoning", delta["reasoning_content"]))
        if delta.get("content"):
            events.extend(self._stream_text("message", delta["content"]))
        for fragment in delta.get("tool_calls") or []:
            events.extend(self._tool_fragment(fragment))
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
            events.extend(self._close_open())
        return events

    def _stream_text(self, kind: str, text: str) -> list[SseEvent]:
        events: list[SseEvent] = []
        item = self._open
        if item is None or item.kind != kind:
            events.extend(self._close_open())
            events.extend(self._add_text_item(kind))
            item = self._open
            assert item is not None
        item.text.append(text)
        if kind == "message":
            events.append(self._part_event("response.output_text.delta", item, delta=text, logprobs=[]))
        else:
            events.append(self._part_event("response.reasoning_text.delta", item, delta=text))
        return events

    def _add_text_item(self, kind: str) -> list[SseEvent]:
        if kind == "message":
            item = self._open_item(kind, _new_id("msg"))
            added, part = message_item(item.item_id, "", "in_progress"), output_text_part("")
        else:
            item = self._open_item(kind, _new_id("rs"))
            added, part = reasoning_item(item.item_id, "", "in_progress"), {"type": "reasoning_text", "text": ""}
        return [
            self._event("response.output_item.added", output_index=item.output_index, item=added),
            self._part_event("response.content_part.added", item, part=part),
        ]

    def _tool_fragment(self, fragment: dict[str, Any]) -> list[SseEvent]:
        events: list[SseEvent] = []
        index = fragment.get("index", len(self._tool_items))
        function = fragment.get("function") or {}
        item = self._tool_items.get(index)
        if item is None:
            events.extend(self._close_open())
            item = self._open_item("function_call", _new_id("fc"))
            item.call_id = fragment.get("id") or _new_id("call")
            item.name = function.get("name") or ""
            self._tool_items[index] = item
            added = function_call_item(item.item_id, item.call_id, item.name, "", "in_progress")
            events.append(self._event("response.output_item.added", output_index=item.output_index, item=added))
        elif item is not self._open:
            if function.get("arguments"):
                raise ApiError(502, "The model's server interleaved the arguments of several tool calls")
            return events
        item.name = item.name or function.get("name") or ""
        arguments = function.get("arguments")
        if arguments:
            item.text.append(arguments)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.item_id,
                    output_index=item.output_index,
                    delta=arguments,
                )
            )
        return events

    # -- items -------------------------------------------------------------------------------

    def _open_item(self, kind: str, item_id: str) -> _OpenItem:
        self._open = _OpenItem(kind, item_id, len(self._done_items))
        return self._open

    def _close_open(self) -> list[SseEvent]:
        item = self._open
        if item is None:
            return []
        self._open = None
        text = "".join(item.text)
        if item.kind == "function_call":
            done = function_call_item(item.item_id, item.call_id, item.name, text)
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.item_id,
                    output_index=item.output_index,
                    arguments=text,
                )
            ]
        elif item.kind == "message":
            done = message_item(item.item_id, text)
            events = [
                self._part_event("response.output_text.done", item, text=text, logprobs=[]),
                self._part_event("response.content_part.done", item, part=output_text_part(text)),
            ]
        else:
            done = reasoning_item(item.item_id, text)
            events = [
                self._part_event("response.reasoning_text.done", item, text=text),
                self._part_event("response.content_part.done", item, part={"type": "reasoning_text", "text": text}),
            ]
        self._done_items.append(done)
        events.append(self._event("response.output_item.done", output_index=item.output_index, item=done))
        return events

    # -- events ------------------------------------------------------------------------------

    def _event(self, name: str, **fields: Any) -> SseEvent:
        data = {"type": name, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return name, data

    def _part_event(self, name: str, item: _OpenItem, **fields: Any) -> SseEvent:
        return self._event(name, item_id=item.item_id, output_index=item.output_index, content_index=0, **fields)

    def _response(
        self,
        status: str,
        *,
        output: list[dict[str, Any]] | None = None,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return response_object(
            self.req,
            response_id=self.response_id,
            created_at=self.created_at,
            status=status,
            output=list(output or []),
            usage=usage,
            error=error,
            model=self.model,
        )
