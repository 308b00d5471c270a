"""Accounting: one request's measurements, its metrics and its `request.done` line, published once.

Every request that reaches a neuron (streamed or not, chat or token count, passed through or
translated) is accounted here the same way: a `RequestRecord` gathers the figures with plain
attribute writes while the request runs, the stream observer feeds it usage and token timing from
the raw events, and `Accounting.finish` publishes metrics and the access line once, just after
the answer went out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from cortex.core.errors import ApiError
from cortex.core.sse import event_data
from cortex.gateway.access_log import AccessLog, requested_name
from cortex.gateway.metrics import UNKNOWN_MODEL, Metrics, Series


def error_type(err: ApiError) -> str:
    """The `type` label of the errors counter: the code when there is one, else the OpenAI type."""
    return err.code or err.type


def carries_token(event: bytes) -> bool:
    """Whether a chunk carries generated output (so it counts for TTFT and inter-token latency)."""
    # Byte patterns, unrolled (this runs for every event): a field with a string value that is not empty.
    return (
        b'"tool_calls":[' in event
        or (b'"content":"' in event and b'"content":""' not in event)
        or (b'"text":"' in event and b'"text":""' not in event)
        or (b'"reasoning_content":"' in event and b'"reasoning_content":""' not in event)
    )


def usage_chunk(event: bytes) -> dict[str, Any] | None:
    """The parsed chunk when the event carries a non-null usage, else None (raw bytes looked at first)."""
    if b'"usage":' not in event or b'"usage":null' in event:
        return None
    data = event_data(event)
    if data is None:
        return None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict) else None


class RequestRecord:
    """One request's measurements, gathered cheaply while it runs and published once at the end."""

    __slots__ = (
        "completion_tokens",
        "ended",
        "error",
        "first_token",
        "gaps",
        "last_token",
        "metrics",
        "model",
        "node",
        "prompt_tokens",
        "requested",
        "started",
    )

    def __init__(self, metrics: Metrics, started: float | None = None, requested: Any = None) -> None:
        self.metrics = metrics
        self.requested = requested  # the client's `model`, as sent (logged when it resolves to none we serve)
        self.started = time.perf_counter() if started is None else started
        self.model = UNKNOWN_MODEL
        self.node = ""
        self.first_token: float | None = None
        self.last_token = 0.0
        self.gaps: list[float] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.error: str | None = None
        self.ended = 0.0

    def token(self, now: float) -> None:
        """A streamed event that carried generated text (called per event: attribute writes only)."""
        if self.first_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def fail(self, error_type: str) -> None:
        if self.error is None:
            self.error = error_type

    def end(self) -> None:
        """The request is over: stop its clock (publishing may happen a moment later)."""
        self.ended = time.perf_counter()

    def publish(self) -> float:
        """Turn the measurements into metric updates; returns the request's duration in seconds."""
        ended = self.ended or time.perf_counter()
        duration = ended - self.started
        m = self.metrics
        s = m.series(self.model, self.node)
        s.requests.inc()
        s.duration.observe(duration)
        if self.error is not None:
            m.errors.labels(self.model, self.node, self.error).inc()
        if self.prompt_tokens:
            s.prompt_tokens.inc(self.prompt_tokens)
        if self.completion_tokens:
            s.completion_tokens.inc(self.completion_tokens)
        self._publish_timing(s, ended)
        return duration

    def _publish_timing(self, s: Series, ended: float) -> None:
        if self.first_token is not None:
            s.ttft.observe(self.first_token - self.started)
            for gap in self.gaps:
                s.itl.observe(gap)
            decode_time = self.last_token - self.first_token
            # The first token's cost is prefill: rate = tokens after it over the time after it.
            if self.completion_tokens > 1 and decode_time > 0:
                s.tps.observe((self.completion_tokens - 1) / decode_time)
        elif self.completion_tokens and self.error is None:
            s.tps.observe(self.completion_tokens / max(ended - self.started, 1e-6))

    def observe(self, event: bytes, now: float) -> dict[str, Any] | None:
        """The stream observer: note usage and token timing from one raw event; returns a usage chunk, parsed."""
        chunk = usage_chunk(event)
        if chunk is not None:
            self.usage(chunk["usage"])
        if carries_token(event):
            self.token(now)
        return chunk


class Accounting:
    """Starts a record per request and publishes it once, after the answer is on its way."""

    def __init__(self, metrics: Metrics, access_log: AccessLog | None = None) -> None:
        self.metrics = metrics
        self.access_log = access_log or AccessLog()
        self.charge: Callable[[int], None] | None = None  # a finished request's tokens, to its key's limits

    def record(self, requested: Any = None) -> RequestRecord:
        """A record for a request that asked for model `requested`."""
        return RequestRecord(self.metrics, requested=requested)

    def finish(self, record: RequestRecord, route: str, status: int, *, stream: bool) -> None:
        """Stop the clock now; publish on the next event-loop iteration, after the handler returned."""
        record.end()
        if self.charge is not None:
            self.charge(record.prompt_tokens + record.completion_tokens)
        try:
            asyncio.get_running_loop().call_soon(self._publish, record, route, status, stream)
        except RuntimeError:  # no running loop (shutdown)
            self._publish(record, route, status, stream)

    def _publish(self, record: RequestRecord, route: str, status: int, stream: bool) -> None:
        duration = record.publish()
        if self.access_log.enabled():
            self.access_log.request_done(
                route,
                status,
                record.model if record.model != UNKNOWN_MODEL else requested_name(record.requested),
                record.node or "-",
                stream,
                duration,
                record.prompt_tokens,
                record.completion_tokens,
                record.error or "-",
            )
