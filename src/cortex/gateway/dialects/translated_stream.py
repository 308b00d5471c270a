"""A stream translated from OpenAI chat chunks into a dialect's named events, for Anthropic and Responses.

Both dialects answer the same way (`Translation.answer`): parse, send as OpenAI chat through the
relay, translate back whole or as this stream; a dialect's routes name only what is its own.

The stream starts (headers and the dialect's opening events) as soon as there is something to say:
the first chunk, or the first keep-alive while a cold load runs. While nothing arrives, whether
the model is loading or generating output the client does not see (reasoning it did not ask
for, a long tool call), the client gets the dialect's idle frame every
`gateway.keepalive_interval_s`: Anthropic's `ping` event, or an SSE comment for Responses, which
has no such event. A failure once the stream started becomes the dialect's error events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.core.sse import KEEPALIVE, SseEvent, encode_events
from cortex.gateway.bodies import json_response
from cortex.gateway.client_stream import ClientStream
from cortex.gateway.dialects.chunk_translator import ChunkTranslator
from cortex.gateway.dialects.optional_tools import read_request
from cortex.gateway.keepalive import with_keepalive
from cortex.gateway.pipeline import internal_error
from cortex.gateway.relay import Relay, chunks

log = logging.getLogger("cortex.gateway.dialects")

CHAT_PATH = "/v1/chat/completions"


class DialectRequest(Protocol):
    """What answering needs of a parsed dialect request: the model it names and whether it streams."""

    model: str
    stream: bool


R = TypeVar("R", bound=DialectRequest)


@dataclass(frozen=True)
class Translation(Generic[R]):
    """What is particular to one route translated to and from OpenAI chat; answering is the same for all:
    the body parsed (`parse`, with the client's optional tools), sent as the chat body `to_chat` makes,
    and answered streamed through a new `translator(req)` or whole through `render(reply, req)`."""

    route: str
    parse: Callable[[Any, frozenset[str]], R]
    to_chat: Callable[[R], dict[str, Any]]
    translator: Callable[[R], ChunkTranslator]
    render: Callable[[Any, R], dict[str, Any]]

    async def answer(self, request: web.Request, relay: Relay) -> web.StreamResponse:
        req = await read_request(request, self.parse)
        body = self.to_chat(req)
        if req.stream:
            return await TranslatedStream(request, relay, self.translator(req)).run(self.route, req.model, body)
        reply = await relay.fetch(self.route, req.model, CHAT_PATH, {**body, "stream": False})
        return json_response(self.render(reply.json(), req))


@dataclass
class TranslatedRoutes:
    """A translated dialect's routes, built with the relay their requests go through."""

    relay: Relay


class TranslatedStream:
    def __init__(self, request: web.Request, relay: Relay, translator: ChunkTranslator) -> None:
        idle_frame = encode_events(list(translator.idle_events)) if translator.idle_events else KEEPALIVE
        self.client = ClientStream(request, opening=lambda: encode_events(translator.start()), idle_frame=idle_frame)
        self.relay = relay
        self.translator = translator
        self.fail = translator.fail

    async def _send(self, events: list[SseEvent]) -> None:
        """Write what the translator made of a chunk; chunks that show nothing still keep alive."""
        client = self.client
        if events:
            await client.write(encode_events(events))
        elif asyncio.get_running_loop().time() - client.last_write >= self.relay.keepalive_interval_s:
            await client.write(client.idle_frame)

    async def run(self, route: str, model: Any, body: dict[str, Any]) -> web.StreamResponse:
        client = self.client
        feed, finish = self.translator.feed, self.translator.finish
        interval = self.relay.keepalive_interval_s
        try:
            async with self.relay.stream(route, model, CHAT_PATH, body, keepalive=client.idle) as events:
                await client.start()
                parsed = chunks(events)
                async with contextlib.aclosing(parsed):
                    while True:
                        try:
                            chunk = await with_keepalive(anext(parsed), interval, client.idle)
                        except StopAsyncIteration:
                            break
                        await self._send(feed(chunk))
                # Still inside: a translation failure at the end counts as this request's error.
                await self._send(finish())
        except ApiError as err:
            if not client.started:
                raise  # nothing sent yet: the pipeline answers in the dialect
            await client.write(encode_events(self.fail(err)))
        except ConnectionError:
            raise
        except Exception:
            if not client.started:
                raise
            log.exception("dialect stream failed: %s", route)
            await client.write(encode_events(self.fail(internal_error())))
        return client.response
