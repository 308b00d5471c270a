"""OpenAI chat chunks -> Anthropic stream events (`message_start`, content blocks, `message_delta`, …)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cortex.core.errors import ApiError
from cortex.core.openai import cached_tokens
from cortex.core.sse import SseEvent
from cortex.gateway.dialects.anthropic.reply import parse_tool_arguments, stop_reason, usage_block
from cortex.gateway.dialects.anthropic.to_chat import new_message_id, new_tool_use_id
from cortex.gateway.dialects.chunk_translator import ChunkTranslator


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

    idle_events = (ping_event(),)

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
        self.cached_tokens = 0
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

    def fail(self, error: ApiError) -> list[SseEvent]:
        return [error_event(error)]

    def _note_usage(self, usage: dict[str, Any]) -> None:
        self.input_tokens = usage.get("prompt_tokens", self.input_tokens)
        self.cached_tokens = cached_tokens(usage)
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
        delta["usage"] = usage_block(self.input_tokens, self.output_tokens, self.cached_tokens)
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
