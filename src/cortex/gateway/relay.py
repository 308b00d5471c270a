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
- retries once a request whose neuron failed before its first output (`retriable`: a device
  fault, a reset, a drain; never a 4xx), on another replica or after the model's recovery
  (docs/reliability.md, "Failover"): a stream is read up to its first output before its caller
  sees any event;
- keeps the requests in flight (`live`) so that the drain's end (`cut_all`) and a node the poller
  lost (`node_lost`) can end them early, with an error in the client's dialect, not a bare close;
- leaving early (client disconnect, error, cancellation) aborts the neuron connection, which
  cancels the generation there;
- publishes metrics and the `request.done` line once (accounting.py).

Every failure is an `ApiError` with the status to answer: 400/404 bad or unknown model, 502
unreachable (`upstream_unreachable`) or cut mid-stream (`stream_interrupted`, from the
iteration), 503 recovering, no capacity or shutting down, 504 load timeout or no first output
within `first_byte_timeout_s`, and a neuron's own error answer as an `UpstreamError` (status,
message, type, code, `Retry-After`, and the body as it was sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from cortex.core.errors import ApiError
from cortex.core.logs import log_event, request_id_var
from cortex.core.sse import event_data
from cortex.gateway.accounting import Accounting, error_type
from cortex.gateway.affinity import prefix_key
from cortex.gateway.failover import (
    Cuttable,
    LiveFetch,
    retriable,
    retriable_reply,
    retry_from,
)
from cortex.gateway.limits import check_model
from cortex.gateway.relay_stream import CHAT_PATH, CLIENT_CLOSED, Check, RelayStream, stream_body
from cortex.gateway.router import KeepAlive, Router
from cortex.gateway.upstream import Upstream, upstream_error

log = logging.getLogger("cortex.gateway.relay")

__all__ = ["Relay", "RelayStream", "Reply", "chunks", "stream_body"]


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
    # Requests on their way to a neuron, which `cut_all` (shutdown) and `node_lost` can end early.
    live: set[Cuttable] = field(default_factory=set)

    def resolve(self, model: Any) -> str:
        """The model id a client's `model` names (alias resolved); ApiError 400/404 otherwise."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must be a non-empty string", param="model", code="invalid_model")
        model_id = self.router.resolve(model)
        check_model(model_id)  # the request's API key may be limited to some models (limits.py)
        return model_id

    def cut_all(self, error: Callable[[], ApiError]) -> int:
        """End every request in flight with `err` (the drain timeout ran out): an error event, not a close."""
        cut = list(self.live)
        for request in cut:
            request.cut(error(), retry=False)  # one exception object per task that raises it
        return len(cut)

    def node_lost(self, node: str, silent_for_s: float) -> int:
        """The poller found `node` unreachable: end its requests that heard nothing from it, or none for `silent_for_s`.

        Those with no output yet are retried elsewhere (or wait for a recovery); a stream that
        already sent output ends with a `stream_interrupted` event now, not at its idle timeout.
        A stream still receiving events is left alone: the neuron is busy, not gone.
        """
        now = time.perf_counter()
        cut = [r for r in self.live if r.record.node == node and (r.unheard() or now - r.last_read >= silent_for_s)]
        for request in cut:
            request.cut(
                ApiError(502, f"neuron '{node}' stopped answering its health checks", code="stream_interrupted"),
                retry=True,
            )
        if cut:
            log_event(log, "upstream.node_lost", logging.WARNING, node=node, cut=len(cut))
        return len(cut)

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
        A neuron failing before its answer (docs/reliability.md, "Failover") is retried once.
        """
        record = self.accounting.record(model)
        live = LiveFetch(record)
        self.live.add(live)
        status = CLIENT_CLOSED
        try:
            model_id = self.resolve(model)
            record.model = model_id
            if check is not None:
                check()
            payload = raw if raw is not None and model_id == model else orjson.dumps({**body, "model": model_id})
            prefix = prefix_key(body) if path == CHAT_PATH else None
            failed: tuple[str, str] | None = None
            while True:
                reply: Reply | None = None
                try:
                    exchange = await self.upstream.open(
                        model_id, path, payload, record, request_id_var.get(), keepalive, prefix, failed=failed
                    )
                    try:
                        data = await exchange.read()
                    except ApiError as err:  # the neuron broke mid-answer: nothing reached the client yet
                        failure: ApiError | None = err
                    else:
                        reply = Reply(exchange.response.status, data, exchange.response.headers)
                        failure = retriable_reply(reply.status, reply.raw, reply.headers)
                except asyncio.CancelledError:
                    failure = live.cancelled()
                    if not live.retry:
                        raise failure from None
                if failure is None or failed is not None or not retriable(failure):
                    if reply is None:
                        assert failure is not None
                        raise failure
                    break
                failed = retry_from(record, failure)
            status = reply.status
            if status >= 400:
                record.fail(error_type(upstream_error(status, reply.raw, reply.headers)))
            elif b'"usage"' in reply.raw:
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
            self.live.discard(live)
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
