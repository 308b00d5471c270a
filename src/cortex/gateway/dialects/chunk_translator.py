"""The driver every dialect's stream translator shares: OpenAI chat chunks in, named SSE events out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from cortex.core.errors import ApiError
from cortex.core.sse import SseEvent


class ChunkTranslator(ABC):
    """Drives a dialect's stream translator over OpenAI chat chunks (parsed dicts).

    The opening events go out once, before anything else; usage chunks update the token counts;
    each choice is translated by the dialect; nothing is emitted after the stream was finished.
    """

    _started: bool  # set by the dialect's __init__
    _finished: bool
    idle_events: tuple[SseEvent, ...] = ()  # what a quiet stream is sent (none: an SSE comment)

    @abstractmethod
    def start(self) -> list[SseEvent]:
        """The opening events, once (later calls return none)."""

    @abstractmethod
    def finish(self) -> list[SseEvent]:
        """The closing events, once the upstream stream ended."""

    @abstractmethod
    def fail(self, error: ApiError) -> list[SseEvent]:
        """The events that end a stream that already started with `error`."""

    @abstractmethod
    def _note_usage(self, usage: dict[str, Any]) -> None: ...

    @abstractmethod
    def _feed_choice(self, choice: dict[str, Any]) -> list[SseEvent]: ...

    def feed(self, chunk: dict[str, Any]) -> list[SseEvent]:
        events = self.start()
        if self._finished:
            return events
        usage = chunk.get("usage")
        if usage:
            self._note_usage(usage)
        for choice in chunk.get("choices") or []:
            events.extend(self._feed_choice(choice))
        return events
