"""Failover: which failures of a neuron a request survives, and how the relay ends a request early.

A request that has sent its client no output yet is retried once when its neuron fails
(`retriable`: a device fault, a recovery, a drain or shutdown, a connection cut; never a 4xx, never
a second time). For a stream, "no output" means nothing past the chat's opening chunk
(`opening_chunk`) and keep-alive comments; an error event before then (`error_event`) is such a
failure. docs/reliability.md, "Failover", says what happens on each fault.

`Cuttable` is a request in flight that the relay can end early, when the drain runs out (never
retried) or when the poller loses its node (retried if it had no output): cancelled while it has
sent nothing, its neuron connection closed once it streams.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from cortex.core.errors import ApiError
from cortex.core.logs import log_event
from cortex.gateway.accounting import RequestRecord
from cortex.gateway.upstream import upstream_error

log = logging.getLogger("cortex.gateway.relay")

# A neuron's failures before a request produced output: another replica (or the recovered one) may serve it.
RETRIABLE_CODES = frozenset(
    {"model_poisoned", "model_recovering", "draining", "shutting_down", "stream_interrupted", "upstream_unreachable"}
)


def retriable(err: ApiError) -> bool:
    """A failure of the neuron, not of the request: never a 4xx (bad input stays bad), never a timeout."""
    return err.status >= 500 and err.code in RETRIABLE_CODES


def retriable_reply(status: int, raw: bytes, headers: Any) -> ApiError | None:
    """A whole answer that is a neuron failure worth one retry (a device fault, a recovery, a shutdown)."""
    if status != 503:
        return None
    err = upstream_error(status, raw, headers)
    return err if retriable(err) else None


def retry_from(record: RequestRecord, failure: ApiError) -> tuple[str, str]:
    """Log the one retry of a request that failed on its node before any output; (node, why) for Upstream.open."""
    node = record.node or "-"
    log_event(log, "upstream.retry", logging.WARNING, node=node, error=failure.code, reason=failure.message[:200])
    return node, f"neuron '{node}' failed before answering: {failure.message}"


def error_event(data: bytes) -> ApiError | None:
    """The error an OpenAI stream event carries (a neuron's fault mid-stream), with the status it stands for."""
    chunk = _json_object(data, b'"error"')
    if chunk is None or "error" not in chunk or "choices" in chunk:
        return None
    error = chunk["error"] if isinstance(chunk["error"], dict) else {}
    status = _EVENT_STATUS.get(str(error.get("type")), 502)
    if error.get("code") in RETRIABLE_CODES:
        status = 503
    return upstream_error(status, data, None)


_EVENT_STATUS = {"invalid_request_error": 400, "rate_limit_error": 429, "not_found_error": 404}


def opening_chunk(data: bytes) -> bool:
    """Whether a chunk is a chat stream's opening (the assistant role, no text): not output yet."""
    chunk = _json_object(data, b'"role":"assistant"')
    if chunk is None:
        return False
    choices = chunk.get("choices")
    if not choices or chunk.get("usage"):
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None or choice.get("logprobs"):
            return False
        delta = choice.get("delta")
        if not isinstance(delta, dict) or any(value for key, value in delta.items() if key != "role"):
            return False
    return True


def _json_object(data: bytes, marker: bytes) -> dict[str, Any] | None:
    """A stream event's JSON object; None without `marker` (checked before parsing: most events lack it), or
    when the event is not a JSON object."""
    if marker not in data:
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class Cuttable:
    """A request the relay can end early: with `err` as its error, retried (`retry`) when no output went out."""

    record: RequestRecord
    last_read: float  # perf_counter of the last bytes heard from the neuron (the request's start at first)
    cut_error: ApiError | None = None
    retry: bool = False

    def cut(self, err: ApiError, *, retry: bool) -> None:
        raise NotImplementedError

    def unheard(self) -> bool:
        """Whether nothing came from the neuron yet (a whole answer arrives at once: never before its end)."""
        return self.last_read == self.record.started

    def cancelled(self) -> ApiError:
        """The cut's error when the cancellation being handled is the cut's; re-raises any other."""
        err, task = self.cut_error, asyncio.current_task()
        if err is None or task is None or task.uncancel() > 0:
            raise asyncio.CancelledError
        self.cut_error = None  # a retry can be cut again
        return err


class LiveFetch(Cuttable):
    """A whole-answer request in flight: nothing reached its client, so a cut cancels the wait."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.last_read = record.started
        self.task = asyncio.current_task()

    def cut(self, err: ApiError, *, retry: bool) -> None:
        # Its own task cutting it (a probe it awaits found the node lost) is already handling that failure.
        if self.cut_error is None and self.task is not None and self.task is not asyncio.current_task():
            self.cut_error, self.retry = err, retry
            self.task.cancel()
