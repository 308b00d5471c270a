"""OpenAI chat and text completions on a loaded model: admit, generate, answer.

A request arrives here mapped (requests.py) and leaves rendered (replies.py); this module runs it:
validates it with the engine before anything is sent, holds an admission slot while it generates
on the device worker (`LoadedModel.generate`), turns a device fault into a 503 for this request
(and poisons the model for recovery), and moves events to the client.

`n > 1`: the first choice starts alone; the others start once it has produced output, so their
prompt's KV blocks come from the prefix cache instead of being computed n times.

A stream sends an SSE comment every `stream_keepalive_s` until its first output (a long prompt's
prefill), so no proxy, and not the gateway's `stream_idle_timeout_s`, takes the silence for a dead
connection; once output flows, a silent gap means trouble again. When the drain on SIGTERM runs
out, `cut_all` ends what still runs with a 503 `shutting_down`: an error event and `[DONE]` for a
stream (the gateway retries it elsewhere when it had no output yet), never a bare close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from cortex.core.errors import ApiError, bad_request
from cortex.core.logs import log_event
from cortex.core.sse import DONE, KEEPALIVE, SSE_HEADERS, encode_data
from cortex.neuron.engine.grammar import validate_off_loop
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
from cortex.neuron.replies import ChunkWriter, choices_usage, complete_body, log_done, logprobs_body
from cortex.neuron.requests import Job, RequestMapper

log = logging.getLogger("cortex.neuron.inference")


# Until a stream's first output: an SSE comment this often (neuron.toml `stream_keepalive_s`).
DEFAULT_KEEPALIVE_S = 5.0


def shutting_down() -> ApiError:
    return ApiError(503, "the neuron shut down before the answer was complete; retry", code="shutting_down")


class Inference:
    def __init__(self, lifecycle: Lifecycle, keepalive_s: float = DEFAULT_KEEPALIVE_S) -> None:
        self.lifecycle = lifecycle
        self.keepalive_s = keepalive_s
        self._running: set[asyncio.Task[Any]] = set()  # the handlers of requests in flight, for `cut_all`
        self._cutting = False

    def cut_all(self) -> int:
        """End every request in flight with 503 `shutting_down` (the drain ran out); how many there were."""
        self._cutting = True
        for task in self._running:
            task.cancel()
        return len(self._running)

    def _cut(self) -> bool:
        """Whether the cancellation being handled is `cut_all`'s (then it is taken back)."""
        task = asyncio.current_task()
        return self._cutting and task is not None and task.uncancel() == 0

    async def run(self, job: Job, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            async with _fault_guard(self.lifecycle, job):
                # Once: the engine does not check it again. A grammar compiles on a thread, off this loop.
                job.budget = await validate_off_loop(job.model.validate, job.generation)
            async with job.slot.admission.slot():
                job.slot.last_used = time.time()
                if job.stream:
                    return await self._stream(job, request)
                return await self._complete(job)
        except asyncio.CancelledError:
            if self._cut():
                raise shutting_down() from None
            raise
        finally:
            self._running.discard(task)  # type: ignore[arg-type]

    def _events(self, job: Job) -> AsyncIterator[tuple[int, OutputEvent]]:
        return choice_events(job)

    async def _complete(self, job: Job) -> web.Response:
        choices = [_Choice() for _ in range(job.n)]
        events = self._events(job)
        try:
            async with _fault_guard(self.lifecycle, job):
                async for index, event in events:
                    choices[index].add(event, job.reasoning_in_content)
        finally:
            await events.aclose()
        bodies = []
        for choice in choices:
            assert choice.finished is not None
            log_done(job, choice.finished)
            body = complete_body(job, "".join(choice.content), "".join(choice.reasoning), choice.calls, choice.finished)
            if job.generation.sampling.logprobs is not None:
                body["choices"][0]["logprobs"] = logprobs_body(job, choice.logprobs)
            bodies.append(body)
        body = bodies[0]
        if job.n > 1:
            body["choices"] = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
            body["usage"] = choices_usage([c.finished for c in choices if c.finished is not None])
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(self, job: Job, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        writers = [ChunkWriter(job, index) for index in range(job.n)]
        finishes: list[Finished] = []
        events = self._events(job)
        try:
            async with _fault_guard(self.lifecycle, job):
                await response.write(b"".join(w.first() for w in writers))
                first = await self._first_event(events, response)
                if first is not None:
                    index, event = first
                    await response.write(writers[index].event(event))
                    if isinstance(event, Finished):
                        finishes.append(event)
                    async for index, event in events:
                        await response.write(writers[index].event(event))
                        if isinstance(event, Finished):
                            finishes.append(event)
                if job.n > 1 and job.include_usage:
                    await response.write(writers[0].usage(finishes))
        except ApiError as exc:  # fault mid-stream: the client gets an error event, then the end
            await _write_quietly(response, encode_data(exc.openai_body()) + DONE)
            return response
        except asyncio.CancelledError:
            if not self._cut():
                raise
            await _write_quietly(response, encode_data(shutting_down().openai_body()) + DONE)
            return response
        except ConnectionResetError:
            log_event(log, "request.client_gone", model=job.model_id)
            return response
        finally:
            await events.aclose()
        await _write_quietly(response, DONE)
        return response

    async def _first_event(
        self, events: AsyncIterator[tuple[int, OutputEvent]], response: web.StreamResponse
    ) -> tuple[int, OutputEvent] | None:
        """The stream's first event (None: it ended), with a keep-alive comment every `keepalive_s` until then.

        Only the wait for the first output is timed this way: later events come from the same
        iterator directly, as a timer per token would cost more than it says.
        """
        step: asyncio.Future[tuple[int, OutputEvent]] = asyncio.ensure_future(anext(events))
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=self.keepalive_s)
                if done:
                    try:
                        return step.result()
                    except StopAsyncIteration:
                        return None
                await response.write(KEEPALIVE)
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await step


class _Choice:
    """One choice of a non-streamed completion, as its events arrive."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.logprobs: list[TokenLogprob] = []
        self.finished: Finished | None = None

    def add(self, event: OutputEvent, reasoning_in_content: bool) -> None:
        if isinstance(event, Logprobs):
            self.logprobs.extend(event.entries)
        elif isinstance(event, PlainText):
            self.content.append(event.text)
        elif isinstance(event, ReasoningText):
            (self.content if reasoning_in_content else self.reasoning).append(event.text)
        elif isinstance(event, ToolCall):
            self.calls.append(event.call)
        else:
            self.finished = event


async def choice_events(job: Job) -> AsyncIterator[tuple[int, OutputEvent]]:
    """Every choice's events, tagged with its index, as they come. Closing it cancels every sequence."""
    if job.n == 1:
        stream = split_output(job.model, job.generation, parse_tools=job.parse_tools, budget=job.budget)
        try:
            async for event in stream:
                yield 0, event
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue[tuple[int, OutputEvent | BaseException | None]] = asyncio.Queue()
    first_output = asyncio.Event()

    async def pump(index: int, generation: Any) -> None:
        stream = None
        try:
            if index:
                await first_output.wait()  # the prompt's blocks are cached by now: this choice reuses them
            stream = split_output(job.model, generation, parse_tools=job.parse_tools, budget=job.budget)
            async for event in stream:
                first_output.set()
                await queue.put((index, event))
            await queue.put((index, None))
        except Exception as exc:  # handed to the consumer, which raises it (and so cancels the others)
            first_output.set()
            await queue.put((index, exc))
        finally:
            if stream is not None:
                await stream.aclose()

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(RequestMapper.generations(job))]
    try:
        done = 0
        while done < job.n:
            index, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
