"""From engine events to OpenAI answers: a whole completion, or its stream of chunks.

Chat and text completions, streamed or not, come out of the same pieces: the finish reason, the
usage (prompt tokens served from the prefix cache included), the timings and the request log line.
"""

from __future__ import annotations

import logging
from typing import Any

from cortex.core.logs import log_event
from cortex.core.openai import usage_dict
from cortex.core.sse import encode_data
from cortex.neuron.engine.logprobs import TokenLogprob, completions_logprobs
from cortex.neuron.engine.types import (
    Finished,
    PlainText,
    ReasoningText,
    ToolCall,
)
from cortex.neuron.output import Logprobs, OutputEvent
from cortex.neuron.requests import Job

log = logging.getLogger("cortex.neuron.inference")


def log_done(job: Job, finished: Finished) -> None:
    log_event(
        log,
        "request.done",
        model=job.model_id,
        kind=job.kind,
        stream=job.stream,
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        finish=finished.reason,
        ttft_s=round(finished.time_to_first_token_s, 4),
        decode_tok_s=round(finished.decode_tok_s, 1),
    )


def finish_reason(finished: Finished, has_tool_calls: bool) -> str:
    if has_tool_calls:
        return "tool_calls"
    return "length" if finished.reason == "length" else "stop"


def timings(finished: Finished) -> dict[str, float]:
    return {
        "time_to_first_token_s": round(finished.time_to_first_token_s, 6),
        "decode_tok_s": round(finished.decode_tok_s, 2),
    }


def complete_body(
    job: Job, content: str, reasoning: str, calls: list[dict[str, Any]], finished: Finished
) -> dict[str, Any]:
    usage = usage_dict(finished.prompt_tokens, finished.completion_tokens, finished.cached_tokens)
    reason = finish_reason(finished, bool(calls))
    if job.kind == "text":
        choice: dict[str, Any] = {"index": 0, "text": content, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    else:
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion"
    if finished.stop_sequence is not None:
        choice["stop_sequence"] = finished.stop_sequence
    return {
        "id": job.id,
        "object": obj,
        "created": job.created,
        "model": job.model_id,
        "choices": [choice],
        "usage": usage,
        "timings": timings(finished),
    }


def logprobs_body(job: Job, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A choice's `logprobs`: Chat's {"content": [...]}, or the legacy Completions lists."""
    if job.kind == "text":
        return completions_logprobs(entries, offset)
    return {"content": [entry.openai() for entry in entries]}


class ChunkWriter:
    """Serialises output events as OpenAI stream chunks (chat or text completion)."""

    def __init__(self, job: Job, index: int = 0) -> None:
        self.job = job
        self.index = index  # the choice (n > 1)
        self.tool_calls = 0
        self._text_offset = 0  # Completions logprobs count text offsets across chunks
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        self._head = {"id": job.id, "object": obj, "created": job.created, "model": job.model_id}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        if self.job.kind == "text":
            choice = {"index": self.index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish}
        choice.update(extra)
        return encode_data({**self._head, "choices": [choice]})

    def first(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""}) if self.job.kind == "chat" else b""

    def event(self, event: OutputEvent) -> bytes:
        if isinstance(event, Logprobs):
            body = logprobs_body(self.job, list(event.entries), self._text_offset)
            self._text_offset += sum(len(e.text) for e in event.entries)
            return self._chunk({}, logprobs=body)
        if isinstance(event, PlainText):
            return self._chunk({"content": event.text})
        if isinstance(event, ReasoningText):
            key = "content" if self.job.reasoning_in_content else "reasoning_content"
            return self._chunk({key: event.text})
        if isinstance(event, ToolCall):
            self.tool_calls += 1
            return self._chunk({"tool_calls": [{"index": self.tool_calls - 1, **event.call}]})
        return self._last(event)

    def _last(self, finished: Finished) -> bytes:
        extra = {"stop_sequence": finished.stop_sequence} if finished.stop_sequence is not None else {}
        out = self._chunk({}, finish_reason(finished, self.tool_calls > 0), **extra)
        if self.job.include_usage and self.job.n == 1:
            out += self.usage([finished])
        log_done(self.job, finished)
        return out

    def usage(self, finishes: list[Finished]) -> bytes:
        """The closing usage chunk: the prompt once, the completions of every choice."""
        body = {**self._head, "choices": [], "usage": choices_usage(finishes), "timings": timings(finishes[0])}
        return encode_data(body)


def choices_usage(finishes: list[Finished]) -> dict[str, Any]:
    first = finishes[0]
    return usage_dict(first.prompt_tokens, sum(f.completion_tokens for f in finishes), first.cached_tokens)
