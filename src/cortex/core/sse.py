"""Server-sent events as the dialect routes write them: named events and keep-alive comments.

Anthropic and OpenAI Responses streams name every event (`event: message_start`) and put one
JSON object on its `data:` line; every SDK's decoder expects the JSON compact, on one line.
"""

from __future__ import annotations

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
