"""`POST /v1/responses`: OpenAI's Responses API, stateless, translated to and from OpenAI chat.

Failures are answered in OpenAI's envelope (the pipeline), or as `error` and `response.failed`
events once a stream has started (translated_stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from cortex.gateway.bodies import json_response, read_json
from cortex.gateway.dialects.responses.reply import to_response
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.stream import ResponsesStream
from cortex.gateway.dialects.responses.to_chat import to_chat_request as chat_body
from cortex.gateway.dialects.translated_stream import CHAT_PATH, TranslatedStream
from cortex.gateway.pipeline import Dialect, endpoint
from cortex.gateway.relay import Relay

RESPONSES = "/v1/responses"


@dataclass
class ResponsesRoutes:
    relay: Relay

    @endpoint(dialect=Dialect.OPENAI)
    async def responses(self, request: web.Request) -> web.StreamResponse:
        payload, _ = await read_json(request)
        req = parse_responses_request(payload)
        body = chat_body(req)
        if req.stream:
            stream = ResponsesStream(req)
            translated = TranslatedStream(request, self.relay, opening=stream.start, idle_events=[], fail=stream.fail)
            return await translated.run(RESPONSES, req.model, body, stream.feed, stream.finish)
        reply = await self.relay.fetch(RESPONSES, req.model, CHAT_PATH, {**body, "stream": False})
        return json_response(to_response(reply.json(), req))
