"""SSE pieces of the streaming proxy: framing, the body sent upstream, usage and token detection.

The neuron frames every event with a blank line (`\\n\\n`); the proxy reads one whole event at a
time (`readuntil`, never fixed-size blocks) and writes it on at once, so nothing is buffered.
The checks here look at raw bytes first and parse JSON only when an event carries usage.
"""

from __future__ import annotations

from typing import Any

import orjson

from cortex.core.errors import ApiError

EVENT_END = b"\n\n"
MAX_EVENT_BYTES = 16 * 1024 * 1024
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

# Byte patterns of a chunk that carries generated text: (field with a string value, the same field empty).
_TEXT_MARKERS = (
    (b'"content":"', b'"content":""'),
    (b'"text":"', b'"text":""'),
    (b'"reasoning_content":"', b'"reasoning_content":""'),
)


def stream_body(body: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The body sent to the neuron for a stream: model id, and usage always asked for (metrics need it)."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    return {**body, "model": model_id, "stream": True, "stream_options": options}


def event_data(event: bytes) -> bytes | None:
    """The `data:` payload of one event (multi-line data joined), or None for comments and blanks."""
    if event.startswith(b"data: ") and event.count(b"\n") == 2:
        return event[6:-2]  # the common case: one data line
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def carries_token(event: bytes) -> bool:
    """Whether a chunk carries generated output (so it counts for TTFT and inter-token latency)."""
    if b'"tool_calls":[' in event:
        return True
    return any(marker in event and empty not in event for marker, empty in _TEXT_MARKERS)


def usage_of(event: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(usage, parsed chunk) when the event carries a non-null usage, else (None, None)."""
    if b'"usage":' not in event or b'"usage":null' in event:
        return None, None
    data = event_data(event)
    if data is None:
        return None, None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, None
    usage = chunk.get("usage") if isinstance(chunk, dict) else None
    return (usage, chunk) if isinstance(usage, dict) else (None, None)


def without_usage(chunk: dict[str, Any]) -> bytes | None:
    """The event to forward to a client that did not ask for usage: None drops a usage-only chunk."""
    if not chunk.get("choices"):
        return None
    chunk = {k: v for k, v in chunk.items() if k != "usage"}
    return b"data: " + orjson.dumps(chunk) + EVENT_END


def interrupted(node: str, detail: str) -> ApiError:
    return ApiError(502, f"neuron '{node}' stopped mid-stream: {detail}", code="stream_interrupted")


def error_event(err: ApiError) -> bytes:
    """An OpenAI-style error as one SSE event: what a client sees when a started stream fails."""
    return b"data: " + orjson.dumps(err.openai_body()) + EVENT_END
