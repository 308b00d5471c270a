"""`POST /v1/responses`: OpenAI's Responses API, stateless, translated to and from OpenAI chat.

Failures are answered in OpenAI's envelope (the pipeline), or as `error` and `response.failed`
events once a stream has started (translated_stream.py).
"""

from __future__ import annotations

from aiohttp import web

from cortex.gateway.dialects.responses.reply import to_response
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.stream import ResponsesStream
from cortex.gateway.dialects.responses.to_chat import to_chat_request as chat_body
from cortex.gateway.dialects.translated_stream import TranslatedRoutes, Translation
from cortex.gateway.pipeline import Dialect, endpoint

RESPONSES = "/v1/responses"
TRANSLATION = Translation(RESPONSES, parse_responses_request, chat_body, ResponsesStream, to_response)


class ResponsesRoutes(TranslatedRoutes):
    @endpoint(dialect=Dialect.OPENAI)
    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await TRANSLATION.answer(request, self.relay)
