"""`POST /v1/responses`: OpenAI's Responses API, stateless, translated to and from OpenAI chat.

Failures are answered in OpenAI's envelope (the pipeline), or as `error` and `response.failed`
events once a stream has started (translated_stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from cortex.gateway.bodies import read_json
from cortex.gateway.dialects.optional_tools import OPTIONAL_TOOLS_HEADER, optional_tools
from cortex.gateway.dialects.responses.reply import to_response
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.stream import ResponsesStream
from cortex.gateway.dialects.responses.to_chat import to_chat_request as chat_body
from cortex.gateway.dialects.translated_stream import answer_translated
from cortex.gateway.pipeline import Dialect, endpoint
from cortex.gateway.relay import Relay

RESPONSES = "/v1/responses"


@dataclass
class ResponsesRoutes:
    relay: Relay

    @endpoint(dialect=Dialect.OPENAI)
    async def responses(self, request: web.Request) -> web.StreamResponse:
        optional = optional_tools(request.headers.get(OPTIONAL_TOOLS_HEADER))
        req = parse_responses_request((await read_json(request))[0], optional)
        stream = ResponsesStream(req) if req.stream else None
        render = lambda reply: to_response(reply, req)  # noqa: E731
        return await answer_translated(request, self.relay, RESPONSES, req.model, chat_body(req), stream, render)
