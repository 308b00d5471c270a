"""Sending a request to the neuron that serves a model — the internal API every client route uses.

This is the contract for route modules (the OpenAI pass-through in proxy.py, the Anthropic and
Responses dialects). A route gets it with `upstream_of(request)` and never talks to a neuron,
the router or the metrics itself.

    up = upstream_of(request)
    up.check_client_key(request)                  # 401 ApiError unless an api key matches (if any are set)
    model_id = up.resolve(body["model"])          # alias → model id; 404 ApiError model_not_found

    # Non-streaming: an OpenAI chat-completions body in, the neuron's parsed JSON response out.
    reply: dict = await up.chat(openai_body, request_id=rid, keepalive=None, route="/v1/messages")

    # Streaming: the OpenAI chunk dicts as the neuron sends them, then the final usage chunk
    # (`choices == []`, `usage` set; always requested from the neuron, always yielded here).
    async with up.stream_chat(openai_body, request_id=rid, keepalive=send_ping, route="/v1/messages") as chunks:
        async for chunk in chunks:
            ...

    # Any other neuron route for the routed model, e.g. token counting:
    counted: dict = await up.post(model, "/v1/chat/tokenize", {"model": model, "messages": [...]}, request_id=rid)

Guarantees:
- Routing is ARCHITECTURE.md §3: alias, least-busy loaded replica, 503 + Retry-After while the model
  recovers, cold load (shared by concurrent requests) when it is in the catalogue, else 404. The
  `model` in the body may be an alias; the neuron receives the model id.
- `keepalive`, if given, is awaited once when a wait for a cold load begins and then every
  `gateway.keepalive_interval_s` until it ends (send an SSE comment or an Anthropic `ping`). It is
  not called when the model is already loaded. If it raises (the client went away), the wait ends
  with that exception; the load itself goes on for the next request.
- Every failure is an `ApiError` (core/errors.py) with the status to answer: 400/404 bad request or
  unknown model, 401 key, 413 body, 502 neuron unreachable (`code="upstream_unreachable"`) or a
  stream cut mid-way (`code="stream_interrupted"`, raised from the iteration), 503 recovering /
  no capacity (with `retry_after`), 504 load timeout, and a neuron's own error status and message
  passed through (e.g. 400 `context_length_exceeded`, 429 admission with `retry_after`). Render it
  in your dialect with `err.anthropic_body()` / `err.openai_body()` and `err.headers()`.
- A connection failure before the neuron answered is retried once on another replica (or after a
  cold load elsewhere): inference has no side effects, and the node is marked unhealthy at once.
- Metrics (requests, errors by type, tokens, duration, TTFT, tok/s, inter-token latency) and the
  `request.done` log line are recorded here, labelled with the model id and node; usage comes from
  the neuron's response or final usage chunk. Leaving the `async with` early (client disconnect,
  exception, cancellation) closes the neuron connection, which cancels the generation there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from multidict import CIMultiDict
from yarl import URL

from cortex.core.errors import ApiError
from cortex.core.logs import log_event, request_id_var
from cortex.gateway import streaming
from cortex.gateway.access_log import AccessLog
from cortex.gateway.keys import GATEWAY
from cortex.gateway.metrics import RequestRecord
from cortex.gateway.neuron_client import decode, describe
from cortex.gateway.router import KeepAlive, Lease

if TYPE_CHECKING:
    from cortex.gateway.runtime import Gateway

log = logging.getLogger("cortex.gateway.upstream")

# Connection failures that happen before the neuron saw the request (or while it was dying).
CONNECTION_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# A neuron's stream breaking: cut connection, bad chunking, or an event beyond MAX_EVENT_BYTES.
STREAM_ERRORS = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
    LineTooLong,
)


def upstream_of(request: web.BaseRequest) -> Upstream:
    """The gateway's Upstream, from inside any handler."""
    return request.app[GATEWAY].upstream


@dataclass
class Exchange:
    """An open request to a neuron: the lease on the replica and the neuron's response (headers read)."""

    lease: Lease
    response: aiohttp.ClientResponse

    @property
    def node(self) -> str:
        return self.lease.node.name

    def close(self, *, abort: bool) -> None:
        """Return the connection to the pool, or (abort) drop it so the neuron cancels the generation."""
        if abort:
            self.response.close()
        else:
            self.response.release()
        self.lease.release()


class Upstream:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.router = gateway.router
        self.session = gateway.session
        self.access_log = AccessLog()
        self._urls: dict[tuple[str, str], URL] = {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=gateway.config.gateway.connect_timeout_s)
        self._headers: dict[str, dict[str, str]] = {
            node.name: {"Content-Type": "application/json", **node.auth_headers()}
            for node in gateway.state.nodes.values()
        }

    # ---- the dialect API ---------------------------------------------------------------------
    def check_client_key(self, request: web.BaseRequest) -> None:
        self.gw.check_client_key(request)

    def resolve(self, model: Any) -> str:
        """The model id a client's `model` names (alias resolved); ApiError 400/404 otherwise."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must be a non-empty string", param="model", code="invalid_model")
        return self.router.resolve(model)

    async def chat(
        self,
        body: dict[str, Any],
        *,
        request_id: str | None = None,
        keepalive: KeepAlive | None = None,
        route: str = "/v1/chat/completions",
    ) -> dict[str, Any]:
        """Non-streaming chat completion: the neuron's parsed JSON response."""
        record = RequestRecord(self.gw.metrics)
        status = 500
        try:
            model_id = self.resolve(body.get("model"))
            record.model = model_id
            payload = orjson.dumps({**body, "model": model_id, "stream": False})
            exchange = await self.open(model_id, "/v1/chat/completions", payload, record, request_id, keepalive)
            raw = await read_body(exchange)
            status = exchange.response.status
            if status >= 400:
                raise upstream_error(status, raw, exchange.response.headers)
            reply = orjson.loads(raw)
            record.usage(reply.get("usage"))
            return reply
        except ApiError as err:
            status = err.status
            record.fail(error_type(err))
            raise
        except asyncio.CancelledError:
            record.fail("client_disconnected")
            raise
        finally:
            self.finish(record, route, status, stream=False)

    def stream_chat(
        self,
        body: dict[str, Any],
        *,
        request_id: str | None = None,
        keepalive: KeepAlive | None = None,
        route: str = "/v1/chat/completions",
    ) -> ChatStream:
        """Streaming chat completion: `async with up.stream_chat(...) as chunks: async for chunk in chunks`."""
        return ChatStream(self, body, request_id, keepalive, route)

    async def post(
        self,
        model: str,
        path: str,
        body: dict[str, Any],
        *,
        request_id: str | None = None,
        keepalive: KeepAlive | None = None,
    ) -> Any:
        """POST `body` (its `model` set to the model id) to `path` on a replica of `model`; parsed JSON back."""
        model_id = self.resolve(model)
        payload = orjson.dumps({**body, "model": model_id})
        record = RequestRecord(self.gw.metrics)
        exchange = await self.open(model_id, path, payload, record, request_id, keepalive)
        raw = await read_body(exchange)
        if exchange.response.status >= 400:
            raise upstream_error(exchange.response.status, raw, exchange.response.headers)
        return orjson.loads(raw) if raw else None

    # ---- the transport under both --------------------------------------------------------------
    async def open(
        self,
        model_id: str,
        path: str,
        payload: bytes,
        record: RequestRecord,
        request_id: str | None,
        keepalive: KeepAlive | None = None,
    ) -> Exchange:
        """Route (cold-loading if needed) and send; returns once the neuron's response headers arrived.

        A connection failure is retried on another replica: the failed node is probed, and marked
        unhealthy (so it is routed around) when the probe fails too.
        """
        excluded: set[str] = set()
        failures: list[str] = []
        while True:
            lease = await self._route(model_id, keepalive, excluded, failures)
            node = lease.node
            record.node = node.name
            headers = self._headers[node.name]
            if request_id:
                headers = {**headers, "x-request-id": request_id}
            try:
                response = await self.session.post(
                    self._url(node.endpoint, path), data=payload, headers=headers, timeout=self._timeout
                )
                return Exchange(lease, response)
            except CONNECTION_ERRORS as exc:
                lease.release()
                failures.append(f"neuron '{node.name}' is unreachable: {describe(exc)}")
                log_event(log, "upstream.connect_failed", logging.WARNING, node=node.name, error=describe(exc))
                # A stale pooled connection fails once on a live node: retry it only if it answers a probe.
                if not await self.gw.poller.probe(node) or len(failures) > 1:
                    excluded.add(node.name)
                if len(failures) > len(self.gw.state.nodes):
                    raise ApiError(502, "; ".join(failures), code="upstream_unreachable") from None
            except BaseException:
                lease.release()
                raise

    def _url(self, endpoint: str, path: str) -> URL:
        """Parsed once per neuron and path: parsing a URL string on every request is measurable."""
        key = (endpoint, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(endpoint + path)
        return url

    async def _route(
        self, model_id: str, keepalive: KeepAlive | None, excluded: set[str], failures: list[str]
    ) -> Lease:
        if not failures:
            return await self.router.route(model_id, keepalive=keepalive)
        try:
            return await self.router.route(model_id, keepalive=keepalive, exclude=excluded)
        except ApiError as err:
            # The client asked a neuron that is gone: say so, with why no other could step in.
            message = f"{'; '.join(failures)}; no other replica could take the request: {err.message}"
            raise ApiError(502, message, code="upstream_unreachable") from None

    def finish(self, record: RequestRecord, route: str, status: int, *, stream: bool) -> None:
        """Publish the request's metrics and its `request.done` line, after the response is on its way.

        Deferred to the next event-loop iteration: the handler returns first and aiohttp writes the
        response, so none of this bookkeeping sits between the neuron's answer and the client.
        """
        record.end()
        try:
            asyncio.get_running_loop().call_soon(self._publish, record, route, status, stream)
        except RuntimeError:  # no running loop (shutdown)
            self._publish(record, route, status, stream)

    def _publish(self, record: RequestRecord, route: str, status: int, stream: bool) -> None:
        duration = record.publish()
        if self.access_log.enabled():
            self.access_log.request_done(
                route,
                status,
                record.model,
                record.node or "-",
                stream,
                duration,
                record.prompt_tokens,
                record.completion_tokens,
                record.error or "-",
            )


class ChatStream:
    """The async context manager `Upstream.stream_chat` returns (see the module docstring)."""

    def __init__(
        self, up: Upstream, body: dict[str, Any], request_id: str | None, keepalive: KeepAlive | None, route: str
    ) -> None:
        self.up = up
        self.body = body
        self.request_id = request_id or request_id_var.get()
        self.keepalive = keepalive
        self.route = route
        self.record = RequestRecord(up.gw.metrics)
        self.exchange: Exchange | None = None
        self.status = 200
        self.done = False
        self.finished = False

    async def __aenter__(self) -> AsyncIterator[dict[str, Any]]:
        try:
            model_id = self.up.resolve(self.body.get("model"))
            self.record.model = model_id
            payload = orjson.dumps(streaming.stream_body(self.body, model_id))
            self.exchange = await self.up.open(
                model_id, "/v1/chat/completions", payload, self.record, self.request_id, self.keepalive
            )
            response = self.exchange.response
            if response.status != 200:
                raw = await response.read()
                raise upstream_error(response.status, raw, response.headers)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        assert self.exchange is not None
        content = self.exchange.response.content
        record = self.record
        while True:
            try:
                event = await content.readuntil(streaming.EVENT_END, max_size=streaming.MAX_EVENT_BYTES)
            except STREAM_ERRORS as exc:
                raise streaming.interrupted(self.exchange.node, describe(exc)) from None
            if not event.endswith(streaming.EVENT_END):
                raise streaming.interrupted(self.exchange.node, "the stream ended before [DONE]")
            data = streaming.event_data(event)
            if data is None:
                continue  # comment or blank
            if data == b"[DONE]":
                self.done = True
                return
            chunk = orjson.loads(data)
            if "error" in chunk and "choices" not in chunk:
                raise upstream_error(502, data, None)
            if chunk.get("usage"):
                record.usage(chunk["usage"])
            if streaming.carries_token(event):
                record.token(time.perf_counter())
            yield chunk

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.exchange is not None:
            self.exchange.close(abort=not self.done)
            self.exchange = None
        if isinstance(exc, ApiError):
            self.status = exc.status
            self.record.fail(error_type(exc))
        elif exc is not None:
            self.record.fail("client_disconnected" if _is_disconnect(exc) else "internal_error")
        elif not self.done:
            self.record.fail("client_disconnected")
        if not self.finished:  # __aenter__'s own failure path calls this too: publish once
            self.finished = True
            self.up.finish(self.record, self.route, self.status, stream=True)


async def read_body(exchange: Exchange) -> bytes:
    """The neuron's whole response body; the exchange is closed whatever happens (its lease too)."""
    try:
        raw = await exchange.response.read()
    except STREAM_ERRORS as exc:
        exchange.close(abort=True)
        raise ApiError(
            502, f"neuron '{exchange.node}' failed mid-response: {describe(exc)}", code="upstream_unreachable"
        ) from None
    except BaseException:
        exchange.close(abort=True)  # cancelled: the client went away, so the neuron must stop too
        raise
    exchange.close(abort=False)
    return raw


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError | ConnectionError)


def error_type(err: ApiError) -> str:
    """The `type` label of the errors counter: the code when there is one, else the OpenAI type."""
    return err.code or err.type


def upstream_error(status: int, raw: bytes, headers: CIMultiDict[str] | Any) -> ApiError:
    """A neuron's error response as an ApiError keeping its status, message, type and code."""
    body = decode(raw)
    err = body.get("error") if isinstance(body, dict) else None
    retry_after = None
    if headers is not None and headers.get("Retry-After"):
        try:
            retry_after = float(headers["Retry-After"])
        except ValueError:
            retry_after = None
    if isinstance(err, dict):
        return ApiError(
            status,
            str(err.get("message") or f"neuron error {status}"),
            type=err.get("type"),
            param=err.get("param"),
            code=err.get("code"),
            retry_after=retry_after,
            details={k: v for k, v in err.items() if k not in ("message", "type", "param", "code")},
        )
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    return ApiError(status, text[:500] or f"neuron error {status}", retry_after=retry_after)
