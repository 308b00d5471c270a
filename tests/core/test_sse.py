"""SSE framing of the dialect routes."""

from __future__ import annotations

from cortex.core.sse import encode_comment, encode_event, encode_events


def test_named_event_is_one_json_line() -> None:
    assert encode_event("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    # Newlines inside strings stay escaped: a data line is never split.
    assert encode_event("x", {"t": "a\nb"}) == b'event: x\ndata: {"t":"a\\nb"}\n\n'


def test_events_concatenate_in_order() -> None:
    assert encode_events([("a", {}), ("b", {})]) == b"event: a\ndata: {}\n\nevent: b\ndata: {}\n\n"
    assert encode_events([]) == b""


def test_comment() -> None:
    assert encode_comment() == b": keep-alive\n\n"
