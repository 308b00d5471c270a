"""From engine events to what a client reads: content, reasoning and tool calls, separated.

The engine streams text. A thinking model's `<think>` block becomes reasoning, a tool call in the
model's own format becomes an OpenAI tool call, the rest is content. `OutputSplitter` does that
incrementally, so streaming and non-streaming replies come out of one code path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cortex.neuron.engine import LoadedModel
from cortex.neuron.engine.types import Finished, GenerationRequest, TextDelta


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class ToolCall:
    call: dict[str, Any]  # {"id", "type": "function", "function": {"name", "arguments": json str}}


OutputEvent = Content | Reasoning | ToolCall | Finished


class OutputSplitter:
    def __init__(self, model: LoadedModel, *, parse_tools: bool) -> None:
        self._reasoning = model.reasoning_parser()
        self._tools = model.tool_parser() if parse_tools else None

    def feed(self, text: str) -> list[OutputEvent]:
        if self._reasoning is None:
            return self._content(text)
        out: list[OutputEvent] = []
        for kind, piece in self._reasoning.feed(text):
            out.extend([Reasoning(piece)] if kind == "reasoning" else self._content(piece))
        return out

    def finish(self) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        if self._reasoning is not None:
            for kind, piece in self._reasoning.finish():
                out.extend([Reasoning(piece)] if kind == "reasoning" else self._content(piece))
        if self._tools is not None:
            out.extend(self._wrap(self._tools.finish()))
        return out

    def _content(self, text: str) -> list[OutputEvent]:
        if not text:
            return []
        if self._tools is None:
            return [Content(text)]
        return self._wrap(self._tools.feed(text))

    @staticmethod
    def _wrap(items: list[str | dict[str, Any]]) -> list[OutputEvent]:
        return [Content(i) if isinstance(i, str) else ToolCall(i) for i in items if i]


async def split_output(
    model: LoadedModel, request: GenerationRequest, *, parse_tools: bool
) -> AsyncIterator[OutputEvent]:
    """Generate and split; the engine sequence is cancelled when the consumer stops early."""
    splitter = OutputSplitter(model, parse_tools=parse_tools)
    stream = model.generate(request)
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                for item in splitter.feed(event.text):
                    yield item
            else:
                for item in splitter.finish():
                    yield item
                yield event
    finally:
        await stream.aclose()
