"""A streamed answer from a neuron, as `Relay.stream` returns it: opened, retried, read one event at a time.

Entering it routes and opens the stream (upstream.py) and reads up to the neuron's first output,
retrying once a failure of the neuron before then (failover.py); iterating it yields whole SSE
events, `[DONE]` excluded, each observed by the request's record; leaving it closes the neuron
connection (aborted unless the stream ended, which cancels the generation there) and publishes
the request's accounting once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Protocol

import orjson

from cortex.core.errors import ApiError
from cortex.core.logs import log_event, request_id_var
from cortex.core.sse import EVENT_END, event_data
from cortex.gateway.accounting import Accounting, RequestRecord, error_type
from cortex.gateway.affinity import prefix_key
from cortex.gateway.failover import Cuttable, error_event, opening_chunk, retriable, retry_from
from cortex.gateway.keepalive import with_keepalive
from cortex.gateway.neuron_client import describe, plain_reason
from cortex.gateway.router import KeepAlive
from cortex.gateway.upstream import STREAM_ERRORS, Exchange, Upstream, upstream_error

log = logging.getLogger("cortex.gateway.relay")

# Status logged for a request whose client went away before an answer (nginx's convention).
CLIENT_CLOSED = 499
# One SSE event may carry long tool-call arguments: read events up to this size.
MAX_EVENT_BYTES = 16 * 1024 * 1024

Check = Callable[[], object]
# Generation requests are routed with prefix affinity (a token count warms no cache).
CHAT_PATH = "/v1/chat/completions"


class StreamHost(Protocol):
    """What a stream uses of the relay that opens it."""

    upstream: Upstream
    accounting: Accounting
    keepalive_interval_s: float
    live: set[Cuttable]

    def resolve(self, model: Any) -> str: ...


def stream_body(body: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The body sent to the neuron for a stream: model id, and usage always asked for (metrics need it)."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    return {**body, "model": model_id, "stream": True, "stream_options": options}


def interrupted(node: str, detail: str) -> ApiError:
    return ApiError(502, f"neuron '{node}' stopped mid-stream: {detail}", code="stream_interrupted")


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
        relay: StreamHost,
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
        response = self.exchange.response
        while True:
            try:
                event = await response.readuntil(EVENT_END, MAX_EVENT_BYTES)
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
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """The events as they arrive, `[DONE]` excluded, those that arrived together in one list (one write).

        A neuron's events come one per decode step; those that queued up while the gateway was busy
        go to the client in one write, not one each, so a loaded gateway spends less per event.
        `done` is already true when the last batch is yielded, so its write can end the stream too.
        """
        assert self.exchange is not None
        node = self.exchange.node
        response = self.exchange.response
        observe = self.record.observe
        arrived, self._held = self._held, []
        now = time.perf_counter()
        while True:
            batch: list[bytes] = []
            for event in arrived:
                if event.startswith(b"data: [DONE]"):
                    self.done = True  # set before the last batch (possibly empty) is yielded
                    yield batch
                    return
                observe(event, now)
                batch.append(event)
            if batch:
                yield batch
            try:
                event = await response.readuntil(EVENT_END, MAX_EVENT_BYTES)
                if not event.endswith(EVENT_END):
                    raise self._broken(node, "the stream ended before [DONE]")
                arrived = [event]
                while (more := response.take(EVENT_END, MAX_EVENT_BYTES)) is not None:
                    arrived.append(more)
            except STREAM_ERRORS as exc:
                if self.cut_error is None:
                    log_event(log, "upstream.stream_broken", logging.WARNING, node=node, error=describe(exc))
                raise self._broken(node, plain_reason(exc)) from None
            now = self.last_read = time.perf_counter()

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
