"""OpenAI pass-through: `POST /v1/chat/completions` and `POST /v1/completions`.

The neuron speaks OpenAI natively, so bodies pass through as bytes. The gateway parses the
request once (for `model` and `stream`), re-serialises it only when it must change it (an alias
becomes the model id; a stream always asks for usage), and parses a response only for usage.
Streams are relayed one whole SSE event at a time, each written as it arrives; the usage chunk
the gateway asked for is dropped again when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import StreamReader, web

from cortex.core.errors import ApiError, bad_request
from cortex.gateway import streaming, wire
from cortex.gateway.keys import GATEWAY
from cortex.gateway.metrics import RequestRecord
from cortex.gateway.neuron_client import describe
from cortex.gateway.upstream import STREAM_ERRORS, Exchange, Upstream, error_type, read_body, upstream_error

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Status logged for a request whose client went away before an answer (nginx's convention).
_CLIENT_CLOSED = 499


@dataclass(frozen=True)
class Endpoint:
    path: str
    required: str  # the field that must be present: "messages" or "prompt"
    required_types: tuple[type, ...]


CHAT = Endpoint("/v1/chat/completions", "messages", (list,))
COMPLETIONS = Endpoint("/v1/completions", "prompt", (str, list))


def register(app: web.Application) -> None:
    app.router.add_post(CHAT.path, chat_completions)
    app.router.add_post(COMPLETIONS.path, completions)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await proxy(request, COMPLETIONS)


async def proxy(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    up = request.app[GATEWAY].upstream
    rid = wire.request_id(request)
    record = RequestRecord(up.gw.metrics)
    status = _CLIENT_CLOSED
    stream = False
    try:
        up.check_client_key(request)
        payload, raw = await wire.read_json(request)
        model_name = payload.get("model")
        model_id = up.resolve(model_name)
        record.model = model_id
        stream = check_fields(payload, endpoint)
        if stream:
            response = await relay_stream(request, up, endpoint, payload, model_id, record, rid)
        else:
            body = raw if model_id == model_name else orjson.dumps({**payload, "model": model_id})
            response = await forward(up, endpoint, body, model_id, record, rid)
        status = response.status
        return response
    except ApiError as err:
        status = err.status
        record.fail(error_type(err))
        return wire.openai_error(err, rid)
    except asyncio.CancelledError:
        record.fail("client_disconnected")
        raise
    except ConnectionError:  # writing to a client that went away: nobody to answer
        record.fail("client_disconnected")
        return web.Response(status=_CLIENT_CLOSED)
    finally:
        up.finish(record, endpoint.path, status, stream=stream)


def check_fields(payload: dict[str, Any], endpoint: Endpoint) -> bool:
    """Type checks the gateway relies on (the rest is the neuron's to validate); returns `stream`."""
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
    return bool(stream)


def client_wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def forward(
    up: Upstream, endpoint: Endpoint, body: bytes, model_id: str, record: RequestRecord, rid: str
) -> web.Response:
    exchange = await up.open(model_id, endpoint.path, body, record, rid)
    data = await read_body(exchange)
    upstream = exchange.response
    status = upstream.status
    if status == 200:
        if b'"usage"' in data:
            record.usage(orjson.loads(data).get("usage"))
    else:
        record.fail(error_type(upstream_error(status, data, upstream.headers)))
    headers = {"Content-Type": upstream.headers.get("Content-Type", "application/json"), wire.REQUEST_ID: rid}
    if "Retry-After" in upstream.headers:
        headers["Retry-After"] = upstream.headers["Retry-After"]
    return web.Response(body=data, status=status, headers=headers)


async def relay_stream(
    request: web.Request,
    up: Upstream,
    endpoint: Endpoint,
    payload: dict[str, Any],
    model_id: str,
    record: RequestRecord,
    rid: str,
) -> web.StreamResponse:
    body = orjson.dumps(streaming.stream_body(payload, model_id))
    response = web.StreamResponse(headers={**_SSE_HEADERS, wire.REQUEST_ID: rid})

    async def keepalive() -> None:
        # A cold load can take minutes: start the stream and send comments so nothing times out.
        if not response.prepared:
            await response.prepare(request)
        await response.write(streaming.KEEPALIVE)

    try:
        exchange = await up.open(model_id, endpoint.path, body, record, rid, keepalive)
    except ApiError as err:
        if not response.prepared:
            raise
        return await _fail_stream(response, record, err)
    done = False
    try:
        upstream = exchange.response
        if upstream.status != 200:
            raw = await upstream.read()
            err = upstream_error(upstream.status, raw, upstream.headers)
            if response.prepared:
                return await _fail_stream(response, record, err)
            record.fail(error_type(err))
            return _passthrough_error(upstream.status, raw, upstream.headers.get("Content-Type"), err, rid)
        if not response.prepared:
            await response.prepare(request)
        done = await pump(upstream.content, response, record, client_wants_usage(payload), exchange)
        return response
    finally:
        exchange.close(abort=not done)


async def pump(
    content: StreamReader, response: web.StreamResponse, record: RequestRecord, include_usage: bool, ex: Exchange
) -> bool:
    """Relay events until `[DONE]` (True) or until the neuron's stream breaks (error event, False)."""
    while True:
        try:
            event = await content.readuntil(streaming.EVENT_END, max_size=streaming.MAX_EVENT_BYTES)
        except STREAM_ERRORS as exc:
            await _fail_stream(response, record, streaming.interrupted(ex.node, describe(exc)))
            return False
        if not event.endswith(streaming.EVENT_END):
            await _fail_stream(response, record, streaming.interrupted(ex.node, "the stream ended before [DONE]"))
            return False
        if event.startswith(b"data: [DONE]"):
            await response.write(event)
            return True
        if b'"usage":' in event and b'"usage":null' not in event:
            usage, chunk = streaming.usage_of(event)
            if usage is not None and chunk is not None:
                record.usage(usage)
                if not include_usage:
                    stripped = streaming.without_usage(chunk)
                    if stripped is None:
                        continue
                    event = stripped
        if streaming.carries_token(event):
            record.token(time.perf_counter())
        await response.write(event)


async def _fail_stream(response: web.StreamResponse, record: RequestRecord, err: ApiError) -> web.StreamResponse:
    """End a started stream with an error event; the handler returning closes it at once."""
    record.fail(error_type(err))
    await response.write(streaming.error_event(err))
    return response


def _passthrough_error(status: int, raw: bytes, content_type: str | None, err: ApiError, rid: str) -> web.Response:
    headers = {"Content-Type": content_type or "application/json", wire.REQUEST_ID: rid, **err.headers()}
    return web.Response(body=raw, status=status, headers=headers)
