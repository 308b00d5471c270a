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
from cortex.neuron.engine.types import Finished, GenerationRequest, PlainText, ReasoningText, TextDelta, ToolCall


@dataclass(frozen=True)
class Logprobs:
    """Per-token logprobs (engine `TokenLogprob`s) of the text that the events after it carry."""

    entries: tuple[Any, ...]


OutputEvent = PlainText | ReasoningText | ToolCall | Logprobs | Finished


class OutputSplitter:
    def __init__(self, model: LoadedModel, prompt_ids: list[int], *, parse_tools: bool) -> None:
        self._reasoning = model.reasoning_parser(prompt_ids)
        self._tools = model.tool_parser() if parse_tools else None

    def feed(self, text: str) -> list[OutputEvent]:
        if self._reasoning is None:
            return self._content(text)
        return self._route(self._reasoning.feed(text))

    def finish(self) -> list[OutputEvent]:
        out: list[OutputEvent] = self._route(self._reasoning.finish()) if self._reasoning is not None else []
        if self._tools is not None:
            out.extend(e for e in self._tools.finish() if not isinstance(e, PlainText) or e.text)
        return out

    def _route(self, events: list[PlainText | ReasoningText]) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        for event in events:
            out.extend(self._content(event.text) if isinstance(event, PlainText) else [event])
        return out

    def _content(self, text: str) -> list[OutputEvent]:
        if not text:
            return []
        if self._tools is None:
            return [PlainText(text)]
        return [e for e in self._tools.feed(text) if not isinstance(e, PlainText) or e.text]


async def split_output(
    model: LoadedModel, request: GenerationRequest, *, parse_tools: bool, budget: int | None = None
) -> AsyncIterator[OutputEvent]:
    """Generate and split; the engine sequence is cancelled when the consumer stops early.
    `budget`: what the engine's `validate` returned for the request (so it is not validated again)."""
    splitter = OutputSplitter(model, request.prompt_ids, parse_tools=parse_tools)
    stream = model.generate(request, budget)
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                if event.logprobs:
                    yield Logprobs(event.logprobs)
                for item in splitter.feed(event.text):
                    yield item
            else:
                for item in splitter.finish():
                    yield item
                yield event
    finally:
        await stream.aclose()
