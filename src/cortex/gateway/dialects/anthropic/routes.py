"""`POST /v1/messages` and `POST /v1/messages/count_tokens` (Claude Code's `?beta=true` lands here too).

Each parses Anthropic's request, translates it to an OpenAI chat body, sends it through the relay
and translates the answer back. Failures are answered in Anthropic's envelope (the pipeline), or
as an `error` event once a stream has started (translated_stream.py).
"""

from __future__ import annotations

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.gateway.bodies import json_response
from cortex.gateway.dialects.anthropic.reply import to_anthropic_message
from cortex.gateway.dialects.anthropic.request import parse_count_tokens_request, parse_messages_request
from cortex.gateway.dialects.anthropic.stream import AnthropicStream
from cortex.gateway.dialects.anthropic.to_chat import to_chat_request as chat_body
from cortex.gateway.dialects.optional_tools import read_request
from cortex.gateway.dialects.translated_stream import TranslatedRoutes, Translation
from cortex.gateway.pipeline import Dialect, endpoint

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
TOKENIZE_PATH = "/v1/chat/tokenize"
TRANSLATION = Translation(
    MESSAGES,
    parse_messages_request,
    chat_body,
    lambda req: AnthropicStream(req.model, thinking=req.wants_thinking()),
    lambda reply, req: to_anthropic_message(reply, model=req.model, thinking=req.wants_thinking()),
)


class AnthropicRoutes(TranslatedRoutes):
    @endpoint(dialect=Dialect.ANTHROPIC)
    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await TRANSLATION.answer(request, self.relay)

    @endpoint(dialect=Dialect.ANTHROPIC)
    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Counted by the neuron with the model's own tokenizer and chat template (tools included)."""
        req = await read_request(request, parse_count_tokens_request)
        counted = (await self.relay.fetch(COUNT_TOKENS, req.model, TOKENIZE_PATH, chat_body(req))).json()
        if not isinstance(counted, dict) or not isinstance(counted.get("prompt_tokens"), int):
            raise ApiError(502, "the model's server did not return a token count", code="bad_upstream_reply")
        return json_response({"input_tokens": counted["prompt_tokens"]})
