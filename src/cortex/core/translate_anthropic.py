"""Anthropic Messages <-> OpenAI Chat Completions: pure functions plus a streaming state machine.

Requests go Anthropic -> OpenAI (the neuron's dialect); replies come back OpenAI -> Anthropic.
The translation keeps everything a chat model can use: system text verbatim and in order (also
system-role messages inside `messages`, where Claude Code puts them), every block, every tool call
id. Text-only content with several blocks stays a list of text parts (block boundaries are the
application's, not ours to join); rendering them is the neuron's chat template's job.

What cannot cross: `cache_control` (no prompt cache to steer), `is_error` on tool results (OpenAI
tool messages have no such flag; the content is passed verbatim, and Claude Code already wraps
failures in `<tool_use_error>`), `redacted_thinking` (Anthropic-encrypted), and the interleaving of
text and `tool_use` blocks within one assistant turn (OpenAI holds text, then tool calls).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cortex.core.anthropic import (
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    InputMessage,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolDefinition,
    ToolResultBlock,
    ToolUseBlock,
)
from cortex.core.chunk_translator import ChunkTranslator
from cortex.core.errors import ApiError, bad_request
from cortex.core.sse import SseEvent

# Where tool-call arguments that are not a JSON object end up, so a tool sees what the model wrote.
RAW_ARGUMENTS_KEY = "raw_arguments"

Part = dict[str, Any]
ChatMessage = dict[str, Any]


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------------------------
# Request: Anthropic -> OpenAI
# ---------------------------------------------------------------------------------------------


def to_chat_request(req: CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat body for a Messages (or count_tokens) request."""
    body: dict[str, Any] = {"model": req.model, "messages": to_chat_messages(req)}
    _add_tools(body, req.tools, req.tool_choice)
    if isinstance(req, MessagesRequest):
        _add_sampling(body, req)
    return body


def _add_sampling(body: dict[str, Any], req: MessagesRequest) -> None:
    body["max_tokens"] = req.max_tokens
    if req.stream:
        body["stream"] = True
        # Prompt and completion token counts only arrive in the final usage chunk.
        body["stream_options"] = {"include_usage": True}
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.stop_sequences:
        body["stop"] = list(req.stop_sequences)
    if req.metadata is not None and req.metadata.user_id:
        body["user"] = req.metadata.user_id


def _add_tools(body: dict[str, Any], tools: list[ToolDefinition] | None, choice: ToolChoice | None) -> None:
    chat_tools = [to_chat_tool(t) for t in tools or [] if t.is_custom()]
    if not chat_tools:
        # OpenAI rejects tool_choice without tools; with no tools there is nothing to choose.
        return
    body["tools"] = chat_tools
    if choice is not None:
        body["tool_choice"] = to_chat_tool_choice(choice)
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False


def to_chat_tool(tool: ToolDefinition) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema or {"type": "object"}}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def to_chat_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat_messages(req: CountTokensRequest) -> list[ChatMessage]:
    messages = _system_messages(req.system)
    for position, message in enumerate(req.messages):
        messages.extend(_convert_message(message, position))
    return messages


def _system_messages(system: str | list[TextBlock] | None) -> list[ChatMessage]:
    if not system:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    return [{"role": "system", "content": _text_content([_text_part(b.text) for b in system])}]


def _convert_message(message: InputMessage, position: int) -> list[ChatMessage]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant_message(message.content, position)]
    if message.role == "system":
        return [{"role": "system", "content": _text_content(_user_parts(message.content, position, "system"))}]
    return _user_messages(message.content, position)


def _text_part(text: str) -> Part:
    return {"type": "text", "text": text}


def _image_part(block: ImageBlock) -> Part:
    return {"type": "image_url", "image_url": {"url": block.data_url()}}


def _text_content(parts: list[Part]) -> str | list[Part]:
    """One text part is a plain string (what every chat template renders); several stay parts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _misplaced(block_type: str, role: str, position: int) -> ApiError:
    return bad_request(
        f"messages.{position}: a '{block_type}' block cannot appear in a '{role}' message",
        param=f"messages.{position}.content",
    )


def _user_parts(blocks: list[Any], position: int, role: str) -> list[Part]:
    """Text, image and text-document blocks as OpenAI content parts."""
    parts: list[Part] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            parts.append(_text_part(block.text))
        elif isinstance(block, DocumentBlock):
            parts.append(_text_part(block.text()))
        elif isinstance(block, ImageBlock):
            if role == "system":
                raise _misplaced("image", role, position)
            parts.append(_image_part(block))
        else:
            raise _misplaced(block.type, role, position)
    return parts


def _user_messages(blocks: list[Any], position: int) -> list[ChatMessage]:
    """Tool results first (OpenAI wants `tool` messages right after the assistant's calls), then
    the user's own content. Images inside tool results move into that user message: OpenAI tool
    messages carry text only."""
    tool_messages: list[ChatMessage] = []
    result_images: list[Part] = []
    own: list[Any] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            text_parts, images = _tool_result_parts(block, position)
            tool_messages.append(_tool_message(block.tool_use_id, text_parts))
            result_images.extend(images)
        else:
            own.append(block)
    parts = result_images + _user_parts(own, position, "user")
    if parts or not tool_messages:
        tool_messages.append({"role": "user", "content": _text_content(parts) if parts else ""})
    return tool_messages


def _tool_result_parts(block: ToolResultBlock, position: int) -> tuple[list[Part], list[Part]]:
    if block.content is None:
        return [], []
    if isinstance(block.content, str):
        return [_text_part(block.content)], []
    texts = [p for p in _user_parts(block.content, position, "user") if p["type"] == "text"]
    images = [_image_part(b) for b in block.content if isinstance(b, ImageBlock)]
    return texts, images


def _tool_message(tool_call_id: str, text_parts: list[Part]) -> ChatMessage:
    content: str | list[Part] = _text_content(text_parts) if text_parts else ""
    return {"role": "tool", "tool_call_id": tool_call_id, "content": content}


def _assistant_message(blocks: list[Any], position: int) -> ChatMessage:
    texts: list[Part] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(_text_part(block.text))
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append(to_chat_tool_call(block))
        elif not isinstance(block, RedactedThinkingBlock):
            raise _misplaced(block.type, "assistant", position)
    message: ChatMessage = {"role": "assistant", "content": _text_content(texts) if texts else None}
    if message["content"] is None and not calls:
        message["content"] = ""
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return message


def to_chat_tool_call(block: ToolUseBlock) -> dict[str, Any]:
    arguments = json.dumps(block.input, ensure_ascii=False)
    return {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}


# ---------------------------------------------------------------------------------------------
# Reply: OpenAI -> Anthropic
# ---------------------------------------------------------------------------------------------


def parse_tool_arguments(raw: str | None) -> dict[str, Any]:
    """A tool call's `arguments` string as an Anthropic `input` object, best effort.

    Valid JSON objects pass unchanged. Otherwise the first JSON object found in the text is used
    (models wrap arguments in code fences or trail garbage). Anything else keeps the raw text
    under `raw_arguments`, so the tool reports a useful validation error rather than running with
    an empty input. Empty or `null` arguments mean "no arguments": `{}`.
    """
    text = (raw or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = _first_json_object(text)
    if value is None:
        return {} if text == "null" else {RAW_ARGUMENTS_KEY: raw}
    if isinstance(value, dict):
        return value
    return {RAW_ARGUMENTS_KEY: raw}


def _first_json_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def stop_reason(finish_reason: str | None, stop_sequence: str | None, used_tools: bool) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for an OpenAI finish.

    The neuron names the matched stop string in the choice's non-standard `stop_sequence`.
    """
    if finish_reason == "length":
        return "max_tokens", None
    if used_tools or finish_reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if finish_reason == "content_filter":
        return "refusal", None
    if isinstance(stop_sequence, str):
        return "stop_sequence", stop_sequence
    return "end_turn", None


def usage_block(prompt_tokens: int | None, completion_tokens: int) -> dict[str, Any]:
    """Anthropic usage; cache counts are 0 (no prompt cache), present for clients that add them up."""
    return {
        "input_tokens": prompt_tokens or 0,
        "output_tokens": completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def to_anthropic_message(
    response: dict[str, Any], *, model: str, thinking: bool = False, message_id: str | None = None
) -> dict[str, Any]:
    """A non-streaming OpenAI chat completion as an Anthropic `message`."""
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = _reply_blocks(message, thinking)
    used_tools = any(block["type"] == "tool_use" for block in content)
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_sequence"), used_tools)
    usage = response.get("usage") or {}
    return {
        "id": message_id or new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_block(usage.get("prompt_tokens"), usage.get("completion_tokens") or 0),
    }


def _reply_blocks(message: dict[str, Any], thinking: bool) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if thinking and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_tool_use_id(),
                "name": function.get("name") or "",
                "input": parse_tool_arguments(function.get("arguments")),
            }
        )
    return blocks


# ---------------------------------------------------------------------------------------------
# Streaming: OpenAI chunks -> Anthropic events
# ---------------------------------------------------------------------------------------------


def ping_event() -> SseEvent:
    return "ping", {"type": "ping"}


def error_event(error: ApiError) -> SseEvent:
    """A failure after the stream started: Anthropic's `error` event with Anthropic's error type."""
    return "error", error.anthropic_body()


@dataclass
class _ToolCall:
    """One OpenAI tool call being assembled from chunk fragments."""

    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    block_index: int | None = None  # set once its content block has started
    closed: bool = False


class AnthropicStream(ChunkTranslator):
    """Feeds OpenAI chat chunks (parsed dicts), emits Anthropic stream events in Anthropic's order:

    `message_start`, then per block `content_block_start` / `content_block_delta`... /
    `content_block_stop` (blocks strictly one after another, indices from 0), then `message_delta`
    (stop reason, usage) and `message_stop` once the upstream stream ends.

    Text and thinking stream as they arrive. A tool call's block starts as soon as its name is
    known, but its arguments are sent as one `input_json_delta` when the call is complete: the
    SDKs parse every partial JSON prefix and fail the whole stream on malformed arguments, so the
    arguments are parsed (best effort, as in the non-streaming reply) before they are sent. Our
    neuron emits each tool call whole, so nothing is delayed in practice.
    """

    def __init__(
        self,
        model: str,
        *,
        thinking: bool = False,
        input_tokens: int | None = None,
        message_id: str | None = None,
    ) -> None:
        self.model = model
        self.message_id = message_id or new_message_id()
        self.thinking = thinking
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self._started = False
        self._finished = False
        self._next_index = 0
        self._open: str | None = None  # "text" | "thinking" | "tool"
        self._open_tool: _ToolCall | None = None
        self._tools: dict[int, _ToolCall] = {}
        self._finish_reason: str | None = None
        self._stop_sequence: str | None = None

    # -- public ------------------------------------------------------------------------------

    def start(self) -> list[SseEvent]:
        """`message_start`, once; `feed` and `finish` call it when the caller did not."""
        if self._started:
            return []
        self._started = True
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_block(self.input_tokens, 0),
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def _note_usage(self, usage: dict[str, Any]) -> None:
        self.input_tokens = usage.get("prompt_tokens", self.input_tokens)
        self.output_tokens = usage.get("completion_tokens", self.output_tokens)

    def finish(self) -> list[SseEvent]:
        """Close what is open and end the message; call when the upstream stream has ended."""
        events = self.start()
        if self._finished:
            return events
        events.extend(self._close_open())
        unnamed = [t for t in self._tools.values() if t.block_index is None]
        if unnamed:
            raise ApiError(502, "The model's server sent a tool call without a function name")
        self._finished = True
        reason, sequence = stop_reason(self._finish_reason, self._stop_sequence, bool(self._tools))
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}}
        delta["usage"] = usage_block(self.input_tokens, self.output_tokens)
        events.append(("message_delta", delta))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    # -- chunk handling ----------------------------------------------------------------------

    def _feed_choice(self, choice: dict[str, Any]) -> list[SseEvent]:
        events: list[SseEvent] = []
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content")
        if reasoning and self.thinking:
            events.extend(self._stream_text("thinking", reasoning))
        content = delta.get("content")
        if content:
            events.extend(self._stream_text("text", content))
        for fragment in delta.get("tool_calls") or []:
            events.extend(self._tool_fragment(fragment))
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
            self._stop_sequence = choice.get("stop_sequence")
            events.extend(self._close_open())
        return events

    def _stream_text(self, kind: str, text: str) -> list[SseEvent]:
        events: list[SseEvent] = []
        if self._open != kind:
            events.extend(self._close_open())
            empty = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": ""}
            if kind == "thinking":
                empty["signature"] = ""
            events.append(self._block_start(kind, empty))
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        events.append(self._block_delta(delta))
        return events

    def _tool_fragment(self, fragment: dict[str, Any]) -> list[SseEvent]:
        call = self._tool_for(fragment)
        function = fragment.get("function") or {}
        if call.closed:
            if function.get("arguments"):
                # Anthropic blocks are strictly sequential: a closed block cannot take more input.
                raise ApiError(502, "The model's server interleaved the arguments of several tool calls")
            return []
        call.id = call.id or fragment.get("id")
        call.name = call.name or function.get("name")
        if function.get("arguments"):
            call.arguments.append(function["arguments"])
        if call.block_index is None and call.name:
            events = self._close_open()
            call.id = call.id or new_tool_use_id()
            call.block_index = self._next_index
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            events.append(self._block_start("tool", block))
            self._open_tool = call
            return events
        return []

    def _tool_for(self, fragment: dict[str, Any]) -> _ToolCall:
        index = fragment.get("index")
        if index is None:
            # Not standard, but seen: no index. A new id means a new call; otherwise the last one.
            last = max(self._tools, default=None)
            fresh = last is None or (fragment.get("id") and fragment["id"] != self._tools[last].id)
            index = len(self._tools) if fresh else last
        return self._tools.setdefault(index, _ToolCall())

    # -- blocks ------------------------------------------------------------------------------

    def _block_start(self, kind: str, block: dict[str, Any]) -> SseEvent:
        self._open = kind
        index = self._next_index
        return "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}

    def _block_delta(self, delta: dict[str, Any]) -> SseEvent:
        return "content_block_delta", {"type": "content_block_delta", "index": self._next_index, "delta": delta}

    def _close_open(self) -> list[SseEvent]:
        if self._open is None:
            return []
        events: list[SseEvent] = []
        if self._open == "tool" and self._open_tool is not None:
            tool_input = parse_tool_arguments("".join(self._open_tool.arguments))
            partial = json.dumps(tool_input, ensure_ascii=False)
            events.append(self._block_delta({"type": "input_json_delta", "partial_json": partial}))
            self._open_tool.closed = True
            self._open_tool = None
        events.append(("content_block_stop", {"type": "content_block_stop", "index": self._next_index}))
        self._open = None
        self._next_index += 1
        return events
