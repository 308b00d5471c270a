"""Server-sent events: encode named events and keep-alive comments, decode a byte stream.

Anthropic and OpenAI Responses streams name every event (`event: message_start`); OpenAI Chat
streams do not. Both put one JSON object per `data:` line.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import orjson

SseEvent = tuple[str, dict[str, Any]]
"""One event as the translators emit it: (event name, JSON data)."""


def encode_event(name: str | None, data: dict[str, Any]) -> bytes:
    """One SSE frame; JSON is compact and on one line, as every SDK's decoder expects."""
    payload = orjson.dumps(data)
    if name is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


def encode_events(events: Iterable[SseEvent]) -> bytes:
    return b"".join(encode_event(name, data) for name, data in events)


def encode_comment(text: str = "keep-alive") -> bytes:
    """An SSE comment: clients ignore it, proxies see bytes and keep the connection open."""
    return b": " + text.encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def iter_sse_data(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Decode `data:` JSON payloads from an SSE byte stream given line by line; stops at `[DONE]`.

    Comments and `event:` lines are skipped: OpenAI Chat chunks carry their meaning in the data.
    """
    async for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        if payload:
            yield orjson.loads(payload)
