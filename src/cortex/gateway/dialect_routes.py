"""The Anthropic and OpenAI Responses dialects: `POST /v1/messages`, `/v1/messages/count_tokens`,
`/v1/responses`.

Each route parses its dialect, translates to an OpenAI chat body (core/translate_*), sends it
through `Upstream` (routing, cold loads, metrics), and translates the reply back. Every failure is
answered in the route's own dialect: Anthropic's error envelope and types on `/v1/messages` (an
`error` event once a stream has started), OpenAI's on `/v1/responses` (`error` and
`response.failed` events mid-stream).

A stream starts (headers, `message_start` / `response.created`) as soon as there is something to
say: the first chunk, or the first keep-alive while a cold load runs. While nothing arrives,
whether the model is loading or generating unseen output (reasoning a client did not ask for, a
long tool call), Anthropic streams get `ping` events and Responses streams SSE comments, every
`gateway.keepalive_interval_s`, so no client or proxy times the stream out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from cortex.core.anthropic import parse_count_tokens_request, parse_messages_request
from cortex.core.errors import ApiError
from cortex.core.responses import parse_responses_request
from cortex.core.sse import SseEvent, encode_comment, encode_events
from cortex.core.translate_anthropic import AnthropicStream, error_event, ping_event, to_anthropic_message
from cortex.core.translate_anthropic import to_chat_request as anthropic_chat_body
from cortex.core.translate_responses import ResponsesStream, to_response
from cortex.core.translate_responses import to_chat_request as responses_chat_body
from cortex.gateway import wire
from cortex.gateway.keys import GATEWAY
from cortex.gateway.upstream import Upstream, upstream_of

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
RESPONSES = "/v1/responses"

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

log = logging.getLogger("cortex.gateway.dialects")

ErrorRenderer = Callable[[ApiError, str], web.Response]
Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def register(app: web.Application) -> None:
    # Routes match the path only, so Claude Code's `/v1/messages?beta=true` lands here too.
    app.router.add_post(MESSAGES, messages)
    app.router.add_post(COUNT_TOKENS, count_tokens)
    app.router.add_post(RESPONSES, responses)


def internal_error() -> ApiError:
    return ApiError(500, "internal error in the gateway; see its log", code="internal_error")


def answers_in(render: ErrorRenderer) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Every failure of the handler, expected or not, answered in the route's own dialect."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            rid = wire.request_id(request)
            try:
                upstream_of(request).check_client_key(request)
                return await handler(request, rid)
            except ApiError as err:
                return render(err, rid)
            except ConnectionError:
                raise  # the client went away: nobody to answer
            except Exception:
                log.exception("dialect route failed: %s %s", request.method, request.path)
                return render(internal_error(), rid)

        return guarded

    return wrap


# ---------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------


@answers_in(wire.anthropic_error)
async def messages(request: web.Request, rid: str) -> web.StreamResponse:
    payload, _ = await wire.read_json(request)
    req = parse_messages_request(payload)
    body = anthropic_chat_body(req)
    up = upstream_of(request)
    if req.stream:
        stream = AnthropicStream(req.model, thinking=req.wants_thinking())
        relay = _Relay(request, rid, stream.start, [ping_event()], lambda err: [error_event(err)])
        return await relay.run(up, body, MESSAGES, stream.feed, stream.finish, wire.anthropic_error)
    reply = await up.chat(body, request_id=rid, route=MESSAGES)
    message = to_anthropic_message(reply, model=req.model, thinking=req.wants_thinking())
    return wire.json_response(message, headers={wire.REQUEST_ID: rid})


@answers_in(wire.anthropic_error)
async def count_tokens(request: web.Request, rid: str) -> web.StreamResponse:
    """Counted by the neuron with the model's own tokenizer and chat template (tools included)."""
    payload, _ = await wire.read_json(request)
    req = parse_count_tokens_request(payload)
    counted = await upstream_of(request).post(req.model, "/v1/chat/tokenize", anthropic_chat_body(req), request_id=rid)
    if not isinstance(counted, dict) or not isinstance(counted.get("prompt_tokens"), int):
        raise ApiError(502, "the model's server did not return a token count", code="bad_upstream_reply")
    return wire.json_response({"input_tokens": counted["prompt_tokens"]}, headers={wire.REQUEST_ID: rid})


# ---------------------------------------------------------------------------------------------
# OpenAI Responses
# ---------------------------------------------------------------------------------------------


@answers_in(wire.openai_error)
async def responses(request: web.Request, rid: str) -> web.StreamResponse:
    payload, _ = await wire.read_json(request)
    req = parse_responses_request(payload)
    body = responses_chat_body(req)
    up = upstream_of(request)
    if req.stream:
        stream = ResponsesStream(req)
        relay = _Relay(request, rid, stream.start, [], stream.fail)
        return await relay.run(up, body, RESPONSES, stream.feed, stream.finish, wire.openai_error)
    reply = await up.chat(body, request_id=rid, route=RESPONSES)
    return wire.json_response(to_response(reply, req), headers={wire.REQUEST_ID: rid})


# ---------------------------------------------------------------------------------------------
# Streaming, for both dialects
# ---------------------------------------------------------------------------------------------


class _Relay:
    """One translated stream: start on first need, keep alive while idle, fail in the dialect."""

    def __init__(
        self,
        request: web.Request,
        rid: str,
        start: Callable[[], list[SseEvent]],
        idle_events: list[SseEvent],
        fail: Callable[[ApiError], list[SseEvent]],
    ) -> None:
        self.request = request
        self.rid = rid
        self.start = start
        # Anthropic has a `ping` event; Responses has none, so its streams get SSE comments.
        self.idle_frame = encode_events(idle_events) if idle_events else encode_comment()
        self.fail = fail
        self.response = web.StreamResponse(headers={**_SSE_HEADERS, wire.REQUEST_ID: rid})
        self.interval = request.app[GATEWAY].config.gateway.keepalive_interval_s
        self.last_write = 0.0

    async def _write(self, data: bytes) -> None:
        await self.response.write(data)
        self.last_write = asyncio.get_running_loop().time()

    async def _open(self) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
            await self._write(encode_events(self.start()))

    async def _idle(self) -> None:
        await self._open()
        await self._write(self.idle_frame)

    async def _send(self, events: list[SseEvent]) -> None:
        """Write what the translator made of a chunk; chunks that show nothing still keep alive."""
        if events:
            await self._write(encode_events(events))
        elif asyncio.get_running_loop().time() - self.last_write >= self.interval:
            await self._write(self.idle_frame)

    async def run(
        self,
        up: Upstream,
        body: dict[str, Any],
        route: str,
        feed: Callable[[dict[str, Any]], list[SseEvent]],
        finish: Callable[[], list[SseEvent]],
        error_response: ErrorRenderer,
    ) -> web.StreamResponse:
        try:
            async with up.stream_chat(body, request_id=self.rid, keepalive=self._idle, route=route) as chunks:
                await self._open()
                async with contextlib.aclosing(_paced(chunks, self.interval, self._idle)) as paced:
                    async for chunk in paced:
                        await self._send(feed(chunk))
                # Still inside: a translation failure at the end counts as this request's error.
                await self._send(finish())
        except ApiError as err:
            if not self.response.prepared:
                return error_response(err, self.rid)
            await self._write(encode_events(self.fail(err)))
        except ConnectionError:
            raise
        except Exception:
            if not self.response.prepared:
                raise
            log.exception("dialect stream failed: %s", route)
            await self._write(encode_events(self.fail(internal_error())))
        return self.response


async def _paced(
    chunks: AsyncIterator[dict[str, Any]], interval: float, on_idle: Callable[[], Awaitable[None]]
) -> AsyncIterator[dict[str, Any]]:
    """The chunks, calling `on_idle` whenever none arrived for `interval` seconds.

    The wait for the next chunk is never cancelled by the timer (cancelling would break the
    upstream read); only leaving early (a disconnect, an error) cancels it.
    """
    pending: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(anext(chunks))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                await on_idle()
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            yield chunk
            pending = asyncio.ensure_future(anext(chunks))
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
