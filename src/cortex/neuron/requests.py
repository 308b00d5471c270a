"""From an OpenAI request to a `Job`: what this neuron supports, the prompt, the budget, the sampling.

Rendering (chat template, tools) and tokenizing run on the neuron's one tokenizer thread: HF fast
tokenizers are not safe to share across threads mid-encode. The token budget has one rule,
`token_budget`: a prompt that fills the context is refused with the numbers clients act on; an
absurd `max_tokens` is clipped to what the context leaves, never refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cortex.core.errors import ApiError, bad_request
from cortex.core.logs import request_id_var
from cortex.core.openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from cortex.neuron.engine import LoadedModel, grammar
from cortex.neuron.engine.tools import tool_grammar
from cortex.neuron.engine.types import (
    EngineError,
    GenerationRequest,
    SamplingParams,
)
from cortex.neuron.lifecycle import Lifecycle, ModelSlot


@dataclass
class Job:
    """One request, mapped and ready to generate."""

    kind: str  # "chat" | "text"
    model_id: str
    slot: ModelSlot
    model: LoadedModel
    generation: GenerationRequest
    stream: bool
    include_usage: bool
    parse_tools: bool
    reasoning_in_content: bool  # the client sent `include_reasoning: true`: reasoning inline in `content`
    n: int = 1  # choices: n sequences from one prompt (they share its KV blocks through the prefix cache)
    budget: int | None = None  # tokens it may generate, as the engine's validate found (set once, before admission)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def token_budget(prompt_tokens: int, context: int, requested: int | None, param: str) -> int:
    """How many tokens a request may generate: what it asked for, at most what the context leaves."""
    if prompt_tokens >= context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens, but the prompt has {prompt_tokens} "
            "tokens; shorten the messages",
            param=param,
            code="context_length_exceeded",
            details={"prompt_tokens": prompt_tokens, "context_length": context},
        )
    remaining = context - prompt_tokens
    return min(requested or remaining, remaining)  # absurd max_tokens are clipped, not refused


class RequestMapper:
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

    async def chat_job(self, req: ChatCompletionRequest) -> Job:
        slot, model = self.lifecycle.ready(req.model)
        refuse_unsupported(req)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        prompt = await self._render_chat(model, req, with_tools=use_tools)
        job = self._job("chat", req, slot, model, prompt, req.requested_max_tokens(), parse_tools=use_tools)
        job.generation.constraint = chat_constraint(req, model, use_tools)
        return job

    async def text_job(self, req: CompletionRequest) -> Job:
        slot, model = self.lifecycle.ready(req.model)
        refuse_unsupported(req)
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
        if req.continue_final_message:  # the last assistant turn stays open: the model continues it
            return await self._on_tokenizer(
                model.render_chat, messages, tools, add_generation_prompt=False, continue_final_message=True
            )
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
        param = "messages" if kind == "chat" else "prompt"
        max_new = token_budget(len(prompt), model.info.context_length, requested, param)
        return Job(
            kind=kind,
            model_id=req.model,
            slot=slot,
            model=model,
            generation=GenerationRequest(request_id_var.get(), prompt, sampling_params(req, max_new, model)),
            stream=req.stream,
            include_usage=req.include_usage(),
            parse_tools=parse_tools,
            reasoning_in_content=bool(getattr(req, "include_reasoning", False)),
            n=req.n,
        )

    @staticmethod
    def generations(job: Job) -> list[GenerationRequest]:
        """One generation request per choice; a seeded request's choices get seeds seed, seed+1, ..."""
        first = job.generation
        out = [first]
        for index in range(1, job.n):
            seed = first.sampling.seed + index if first.sampling.seed is not None else None
            sampling = dataclasses.replace(first.sampling, seed=seed)
            out.append(dataclasses.replace(first, request_id=f"{first.request_id}/{index}", sampling=sampling))
        return out


MAX_CHOICES = 16


def refuse_unsupported(req: SamplingFields) -> None:
    if req.n > MAX_CHOICES:
        raise bad_request(f"n must be at most {MAX_CHOICES}", param="n")


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
