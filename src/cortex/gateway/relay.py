"""The one relay: every request the gateway sends to a neuron, streamed or not, goes through here.

    reply = await relay.fetch(route, model, "/v1/chat/tokenize", body)       # whole answer
    async with relay.stream(route, model, "/v1/chat/completions", body, keepalive=idle) as events:
        async for event in events:                                          # whole SSE events (bytes)
            ...

What it does, once for every caller (the OpenAI pass-through and the dialect routes alike):

- resolves the client's model name (an alias becomes the model id; 400/404 otherwise);
- routes and connects through `Upstream` (a cold load first when needed, `keepalive` awaited
  while it runs; a chat preferably to the replica that served its prompt prefix; a refused
  connection retried on another replica; the in-flight lease held until the answer is read);
- asks every stream for usage (`stream_options.include_usage`, set here and nowhere else);
- reads a stream one whole event at a time and lets the request's record observe each (usage,
  first token, inter-token gaps); `[DONE]` ends the iteration;
- leaving early (client disconnect, error, cancellation) aborts the neuron connection, which
  cancels the generation there;
- publishes metrics and the `request.done` line once (accounting.py).

Every failure is an `ApiError` with the status to answer: 400/404 bad or unknown model, 502
unreachable (`upstream_unreachable`) or cut mid-stream (`stream_interrupted`, from the
iteration), 503 recovering or no capacity, 504 load timeout, and a neuron's own error answer as an
`UpstreamError` (status, message, type, code, `Retry-After`, and the body as it was sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from cortex.core.errors import ApiError
from cortex.core.logs import log_event, request_id_var
from cortex.core.sse import EVENT_END, event_data
from cortex.gateway.accounting import Accounting, RequestRecord, error_type
from cortex.gateway.affinity import prefix_key
from cortex.gateway.limits import check_model
from cortex.gateway.neuron_client import describe, plain_reason
from cortex.gateway.router import KeepAlive, Router
from cortex.gateway.upstream import STREAM_ERRORS, Exchange, Upstream, upstream_error

log = logging.getLogger("cortex.gateway.relay")

# Status logged for a request whose client went away before an answer (nginx's convention).
CLIENT_CLOSED = 499
# One SSE event may carry long tool-call arguments: read events up to this size.
MAX_EVENT_BYTES = 16 * 1024 * 1024

Check = Callable[[], object]
# Generation requests are routed with prefix affinity (a token count warms no cache).
CHAT_PATH = "/v1/chat/completions"


def stream_body(body: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The body sent to the neuron for a stream: model id, and usage always asked for (metrics need it)."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    return {**body, "model": model_id, "stream": True, "stream_options": options}


def interrupted(node: str, detail: str) -> ApiError:
    return ApiError(502, f"neuron '{node}' stopped mid-stream: {detail}", code="stream_interrupted")


class Reply:
    """A neuron's whole answer: status, body bytes, headers; `json()` for a success, raising its error otherwise."""

    __slots__ = ("_parsed", "headers", "raw", "status")

    def __init__(self, status: int, raw: bytes, headers: CIMultiDictProxy[str]) -> None:
        self.status = status
        self.raw = raw
        self.headers = headers
        self._parsed: Any = None

    def json(self) -> Any:
        if self.status >= 400:
            raise upstream_error(self.status, self.raw, self.headers)
        if self._parsed is None and self.raw:
            try:
                self._parsed = orjson.loads(self.raw)
            except orjson.JSONDecodeError:
                message = "the model's server answered something that is not JSON"
                raise ApiError(502, message, code="bad_upstream_reply") from None
        return self._parsed


@dataclass
class Relay:
    router: Router
    upstream: Upstream
    accounting: Accounting
    keepalive_interval_s: float

    def resolve(self, model: Any) -> str:
        """The model id a client's `model` names (alias resolved); ApiError 400/404 otherwise."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must be a non-empty string", param="model", code="invalid_model")
        model_id = self.router.resolve(model)
        check_model(model_id)  # the request's API key may be limited to some models (limits.py)
        return model_id

    async def fetch(
        self,
        route: str,
        model: Any,
        path: str,
        body: dict[str, Any],
        *,
        raw: bytes | None = None,
        keepalive: KeepAlive | None = None,
        check: Check | None = None,
    ) -> Reply:
        """POST `body` (its model set to the id) to `path` on a replica; the whole answer, any status.

        `raw`: the body's bytes as the client sent them, forwarded untouched when its model is already an id.
        `check`: the route's own checks of the body, run once the model is known (their refusal is accounted).
        """
        record = self.accounting.record(model)
        status = CLIENT_CLOSED
        try:
            model_id = self.resolve(model)
            record.model = model_id
            if check is not None:
                check()
            payload = raw if raw is not None and model_id == model else orjson.dumps({**body, "model": model_id})
            prefix = prefix_key(body) if path == CHAT_PATH else None
            exchange = await self.upstream.open(
                model_id, path, payload, record, request_id_var.get(), keepalive, prefix
            )
            data = await exchange.read()
            reply = Reply(exchange.response.status, data, exchange.response.headers)
            status = reply.status
            if status >= 400:
                record.fail(error_type(upstream_error(status, data, reply.headers)))
            elif b'"usage"' in data:
                parsed = reply.json()
                record.usage(parsed.get("usage") if isinstance(parsed, dict) else None)
            return reply
        except ApiError as err:
            status = err.status
            record.fail(error_type(err))
            raise
        except asyncio.CancelledError:
            record.fail("client_disconnected")
            raise
        finally:
            self.accounting.finish(record, route, status, stream=False)

    def stream(
        self,
        route: str,
        model: Any,
        path: str,
        body: dict[str, Any],
        *,
        keepalive: KeepAlive | None = None,
        check: Check | None = None,
    ) -> RelayStream:
        """A streamed answer: `async with relay.stream(...) as events: async for event in events`."""
        return RelayStream(self, route, model, path, body, keepalive, check)


class RelayStream:
    """The async context manager `Relay.stream` returns; iterating it yields whole SSE events, `[DONE]` excluded."""

    def __init__(
        self,
        relay: Relay,
        route: str,
        model: Any,
        path: str,
        body: dict[str, Any],
        keepalive: KeepAlive | None,
        check: Check | None,
    ) -> None:
        self.relay = relay
        self.check = check
        self.route = route
        self.model = model
        self.path = path
        self.body = body
        self.keepalive = keepalive
        self.record: RequestRecord = relay.accounting.record(model)
        self.exchange: Exchange | None = None
        self.done = False
        self._finished = False

    async def __aenter__(self) -> RelayStream:
        try:
            model_id = self.relay.resolve(self.model)
            self.record.model = model_id
            if self.check is not None:
                self.check()
            payload = orjson.dumps(stream_body(self.body, model_id))
            prefix = prefix_key(self.body) if self.path == CHAT_PATH else None
            self.exchange = await self.relay.upstream.open(
                model_id, self.path, payload, self.record, request_id_var.get(), self.keepalive, prefix, stream=True
            )
            response = self.exchange.response
            if response.status != 200:
                raw = await self.exchange.read()
                self.exchange = None  # read() closed it
                raise upstream_error(response.status, raw, response.headers)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        assert self.exchange is not None
        node = self.exchange.node
        content = self.exchange.response.content
        observe = self.record.observe
        while True:
            try:
                event = await content.readuntil(EVENT_END, max_size=MAX_EVENT_BYTES)
            except STREAM_ERRORS as exc:
                log_event(log, "upstream.stream_broken", logging.WARNING, node=node, error=describe(exc))
                raise interrupted(node, plain_reason(exc)) from None
            if not event.endswith(EVENT_END):
                raise interrupted(node, "the stream ended before [DONE]")
            if event.startswith(b"data: [DONE]"):
                self.done = True
                return
            observe(event, time.perf_counter())
            yield event

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.exchange is not None:
            self.exchange.close(abort=not self.done)
            self.exchange = None
        status = 200
        if isinstance(exc, ApiError):
            status = exc.status
            self.record.fail(error_type(exc))
        elif exc is not None and not isinstance(exc, asyncio.CancelledError | ConnectionError):
            status = 500
            self.record.fail("internal_error")
        elif exc is not None or not self.done:
            status = CLIENT_CLOSED
            self.record.fail("client_disconnected")
        if not self._finished:  # __aenter__'s own failure path comes here too: publish once
            self._finished = True
            self.relay.accounting.finish(self.record, self.route, status, stream=True)


async def chunks(events: AsyncIterator[bytes] | RelayStream) -> AsyncIterator[dict[str, Any]]:
    """The OpenAI chunks of a relayed stream, parsed; comments skipped; an error event raised as its error."""
    async for event in events:
        data = event_data(event)
        if data is None:
            continue
        chunk = orjson.loads(data)
        if "error" in chunk and "choices" not in chunk:
            raise upstream_error(502, data, None)
        yield chunk
