"""OpenAI chat chunks -> Responses stream events (`response.created`, output items, deltas, …)."""

from __future__ import annotations

import time
from typing import Any

from cortex.core.errors import ApiError
from cortex.core.openai import cached_tokens
from cortex.core.sse import SseEvent
from cortex.gateway.dialects.chunk_translator import ChunkTranslator
from cortex.gateway.dialects.responses import builtin_tools
from cortex.gateway.dialects.responses.reply import (
    _status,
    client_name,
    custom_tool_call_item,
    function_call_item,
    message_item,
    output_text_part,
    reasoning_item,
    response_error,
    response_object,
    response_usage,
)
from cortex.gateway.dialects.responses.request import (
    ResponsesRequest,
)
from cortex.gateway.dialects.responses.to_chat import _new_id, new_response_id
from cortex.gateway.dialects.responses.tool_search import is_search_call, tool_search_call_item


class _OpenItem:
    """The output item being streamed: a message, a reasoning item, a function or a custom tool call."""

    def __init__(self, kind: str, item_id: str, output_index: int) -> None:
        self.kind = kind
        self.item_id = item_id
        self.output_index = output_index
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []  # a message's per-token logprobs (Chat's shape)
        self.call_id = ""
        self.name = ""  # as the model wrote it (flat); mapped back to the client's name when sent


# The event that ends each kind of call's streamed text, with the field that carries the whole of it.
_CALL_DONE_EVENTS: dict[str, tuple[str, str] | None] = {
    "function_call": ("response.function_call_arguments.done", "arguments"),
    "custom_tool_call": ("response.custom_tool_call_input.done", "input"),
    "tool_search_call": None,
    "shell_call": None,
    "local_shell_call": None,
    "apply_patch_call": None,
}
# Calls whose item is whole only with all their arguments (an `apply_patch_call` must hold its operation):
# added when the call ends, just before it is done.
_ADDED_WHEN_DONE = frozenset(builtin_tools.CALL_KINDS.values())


class ResponsesStream(ChunkTranslator):
    """Feeds OpenAI chat chunks (parsed dicts), emits the Responses stream events in the documented
    order, each with its `sequence_number`:

    `response.created`, `response.in_progress`; per message `response.output_item.added`,
    `response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
    `response.content_part.done`, `response.output_item.done`; per function call
    `response.output_item.added`, `response.function_call_arguments.delta`..., `.done`,
    `response.output_item.done`; per custom tool call the same with `response.custom_tool_call_input.delta`
    and `.done`; per call to the client-run tool search `response.output_item.added` and
    `response.output_item.done` of a `tool_search_call` item (the spec has no argument deltas for it);
    per call to a built-in client tool the same of a `shell_call`, `local_shell_call` or `apply_patch_call`
    item, both sent when the call ends (the added item already holds the whole action);
    and last `response.completed` (or `response.incomplete` when the output hit `max_output_tokens`).
    Reasoning streams as a `reasoning` item with `response.reasoning_text.delta` events.
    """

    def __init__(self, req: ResponsesRequest, *, response_id: str | None = None) -> None:
        self.req = req
        self.response_id = response_id or new_response_id()
        self.created_at = int(time.time())
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.model = req.model
        self._sequence = 0
        self._started = False
        self._finished = False
        self._open: _OpenItem | None = None
        self._tool_items: dict[int, _OpenItem] = {}
        self._done_items: list[dict[str, Any]] = []
        self._finish_reason: str | None = None
        self._logprobs = req.wants_logprobs()
        self._pending_logprobs: list[dict[str, Any]] = []  # the neuron sends a token's logprobs before its text

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
        self.cached_tokens = cached_tokens(usage)

    def finish(self) -> list[SseEvent]:
        events = self.start()
        if self._finished:
            return events
        events.extend(self._close_open())
        self._finished = True
        status = _status(self._finish_reason)
        usage = response_usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
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
        if self._logprobs:
            self._pending_logprobs.extend((choice.get("logprobs") or {}).get("content") or [])
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
            logprobs, self._pending_logprobs = self._pending_logprobs, []
            item.logprobs.extend(logprobs)
            events.append(
                self._part_event("response.output_text.delta", item, delta=text, logprobs=_event_logprobs(logprobs))
            )
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
        custom = fragment.get("type") == "custom" or "custom" in fragment
        body = fragment.get("custom" if custom else "function") or {}
        item = self._tool_items.get(index)
        if item is None:
            events.extend(self._close_open())
            if custom:
                kind, prefix = "custom_tool_call", "ctc"
            elif is_search_call(self.req, body.get("name") or ""):
                kind, prefix = "tool_search_call", "ts"  # the spec streams no argument deltas for it
            elif built_in := builtin_tools.call_kind(self.req.tools, body.get("name") or ""):
                kind, prefix = built_in, built_in.removesuffix("_call")
            else:
                kind, prefix = "function_call", "fc"
            item = self._open_item(kind, _new_id(prefix))
            item.call_id = fragment.get("id") or _new_id("call")
            item.name = body.get("name") or ""
            self._tool_items[index] = item
            if kind not in _ADDED_WHEN_DONE:
                events.append(
                    self._event("response.output_item.added", output_index=item.output_index, item=self._call(item))
                )
        elif item is not self._open:
            if body.get("arguments") or body.get("input"):
                raise ApiError(502, "The model's server interleaved the arguments of several tool calls")
            return events
        item.name = item.name or body.get("name") or ""
        text = body.get("input" if custom else "arguments")
        if text and _CALL_DONE_EVENTS.get(item.kind, ()) is None:  # a call streamed without argument deltas
            item.text.append(text)
        elif text:
            item.text.append(text)
            name = "response.custom_tool_call_input.delta" if custom else "response.function_call_arguments.delta"
            events.append(self._event(name, item_id=item.item_id, output_index=item.output_index, delta=text))
        return events

    def _call(self, item: _OpenItem, status: str = "in_progress") -> dict[str, Any]:
        """The call's output item: the text so far when done (empty while in progress), the client's names."""
        namespace, name = client_name(self.req, item.name)
        text = "".join(item.text) if status == "completed" else ""
        if item.kind == "tool_search_call":
            return tool_search_call_item(item.item_id, item.call_id, text, status)
        if item.kind in _ADDED_WHEN_DONE:
            return builtin_tools.call_item(item.kind, item.item_id, item.call_id, "".join(item.text), status)
        if item.kind == "custom_tool_call":
            return custom_tool_call_item(item.item_id, item.call_id, name, text, namespace)
        return function_call_item(item.item_id, item.call_id, name, text, status, namespace)

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
        if item.kind in _CALL_DONE_EVENTS:  # a call's own done event (a tool search has none), then the item's
            done, events = self._call(item, "completed"), []
            if item.kind in _ADDED_WHEN_DONE:
                added = self._call(item, "in_progress")
                events.append(self._event("response.output_item.added", output_index=item.output_index, item=added))
            if (closing := _CALL_DONE_EVENTS[item.kind]) is not None:
                event, field = closing
                events.append(self._event(event, item_id=item.item_id, output_index=item.output_index, **{field: text}))
        elif item.kind == "message":
            item.logprobs.extend(self._pending_logprobs)  # tokens whose text was held back, then ended the message
            self._pending_logprobs = []
            logprobs = item.logprobs if self._logprobs else None
            done = message_item(item.item_id, text, logprobs=logprobs)
            events = [
                self._part_event("response.output_text.done", item, text=text, logprobs=_event_logprobs(logprobs)),
                self._part_event("response.content_part.done", item, part=output_text_part(text, logprobs)),
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


def _event_logprobs(entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Chat's per-token logprobs as the text events carry them: token, logprob, top_logprobs (no bytes)."""
    return [
        {
            "token": entry.get("token", ""),
            "logprob": entry.get("logprob", 0.0),
            "top_logprobs": [
                {"token": t.get("token"), "logprob": t.get("logprob")} for t in entry.get("top_logprobs") or []
            ],
        }
        for entry in entries or []
    ]
