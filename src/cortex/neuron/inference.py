"""OpenAI chat and text completions on a loaded model: admit, generate, answer.

A request arrives here mapped (requests.py) and leaves rendered (replies.py); this module runs it:
validates it with the engine before anything is sent, holds an admission slot while it generates
on the device worker (`LoadedModel.generate`), turns a device fault into a 503 for this request
(and poisons the model for recovery), and moves events to the client.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from cortex.core.errors import ApiError, bad_request
from cortex.core.logs import log_event
from cortex.core.sse import DONE, SSE_HEADERS, encode_data
from cortex.neuron.engine.logprobs import TokenLogprob
from cortex.neuron.engine.types import (
    DeviceFault,
    EngineError,
    Finished,
    PlainText,
    ReasoningText,
    ToolCall,
)
from cortex.neuron.lifecycle import Lifecycle
from cortex.neuron.output import Logprobs, OutputEvent, split_output
from cortex.neuron.replies import ChunkWriter, complete_body, log_done, logprobs_body
from cortex.neuron.requests import Job

log = logging.getLogger("cortex.neuron.inference")


class Inference:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    async def run(self, job: Job, request: web.Request) -> web.StreamResponse:
        async with _fault_guard(self.lifecycle, job):
            job.model.validate(job.generation)
        async with job.slot.admission.slot():
            job.slot.last_used = time.time()
            if job.stream:
                return await self._stream(job, request)
            return await self._complete(job)

    def _events(self, job: Job) -> AsyncIterator[OutputEvent]:
        return split_output(job.model, job.generation, parse_tools=job.parse_tools)

    async def _complete(self, job: Job) -> web.Response:
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        logprobs: list[TokenLogprob] = []
        finished: Finished | None = None
        async with _fault_guard(self.lifecycle, job):
            async for event in self._events(job):
                if isinstance(event, Logprobs):
                    logprobs.extend(event.entries)
                elif isinstance(event, PlainText):
                    content.append(event.text)
                elif isinstance(event, ReasoningText):
                    (content if job.reasoning_in_content else reasoning).append(event.text)
                elif isinstance(event, ToolCall):
                    calls.append(event.call)
                else:
                    finished = event
        assert finished is not None
        log_done(job, finished)
        body = complete_body(job, "".join(content), "".join(reasoning), calls, finished)
        if job.generation.sampling.logprobs is not None:
            body["choices"][0]["logprobs"] = logprobs_body(job, logprobs)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(self, job: Job, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        chunks = ChunkWriter(job)
        events = self._events(job)
        try:
            async with _fault_guard(self.lifecycle, job):
                await response.write(chunks.first())
                async for event in events:
                    await response.write(chunks.event(event))
        except ApiError as exc:  # fault mid-stream: the client gets an error event, then the end
            await _write_quietly(response, encode_data(exc.openai_body()) + DONE)
            return response
        except ConnectionResetError:
            log_event(log, "request.client_gone", model=job.model_id)
            return response
        finally:
            await events.aclose()
        await _write_quietly(response, DONE)
        return response


@contextlib.asynccontextmanager
async def _fault_guard(lifecycle: Lifecycle, job: Job) -> AsyncIterator[None]:
    """A device fault poisons the model and becomes a 503 for this request; a bad request stays a 400."""
    try:
        yield
    except DeviceFault as exc:
        lifecycle.poison(job.slot, str(exc) or "device fault")
        raise ApiError(
            503,
            f"Model '{job.model_id}' hit a device fault during generation and is being reloaded",
            code="model_poisoned",
            retry_after=10,
        ) from None
    except EngineError as exc:
        raise bad_request(str(exc)) from None


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionResetError):
        await response.write(data)
