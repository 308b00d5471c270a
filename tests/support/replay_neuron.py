"""A scripted upstream for SDK tests: OpenAI chat chunks in, translated dialect out.

`ReplayServer` is a tiny aiohttp app serving `/v1/messages` and `/v1/responses` that runs the real
translators over a scripted list of OpenAI chat chunks, so the official SDKs parse exactly what
our code emits, over real HTTP and SSE. It records the chat bodies the translators produced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from cortex.core.errors import ApiError
from cortex.core.sse import SseEvent, encode_event
from cortex.gateway.dialects.anthropic.reply import to_anthropic_message
from cortex.gateway.dialects.anthropic.request import parse_messages_request
from cortex.gateway.dialects.anthropic.stream import AnthropicStream, error_event, ping_event
from cortex.gateway.dialects.anthropic.to_chat import to_chat_request as anthropic_to_chat
from cortex.gateway.dialects.responses.reply import to_response
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.stream import ResponsesStream
from cortex.gateway.dialects.responses.to_chat import to_chat_request as responses_to_chat


def chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-r",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "neuron-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}],
    }


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {
        "id": "chatcmpl-r",
        "object": "chat.completion.chunk",
        "model": "neuron-model",
        "choices": [],
        "usage": usage,
    }


def tool_call_chunks(index: int, call_id: str, name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """One tool call in three pieces: id and name, then the arguments in two halves."""
    text = json.dumps(arguments)
    half = len(text) // 2
    head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    return [
        chunk({"tool_calls": [head]}),
        chunk({"tool_calls": [{"index": index, "function": {"arguments": text[:half]}}]}),
        chunk({"tool_calls": [{"index": index, "function": {"arguments": text[half:]}}]}),
    ]


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streaming completion the same generation would have produced."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    calls: dict[int, dict[str, Any]] = {}
    choice: dict[str, Any] = {"index": 0, "finish_reason": None}
    usage: dict[str, Any] = {}
    for item in chunks:
        usage = item.get("usage") or usage
        for part in item.get("choices") or []:
            delta = part.get("delta") or {}
            message["content"] += delta.get("content") or ""
            if delta.get("reasoning_content"):
                message["reasoning_content"] = message.get("reasoning_content", "") + delta["reasoning_content"]
            for fragment in delta.get("tool_calls") or []:
                call = calls.setdefault(fragment["index"], {"type": "function", "function": {"arguments": ""}})
                call["id"] = fragment.get("id") or call.get("id")
                function = fragment.get("function") or {}
                call["function"]["name"] = function.get("name") or call["function"].get("name")
                call["function"]["arguments"] += function.get("arguments") or ""
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]
                if "stop_sequence" in part:
                    choice["stop_sequence"] = part["stop_sequence"]
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
        message["content"] = message["content"] or None
    choice["message"] = message
    return {
        "id": "chatcmpl-r",
        "object": "chat.completion",
        "model": "neuron-model",
        "choices": [choice],
        "usage": usage,
    }


@dataclass
class Script:
    chunks: list[dict[str, Any]]
    pings: bool = False  # Anthropic only: a ping before every event
    fail_after: int | None = None  # an error after this many chunks
    error: ApiError | None = None  # refuse the request outright


@dataclass
class ReplayServer:
    script: Script = field(default_factory=lambda: Script([]))
    chat_bodies: list[dict[str, Any]] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url(""))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/responses", self._responses)
        self.server = TestServer(app)
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def _take(self, request: web.Request, parse: Any, to_chat: Any) -> Any:
        """The request parsed and its chat translation recorded; then the script's error, if it has one."""
        req = parse(await request.json())
        self.chat_bodies.append(to_chat(req))
        if self.script.error is not None:
            raise self.script.error
        return req

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._take(request, parse_messages_request, anthropic_to_chat)
        except ApiError as exc:
            return web.json_response(exc.anthropic_body(), status=exc.status)
        if not req.stream:
            return web.json_response(
                to_anthropic_message(assemble(self.script.chunks), model=req.model, thinking=req.wants_thinking())
            )
        stream = AnthropicStream(req.model, thinking=req.wants_thinking())
        fail = lambda e: [error_event(e)]  # noqa: E731
        return await self._replay(request, stream.start, stream.feed, stream.finish, fail, pings=self.script.pings)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._take(request, parse_responses_request, responses_to_chat)
        except ApiError as exc:
            return web.json_response(exc.openai_body(), status=exc.status)
        if not req.stream:
            return web.json_response(to_response(assemble(self.script.chunks), req))
        stream = ResponsesStream(req)
        return await self._replay(request, stream.start, stream.feed, stream.finish, stream.fail, pings=False)

    async def _replay(
        self, request: web.Request, start: Any, feed: Any, finish: Any, fail: Any, *, pings: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(events: list[SseEvent]) -> None:
            for name, data in events:
                if pings:
                    await response.write(encode_event(*ping_event()))
                await response.write(encode_event(name, data))

        await send(start())
        for position, item in enumerate(self.script.chunks):
            if self.script.fail_after == position:
                await send(fail(ApiError(503, "The model's server went away", code="upstream_gone")))
                return response
            await send(feed(item))
        await send(finish())
        return response
