"""OpenAI chat and text completions on a loaded model: validate, render, admit, generate, reply.

Rendering and token counting run on the neuron's tokenizer thread; generation runs on the
device worker behind `LoadedModel.generate`; this module only moves events to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from cortex.core.errors import ApiError, bad_request
from cortex.core.logs import log_event, request_id_var
from cortex.core.openai import ChatCompletionRequest, CompletionRequest, SamplingFields, usage_dict
from cortex.neuron.engine import LoadedModel, grammar
from cortex.neuron.engine.logprobs import TokenLogprob, completions_logprobs
from cortex.neuron.engine.tools import tool_grammar
from cortex.neuron.engine.types import (
    DeviceFault,
    EngineError,
    Finished,
    GenerationRequest,
    PlainText,
    ReasoningText,
    SamplingParams,
    ToolCall,
)
from cortex.neuron.lifecycle import Lifecycle, ModelSlot
from cortex.neuron.output import Logprobs, OutputEvent, split_output

log = logging.getLogger("cortex.neuron.inference")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Job:
    """One validated request, ready to generate."""

    kind: str  # "chat" | "text"
    model_id: str
    slot: ModelSlot
    model: LoadedModel
    generation: GenerationRequest
    stream: bool
    include_usage: bool
    parse_tools: bool
    include_reasoning: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


class Inference:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        # HF fast tokenizers are not safe to share across threads mid-encode: one thread renders.
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    async def _on_tokenizer(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenizer_pool, lambda: fn(*args, **kwargs))
        except EngineError as exc:
            raise bad_request(str(exc), param="messages") from None

    # --- request → job -----------------------------------------------------------------------

    async def chat_job(self, req: ChatCompletionRequest) -> Job:
        slot, model = self.lifecycle.ready(req.model)
        _refuse_unsupported(req)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        prompt = await self._render_chat(model, req, with_tools=use_tools)
        job = self._job("chat", req, slot, model, prompt, req.requested_max_tokens(), parse_tools=use_tools)
        job.generation.constraint = chat_constraint(req, model, use_tools)
        return job

    async def text_job(self, req: CompletionRequest) -> Job:
        slot, model = self.lifecycle.ready(req.model)
        _refuse_unsupported(req)
        if req.echo or req.suffix:
            raise bad_request("echo and suffix are not supported", param="echo" if req.echo else "suffix")
        prompt = await self._text_prompt(model, req.prompt)
        job = self._job("text", req, slot, model, prompt, req.max_tokens, parse_tools=False)
        job.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        return job

    async def count_chat_tokens(self, req: ChatCompletionRequest) -> int:
        _, model = self.lifecycle.ready(req.model)
        return len(await self._render_chat(model, req, with_tools=bool(req.tools)))

    async def _render_chat(self, model: LoadedModel, req: ChatCompletionRequest, *, with_tools: bool) -> list[int]:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if with_tools else None
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        return await self._on_tokenizer(model.render_chat, messages, tools)

    async def _text_prompt(self, model: LoadedModel, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return await self._on_tokenizer(model.encode, prompt)
        if all(isinstance(p, int) for p in prompt):
            return list(prompt)  # type: ignore[arg-type]
        if len(prompt) == 1:
            return await self._on_tokenizer(model.encode, prompt[0])
        raise bad_request("one prompt per request: batched prompts are not supported", param="prompt")

    def _job(
        self,
        kind: str,
        req: SamplingFields,
        slot: ModelSlot,
        model: LoadedModel,
        prompt: list[int],
        requested: int | None,
        *,
        parse_tools: bool,
    ) -> Job:
        context = model.info.context_length
        if len(prompt) >= context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has {len(prompt)} "
                "tokens; shorten the messages",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
                details={"prompt_tokens": len(prompt), "context_length": context},
            )
        remaining = context - len(prompt)
        max_new = min(requested or remaining, remaining)  # absurd max_tokens are clipped, not refused
        include_reasoning = bool(getattr(req, "include_reasoning", False))
        return Job(
            kind=kind,
            model_id=req.model,
            slot=slot,
            model=model,
            generation=GenerationRequest(request_id_var.get(), prompt, sampling_params(req, max_new, model)),
            stream=req.stream,
            include_usage=req.include_usage(),
            parse_tools=parse_tools,
            include_reasoning=include_reasoning,
        )

    # --- job → reply -------------------------------------------------------------------------

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
                    (content if job.include_reasoning else reasoning).append(event.text)
                elif isinstance(event, ToolCall):
                    calls.append(event.call)
                else:
                    finished = event
        assert finished is not None
        _log_done(job, finished)
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
            await _write_quietly(response, sse(exc.openai_body()) + b"data: [DONE]\n\n")
            return response
        except ConnectionResetError:
            log_event(log, "request.client_gone", model=job.model_id)
            return response
        finally:
            await events.aclose()
        await _write_quietly(response, b"data: [DONE]\n\n")
        return response


def _refuse_unsupported(req: SamplingFields) -> None:
    if req.n != 1:
        raise bad_request("n > 1 is not supported: send one request per completion", param="n")


def chat_constraint(req: ChatCompletionRequest, model: LoadedModel, use_tools: bool) -> grammar.Grammar | None:
    """The grammar a chat request decodes under: a forced tool call, a response_format schema, or valid calls."""
    try:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if use_tools else None
        calls = tool_grammar(
            tools, req.tool_choice or "auto", model.info.tool_call_format, parallel=req.parallel_tool_calls is not False
        )
    except EngineError as exc:
        raise bad_request(str(exc), param="tool_choice") from None
    forced = calls is not None and req.tool_choice not in (None, "auto")
    fmt = req.response_format
    if forced or fmt is None or fmt.type == "text":
        return calls
    if fmt.type == "json_object":
        return None  # SamplingParams.json_object: the engine's JSON-mode grammar
    spec = fmt.json_schema or {}
    if "schema" not in spec:
        raise bad_request("response_format json_schema needs json_schema.schema", param="response_format")
    try:
        return grammar.json_schema(spec["schema"], strict=bool(spec.get("strict")), label="response_format json_schema")
    except EngineError as exc:
        raise bad_request(str(exc), param="response_format") from None


def requested_logprobs(req: SamplingFields) -> int | None:
    """How many alternatives per token the request wants (Chat: logprobs + top_logprobs; Completions: logprobs)."""
    top = getattr(req, "top_logprobs", None)
    if isinstance(req, ChatCompletionRequest):
        if not req.logprobs:
            if top:
                raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")
            return None
        return top or 0
    if req.logprobs is None or req.logprobs is False:
        return None
    return int(req.logprobs)


def sampling_params(req: SamplingFields, max_new_tokens: int, model: LoadedModel) -> SamplingParams:
    defaults = model.sampling_defaults()
    temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=req.top_p if req.top_p is not None else defaults.get("top_p", 1.0),
        top_k=req.top_k if req.top_k is not None else defaults.get("top_k", 0),
        min_p=req.min_p or 0.0,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty or 1.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        stop=tuple(req.stop_list()),
        json_object=wants_json_object(req),
        logprobs=requested_logprobs(req),
    )


def wants_json_object(req: SamplingFields) -> bool:
    fmt = getattr(req, "response_format", None)
    return fmt is not None and fmt.type == "json_object"


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


def _log_done(job: Job, finished: Finished) -> None:
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
    usage = usage_dict(finished.prompt_tokens, finished.completion_tokens)
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


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChunkWriter:
    """Serialises output events as OpenAI stream chunks (chat or text completion)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.tool_calls = 0
        self._text_offset = 0  # Completions logprobs count text offsets across chunks
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        self._head = {"id": job.id, "object": obj, "created": job.created, "model": job.model_id}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        if self.job.kind == "text":
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        choice.update(extra)
        return sse({**self._head, "choices": [choice]})

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
            key = "content" if self.job.include_reasoning else "reasoning_content"
            return self._chunk({key: event.text})
        if isinstance(event, ToolCall):
            self.tool_calls += 1
            return self._chunk({"tool_calls": [{"index": self.tool_calls - 1, **event.call}]})
        return self._last(event)

    def _last(self, finished: Finished) -> bytes:
        extra = {"stop_sequence": finished.stop_sequence} if finished.stop_sequence is not None else {}
        out = self._chunk({}, finish_reason(finished, self.tool_calls > 0), **extra)
        if self.job.include_usage:
            usage = usage_dict(finished.prompt_tokens, finished.completion_tokens)
            out += sse({**self._head, "choices": [], "usage": usage, "timings": timings(finished)})
        _log_done(self.job, finished)
        return out
