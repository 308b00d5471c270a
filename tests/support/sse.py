"""Read an SSE response the way a client does: one `data:` payload per event."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def sse_events(response: aiohttp.ClientResponse) -> list[Any]:
    """All `data:` payloads (JSON-decoded; `[DONE]` kept as the string) until the stream ends."""
    events: list[Any] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
