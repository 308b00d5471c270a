"""Server-sent events as the dialect routes write them: named events and keep-alive comments.

Anthropic and OpenAI Responses streams name every event (`event: message_start`) and put one
JSON object on its `data:` line; every SDK's decoder expects the JSON compact, on one line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import orjson

SseEvent = tuple[str, dict[str, Any]]
"""One event as the translators emit it: (event name, JSON data)."""


def encode_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def encode_events(events: Iterable[SseEvent]) -> bytes:
    """Several events as one write: a chunk that closes one block and opens the next is one flush."""
    return b"".join(encode_event(name, data) for name, data in events)


def encode_comment(text: str = "keep-alive") -> bytes:
    """An SSE comment: clients ignore it, proxies see bytes and keep the connection open."""
    return b": " + text.encode() + b"\n\n"


class ChunkTranslator(ABC):
    """Drives a dialect's stream translator over OpenAI chat chunks (parsed dicts).

    The opening events go out once, before anything else; usage chunks update the token counts;
    each choice is translated by the dialect; nothing is emitted after the stream was finished.
    """

    _started: bool  # set by the dialect's __init__
    _finished: bool

    @abstractmethod
    def start(self) -> list[SseEvent]:
        """The opening events, once (later calls return none)."""

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
