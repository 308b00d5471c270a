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
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from cortex.core.errors import ApiError
from cortex.core.logs import log_event, request_id_var
from cortex.core.sse import EVENT_END, event_data
from cortex.gateway.accounting import Accounting, RequestRecord, error_type
from cortex.gateway.affinity import prefix_key
from cortex.gateway.keepalive import with_keepalive
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
    # Requests on their way to a neuron, which `cut_all` (shutdown) and `node_lost` can end early.
    live: set[Cuttable] = field(default_factory=set)

    def resolve(self, model: Any) -> str:
        """The model id a client's `model` names (alias resolved); ApiError 400/404 otherwise."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must be a non-empty string", param="model", code="invalid_model")
        model_id = self.router.resolve(model)
        check_model(model_id)  # the request's API key may be limited to some models (limits.py)
        return model_id

    def cut_all(self, err: ApiError) -> int:
        """End every request in flight with `err` (the drain timeout ran out): an error event, not a close."""
        cut = list(self.live)
        for request in cut:
            request.cut(err, retry=False)
        return len(cut)

    def node_lost(self, node: str, silent_for_s: float) -> int:
        """The poller found `node` unreachable: end its requests that heard nothing from it, or none for `silent_for_s`.

        Those with no output yet are retried elsewhere (or wait for a recovery); a stream that
        already sent output ends with a `stream_interrupted` event now, not at its idle timeout.
        A stream still receiving events is left alone: the neuron is busy, not gone.
        """
        now = time.perf_counter()
        lost = ApiError(502, f"neuron '{node}' stopped answering its health checks", code="stream_interrupted")
        cut = [r for r in self.live if r.record.node == node and (r.unheard() or now - r.last_read >= silent_for_s)]
        for request in cut:
            request.cut(lost, retry=True)
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
                        failure = retriable_reply(reply)
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


# A neuron's failures before a request produced output: another replica (or the recovered one) may serve it.
RETRIABLE_CODES = frozenset(
    {"model_poisoned", "model_recovering", "draining", "shutting_down", "stream_interrupted", "upstream_unreachable"}
)


def retriable(err: ApiError) -> bool:
    """A failure of the neuron, not of the request: never a 4xx (bad input stays bad), never a timeout."""
    return err.status >= 500 and err.code in RETRIABLE_CODES


def retriable_reply(reply: Reply) -> ApiError | None:
    """A whole answer that is a neuron failure worth one retry (a device fault, a recovery, a shutdown)."""
    if reply.status != 503:
        return None
    err = upstream_error(reply.status, reply.raw, reply.headers)
    return err if retriable(err) else None


def retry_from(record: RequestRecord, failure: ApiError) -> tuple[str, str]:
    """Log the one retry of a request that failed on its node before any output; (node, why) for Upstream.open."""
    node = record.node or "-"
    log_event(log, "upstream.retry", logging.WARNING, node=node, error=failure.code, reason=failure.message[:200])
    return node, f"neuron '{node}' failed before answering: {failure.message}"


def error_event(data: bytes) -> ApiError | None:
    """The error an OpenAI stream event carries (a neuron's fault mid-stream), with the status it stands for."""
    if b'"error"' not in data:
        return None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(chunk, dict) or "error" not in chunk or "choices" in chunk:
        return None
    error = chunk["error"] if isinstance(chunk["error"], dict) else {}
    status = _EVENT_STATUS.get(str(error.get("type")), 502)
    if error.get("code") in RETRIABLE_CODES:
        status = 503
    return upstream_error(status, data, None)


_EVENT_STATUS = {"invalid_request_error": 400, "rate_limit_error": 429, "not_found_error": 404}


def opening_chunk(data: bytes) -> bool:
    """Whether a chunk is a chat stream's opening (the assistant role, no text): not output yet."""
    if b'"role":"assistant"' not in data:
        return False
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not choices or chunk.get("usage"):
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None or choice.get("logprobs"):
            return False
        delta = choice.get("delta")
        if not isinstance(delta, dict) or any(value for key, value in delta.items() if key != "role"):
            return False
    return True


class Cuttable:
    """A request the relay can end early: with `err` as its error, retried (`retry`) when no output went out."""

    record: RequestRecord
    last_read: float  # perf_counter of the last bytes heard from the neuron (the request's start at first)
    cut_error: ApiError | None = None
    retry: bool = False

    def cut(self, err: ApiError, *, retry: bool) -> None:
        raise NotImplementedError

    def unheard(self) -> bool:
        """Whether nothing came from the neuron yet (a whole answer arrives at once: never before its end)."""
        return self.last_read == self.record.started

    def cancelled(self) -> ApiError:
        """The cut's error when the cancellation being handled is the cut's; re-raises any other."""
        err, task = self.cut_error, asyncio.current_task()
        if err is None or task is None or task.uncancel() > 0:
            raise asyncio.CancelledError
        self.cut_error = None  # a retry can be cut again
        return err


class LiveFetch(Cuttable):
    """A whole-answer request in flight: nothing reached its client, so a cut cancels the wait."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.last_read = record.started
        self.task = asyncio.current_task()

    def cut(self, err: ApiError, *, retry: bool) -> None:
        # Its own task cutting it (a probe it awaits found the node lost) is already handling that failure.
        if self.cut_error is None and self.task is not None and self.task is not asyncio.current_task():
            self.cut_error, self.retry = err, retry
            self.task.cancel()


class RelayStream(Cuttable):
    """The async context manager `Relay.stream` returns; iterating it yields whole SSE events, `[DONE]` excluded.

    Entering it opens the stream and reads up to the neuron's first output (the chat's opening
    chunk and the neuron's keep-alives are not output): a failure of the neuron before then is
    retried once (`retriable`), so the caller has sent its client nothing but headers, its
    dialect's opening events and keep-alives. The first output must come within
    `first_byte_timeout_s` (keep-alives or not); later, every gap within `stream_idle_timeout_s`.
    """

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
        self.last_read = self.record.started
        self.exchange: Exchange | None = None
        self.done = False
        self._finished = False
        self._held: list[bytes] = []  # read before the first output; yielded first
        self._opening: asyncio.Task[Any] | None = None  # the task entering the stream, while it does

    def cut(self, err: ApiError, *, retry: bool) -> None:
        if self.cut_error is not None or self.done:
            return
        if self._opening is not None:
            if self._opening is asyncio.current_task():
                return  # a probe this request awaits found its node lost: it is handling that failure already
            self.cut_error, self.retry = err, retry
            self._opening.cancel()  # no output yet: the attempt ends, and is retried if `retry`
            return
        self.cut_error, self.retry = err, retry
        if self.exchange is not None:
            self.exchange.response.close()  # the read fails and raises the cut's error

    async def __aenter__(self) -> RelayStream:
        self.relay.live.add(self)
        self._opening = asyncio.current_task()
        try:
            model_id = self.relay.resolve(self.model)
            self.record.model = model_id
            if self.check is not None:
                self.check()
            payload = orjson.dumps(stream_body(self.body, model_id))
            prefix = prefix_key(self.body) if self.path == CHAT_PATH else None
            failed: tuple[str, str] | None = None
            while True:
                try:
                    failure = await self._attempt(model_id, payload, prefix, failed)
                except asyncio.CancelledError:
                    failure = self.cancelled()
                    self._close_exchange()
                    if not self.retry:
                        raise failure from None
                if failure is None:
                    break
                if failed is not None or not retriable(failure):
                    raise failure
                failed = retry_from(self.record, failure)
        except BaseException as exc:
            self._opening = None
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._opening = None
        return self

    def _close_exchange(self) -> None:
        if self.exchange is not None:
            self.exchange.close(abort=True)
            self.exchange = None
        self._held = []

    async def _attempt(
        self, model_id: str, payload: bytes, prefix: bytes | None, failed: tuple[str, str] | None
    ) -> ApiError | None:
        """Open the stream on a replica and read to its first output; the neuron's failure before it, if any."""
        upstream = self.relay.upstream
        self.exchange = await upstream.open(
            model_id,
            self.path,
            payload,
            self.record,
            request_id_var.get(),
            self.keepalive,
            prefix,
            stream=True,
            failed=failed,
        )
        response = self.exchange.response
        if response.status != 200:
            raw = await self.exchange.read()
            self.exchange = None  # read() closed it
            return upstream_error(response.status, raw, response.headers)
        limit = upstream.first_byte_timeout_s
        try:
            async with asyncio.timeout(limit):
                if self.keepalive is None:
                    failure = await self._first_output()
                else:
                    failure = await with_keepalive(
                        self._first_output(), self.relay.keepalive_interval_s, self.keepalive
                    )
        except TimeoutError:
            node = self.exchange.node
            failure = ApiError(504, f"neuron '{node}' sent no output within {limit:g} s", code="upstream_timeout")
        if failure is not None:
            self._close_exchange()
        return failure

    async def _first_output(self) -> ApiError | None:
        assert self.exchange is not None
        node = self.exchange.node
        content = self.exchange.response.content
        while True:
            try:
                event = await content.readuntil(EVENT_END, max_size=MAX_EVENT_BYTES)
            except STREAM_ERRORS as exc:
                log_event(log, "upstream.stream_broken", logging.WARNING, node=node, error=describe(exc))
                return interrupted(node, plain_reason(exc))
            self.last_read = time.perf_counter()
            if not event.endswith(EVENT_END):
                return interrupted(node, "the stream ended before [DONE]")
            data = event_data(event)
            if data is None:
                continue  # the neuron's keep-alive: its client hears the gateway's own
            failure = error_event(data)
            if failure is not None:
                return failure
            self._held.append(event)
            if not opening_chunk(data):
                return None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    def _broken(self, node: str, detail: str) -> ApiError:
        return self.cut_error if self.cut_error is not None else interrupted(node, detail)

    async def _events(self) -> AsyncIterator[bytes]:
        assert self.exchange is not None
        node = self.exchange.node
        content = self.exchange.response.content
        observe = self.record.observe
        held, self._held = self._held, []
        for event in held:
            if event.startswith(b"data: [DONE]"):
                self.done = True
                return
            observe(event, time.perf_counter())
            yield event
        while True:
            try:
                event = await content.readuntil(EVENT_END, max_size=MAX_EVENT_BYTES)
            except STREAM_ERRORS as exc:
                if self.cut_error is None:
                    log_event(log, "upstream.stream_broken", logging.WARNING, node=node, error=describe(exc))
                raise self._broken(node, plain_reason(exc)) from None
            if not event.endswith(EVENT_END):
                raise self._broken(node, "the stream ended before [DONE]")
            if event.startswith(b"data: [DONE]"):
                self.done = True
                return
            now = self.last_read = time.perf_counter()
            observe(event, now)
            yield event

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.relay.live.discard(self)
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
