"""OpenAI pass-through: `POST /v1/chat/completions` and `POST /v1/completions`.

The neuron speaks OpenAI natively, so bodies pass through as bytes. The gateway parses the
request once (for `model` and `stream`), re-serialises it only when it must change it (an alias
becomes the model id; a stream always asks for usage), and parses an answer only for usage.
Streams are relayed one whole SSE event at a time, each written as it arrives; the usage chunk
the relay asked for is dropped again when the client did not ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from cortex.core.errors import ApiError, bad_request
from cortex.core.logs import REQUEST_ID_HEADER, request_id_var
from cortex.core.sse import DONE, encode_data
from cortex.gateway.accounting import usage_chunk
from cortex.gateway.bodies import read_json
from cortex.gateway.client_stream import ClientStream
from cortex.gateway.pipeline import Dialect, endpoint
from cortex.gateway.relay import Relay


@dataclass(frozen=True)
class Endpoint:
    path: str
    required: str  # the field that must be present: "messages" or "prompt"
    required_types: tuple[type, ...]


CHAT = Endpoint("/v1/chat/completions", "messages", (list,))
COMPLETIONS = Endpoint("/v1/completions", "prompt", (str, list))


def check_fields(payload: dict[str, Any], endpoint: Endpoint) -> None:
    """Type checks the gateway relies on (the rest is the neuron's to validate)."""
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream", code="invalid_type")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options", code="invalid_type")
    value = payload.get(endpoint.required)
    if value is None:
        raise bad_request(f"'{endpoint.required}' is required", param=endpoint.required, code="missing_required_field")
    if not isinstance(value, endpoint.required_types) or (isinstance(value, list) and not value):
        kinds = " or ".join("a non-empty array" if t is list else "a string" for t in endpoint.required_types)
        raise bad_request(f"'{endpoint.required}' must be {kinds}", param=endpoint.required, code="invalid_type")


def client_wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def without_usage(event: bytes) -> bytes | None:
    """The event to forward to a client that did not ask for usage: None drops a usage-only chunk."""
    if b'"usage":' not in event:
        return event
    chunk = usage_chunk(event)
    if chunk is None:
        return event
    if not chunk.get("choices"):
        return None
    return encode_data({k: v for k, v in chunk.items() if k != "usage"})


@dataclass
class OpenAIRoutes:
    relay: Relay

    @endpoint(dialect=Dialect.OPENAI)
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, CHAT)

    @endpoint(dialect=Dialect.OPENAI)
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, COMPLETIONS)

    async def forward(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        payload, raw = await read_json(request)
        if payload.get("stream") is True:
            return await self.relay_stream(request, endpoint, payload)
        model = payload.get("model")
        check = partial(check_fields, payload, endpoint)
        reply = await self.relay.fetch(endpoint.path, model, endpoint.path, payload, raw=raw, check=check)
        headers = {
            "Content-Type": reply.headers.get("Content-Type", "application/json"),
            REQUEST_ID_HEADER: request_id_var.get(),
        }
        if "Retry-After" in reply.headers:
            headers["Retry-After"] = reply.headers["Retry-After"]
        return web.Response(body=reply.raw, status=reply.status, headers=headers)

    async def relay_stream(
        self, request: web.Request, endpoint: Endpoint, payload: dict[str, Any]
    ) -> web.StreamResponse:
        client = ClientStream(request)
        include_usage = client_wants_usage(payload)
        check = partial(check_fields, payload, endpoint)
        model = payload.get("model")
        stream = self.relay.stream(endpoint.path, model, endpoint.path, payload, keepalive=client.idle, check=check)
        try:
            async with stream as events:
                await client.start()
                async for batch in events.batches():  # the events that arrived together: one write
                    if not include_usage:
                        batch = [e for e in map(without_usage, batch) if e is not None]
                    if events.done:  # the last batch: it, `[DONE]` and the body's end go out in one write
                        await client.write(b"".join(batch) + DONE, last=True)
                    else:
                        await client.write(b"".join(batch))  # bounded: a client that stops reading is cut off
        except ApiError as err:
            if not client.started:
                raise  # nothing sent yet: the pipeline answers with the error
            # A started stream ends with an OpenAI error event; the handler returning closes it at once.
            await client.write(encode_data(err.openai_body()))
        return client.response
