"""Server-sent events: the one place their framing is written, for both daemons.

Every event ends with a blank line (`EVENT_END`); readers take one whole event at a time. OpenAI
streams send unnamed `data:` events and end with `data: [DONE]`; Anthropic and OpenAI Responses
streams name every event (`event: message_start`). Every SDK's decoder expects one compact JSON
object on one `data:` line. Comments (`: keep-alive`) keep idle connections open.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

SseEvent = tuple[str, dict[str, Any]]
"""One event as the translators emit it: (event name, JSON data)."""

EVENT_END = b"\n\n"
DONE = b"data: [DONE]\n\n"
# Headers of every event stream either daemon answers: no caching, no proxy buffering (nginx).
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode_data(data: dict[str, Any]) -> bytes:
    """An unnamed event, as OpenAI streams send them."""
    return b"data: " + orjson.dumps(data) + EVENT_END


def encode_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def encode_events(events: Iterable[SseEvent]) -> bytes:
    """Several events as one write: a chunk that closes one block and opens the next is one flush."""
    return b"".join(encode_event(name, data) for name, data in events)


def encode_comment(text: str = "keep-alive") -> bytes:
    """An SSE comment: clients ignore it, proxies see bytes and keep the connection open."""
    return b": " + text.encode() + b"\n\n"


KEEPALIVE = encode_comment()


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one whole event (multi-line data joined), or None for comments and blanks."""
    if event.startswith(b"data: ") and event.count(b"\n") == 2:
        return event[6:-2]  # the common case: one data line
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None
