"""A stream translated from OpenAI chat chunks into a dialect's named events, for Anthropic and Responses.

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
from typing import Any

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.core.sse import KEEPALIVE, SseEvent, encode_events
from cortex.gateway.bodies import json_response
from cortex.gateway.client_stream import ClientStream
from cortex.gateway.dialects.chunk_translator import ChunkTranslator
from cortex.gateway.keepalive import with_keepalive
from cortex.gateway.pipeline import internal_error
from cortex.gateway.relay import Relay, chunks

log = logging.getLogger("cortex.gateway.dialects")

CHAT_PATH = "/v1/chat/completions"


async def answer_translated(
    request: web.Request,
    relay: Relay,
    route: str,
    model: Any,
    body: dict[str, Any],
    stream: ChunkTranslator | None,
    render: Callable[[Any], dict[str, Any]],
) -> web.StreamResponse:
    """A dialect request's answer from the chat `body`: streamed through `stream`, or whole through `render`."""
    if stream is not None:
        return await TranslatedStream(request, relay, stream).run(route, model, body)
    reply = await relay.fetch(route, model, CHAT_PATH, {**body, "stream": False})
    return json_response(render(reply.json()))


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
