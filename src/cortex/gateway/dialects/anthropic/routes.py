"""`POST /v1/messages` and `POST /v1/messages/count_tokens` (Claude Code's `?beta=true` lands here too).

Each parses Anthropic's request, translates it to an OpenAI chat body, sends it through the relay
and translates the answer back. Failures are answered in Anthropic's envelope (the pipeline), or
as an `error` event once a stream has started (translated_stream.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.gateway.bodies import json_response, read_json
from cortex.gateway.dialects.anthropic.reply import to_anthropic_message
from cortex.gateway.dialects.anthropic.request import parse_count_tokens_request, parse_messages_request
from cortex.gateway.dialects.anthropic.stream import AnthropicStream
from cortex.gateway.dialects.anthropic.to_chat import to_chat_request as chat_body
from cortex.gateway.dialects.optional_tools import OPTIONAL_TOOLS_HEADER, optional_tools
from cortex.gateway.dialects.translated_stream import answer_translated
from cortex.gateway.pipeline import Dialect, endpoint
from cortex.gateway.relay import Relay

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
TOKENIZE_PATH = "/v1/chat/tokenize"


@dataclass
class AnthropicRoutes:
    relay: Relay

    @endpoint(dialect=Dialect.ANTHROPIC)
    async def messages(self, request: web.Request) -> web.StreamResponse:
        optional = optional_tools(request.headers.get(OPTIONAL_TOOLS_HEADER))
        req = parse_messages_request((await read_json(request))[0], optional)
        thinking = req.wants_thinking()
        stream = AnthropicStream(req.model, thinking=thinking) if req.stream else None
        return await answer_translated(
            request,
            self.relay,
            MESSAGES,
            req.model,
            chat_body(req),
            stream,
            lambda reply: to_anthropic_message(reply, model=req.model, thinking=thinking),
        )

    @endpoint(dialect=Dialect.ANTHROPIC)
    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Counted by the neuron with the model's own tokenizer and chat template (tools included)."""
        payload, _ = await read_json(request)
        req = parse_count_tokens_request(payload, optional_tools(request.headers.get(OPTIONAL_TOOLS_HEADER)))
        counted = (await self.relay.fetch(COUNT_TOKENS, req.model, TOKENIZE_PATH, chat_body(req))).json()
        if not isinstance(counted, dict) or not isinstance(counted.get("prompt_tokens"), int):
            raise ApiError(502, "the model's server did not return a token count", code="bad_upstream_reply")
        return json_response({"input_tokens": counted["prompt_tokens"]})
