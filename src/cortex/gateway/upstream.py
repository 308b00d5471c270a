"""Reaching a replica of a model: route, connect, retry a refused connection elsewhere, hold the lease.

`Upstream.open` returns an `Exchange` once the neuron's response headers arrived; what to do with
the body (read it whole, relay its events) is relay.py's. Built from its collaborators alone:

- the router (picks a replica and counts the request on it: the lease),
- the HTTP client to the neurons (neuron_http.py),
- `probe`, the poller's quick poll of a node a request could not reach,
- the node table (names, endpoints, auth headers) and the connect timeout.

A connection failure before the neuron saw the request is retried on another replica (or after a
cold load elsewhere): inference has no side effects. The failed node is probed, and routed around
when the probe fails too (docs/gateway.md, "Routing a request").

A request that failed on a neuron before any output (failover.py says which failures those are)
is opened once more with `failed` naming that neuron: on another replica that has the model
loaded; else, when the model is recovering, on the first replica that is loaded again, waiting at
most `first_byte_timeout_s` (the client hears keep-alives meanwhile); else as after a connection
failure (another node, a cold load there, or 502). docs/reliability.md, "Failover".

Per-phase timeouts (docs/reliability.md): connecting (`connect_timeout_s`); the answer's first byte
and, for a stream, every gap between its bytes (`stream_idle_timeout_s`); a whole non-streamed
answer, which arrives at once when generation ends (`first_byte_timeout_s`). A neuron that does not
answer in time is probed and the request tried on another replica, else 504 `upstream_timeout`; a
stream that goes silent ends with a `stream_interrupted` error event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from cortex.core.errors import ApiError
from cortex.core.logs import REQUEST_ID_HEADER, log_event
from cortex.core.neuron_api import RECOVERY_STATUSES, ModelStatus
from cortex.gateway.accounting import RequestRecord
from cortex.gateway.keepalive import with_keepalive
from cortex.gateway.neuron_client import decode, describe, plain_reason
from cortex.gateway.neuron_http import NeuronClient, NeuronConnectError, NeuronConnectTimeout, NeuronResponse, Timeouts
from cortex.gateway.router import KeepAlive, Lease, Router
from cortex.gateway.state import Node

log = logging.getLogger("cortex.gateway.upstream")

# Connection failures that happen before the neuron answered (or while it was dying).
CONNECTION_ERRORS = (NeuronConnectError,)
# A neuron's answer breaking: cut connection, bad chunking, silence, or an event beyond the size limit.
STREAM_ERRORS = (ConnectionError, TimeoutError)

Probe = Callable[[Node], Awaitable[bool]]
# How often a request waiting for its model's recovery looks at the fleet state (the poller refreshes it).
_RECOVERY_CHECK_S = 0.2


@dataclass(slots=True)
class Exchange:
    """An open request to a neuron: the lease on the replica and the neuron's response (headers read)."""

    lease: Lease
    response: NeuronResponse

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

    async def read(self) -> bytes:
        """The whole body; the exchange is closed whatever happens (its lease too)."""
        try:
            raw = await self.response.read()
        except STREAM_ERRORS as exc:
            self.close(abort=True)
            log_event(log, "upstream.read_failed", logging.WARNING, node=self.node, error=describe(exc))
            raise ApiError(
                502, f"neuron '{self.node}' failed mid-response: {plain_reason(exc)}", code="upstream_unreachable"
            ) from None
        except BaseException:
            self.close(abort=True)  # cancelled: the client went away, so the neuron must stop too
            raise
        self.close(abort=False)
        return raw


class Upstream:
    def __init__(
        self,
        router: Router,
        client: NeuronClient,
        probe: Probe,
        nodes: dict[str, Node],
        connect_timeout_s: float,
        *,
        first_byte_timeout_s: float | None = None,
        stream_idle_timeout_s: float | None = None,
    ) -> None:
        self.router = router
        self.client = client
        self.probe = probe
        self.nodes = nodes
        self.first_byte_timeout_s = first_byte_timeout_s or 600.0
        self._timeout = Timeouts(connect_timeout_s, first_byte_timeout_s)
        # The read timeout bounds the wait for the headers and then every gap between bytes of the stream.
        self._stream_timeout = Timeouts(connect_timeout_s, stream_idle_timeout_s)
        self._urls: dict[tuple[str, str], URL] = {}
        self._headers = {n.name: {"Content-Type": "application/json", **n.auth_headers()} for n in nodes.values()}

    async def open(
        self,
        model_id: str,
        path: str,
        payload: bytes,
        record: RequestRecord,
        request_id: str,
        keepalive: KeepAlive | None = None,
        prefix: bytes | None = None,
        *,
        stream: bool = False,
        failed: tuple[str, str] | None = None,
    ) -> Exchange:
        """Route (cold-loading if needed) and send; returns once the neuron's response headers arrived.

        `prefix`: the key of the prompt's stable beginning, for prefix affinity (affinity.py).
        `failed`: (node, why) when this is the retry of a request that failed there before any output.
        """
        excluded: set[str] = set()
        failures: list[str] = []
        timeout = self._stream_timeout if stream else self._timeout
        lease: Lease | None = None
        if failed is not None:
            failures.append(failed[1])
            lease = await self._replacement(model_id, failed[0], keepalive, prefix)
            if lease is None:
                excluded.add(failed[0])
        while True:
            if lease is None:
                lease = await self._route(model_id, keepalive, excluded, failures, prefix)
            node = lease.node
            record.node = node.name
            headers = {**self._headers[node.name], REQUEST_ID_HEADER: request_id}
            try:
                response = await self.client.post(self._url(node.endpoint, path), payload, headers, timeout)
                if response.status == 503 and await _draining(response):
                    # The neuron is shutting down (SIGTERM): nothing was generated, so another replica may serve.
                    response.release()
                    lease.release()
                    failures.append(f"neuron '{node.name}' is draining")
                    excluded.add(node.name)
                    await self.probe(node)  # its /health says draining (503): marked unhealthy, routed around
                    lease = None
                    continue
                return Exchange(lease, response)
            except TimeoutError as exc:  # no connection, or no answer, in time
                lease.release()
                lease = None
                waited = timeout.connect_s if isinstance(exc, NeuronConnectTimeout) else timeout.read_s
                failures.append(f"neuron '{node.name}' did not answer within {waited:g} s")
                log_event(log, "upstream.timeout", logging.WARNING, node=node.name, waited_s=waited)
                excluded.add(node.name)  # never the same node twice; the probe marks a hung one unhealthy
                await self.probe(node)
                if len(excluded) >= len(self.nodes):
                    raise ApiError(504, "; ".join(failures), code="upstream_timeout", retry_after=5) from None
            except CONNECTION_ERRORS as exc:
                lease.release()
                lease = None
                failures.append(f"neuron '{node.name}' is unreachable: {plain_reason(exc)}")
                log_event(log, "upstream.connect_failed", logging.WARNING, node=node.name, error=describe(exc))
                # A stale pooled connection fails once on a live node: retry it only if it answers a probe.
                if not await self.probe(node) or len(failures) > 1:
                    excluded.add(node.name)
                if len(failures) > len(self.nodes):
                    raise ApiError(502, "; ".join(failures), code="upstream_unreachable") from None
            except BaseException:
                lease.release()
                raise

    async def _replacement(
        self, model_id: str, failed: str, keepalive: KeepAlive | None, prefix: bytes | None
    ) -> Lease | None:
        """Where a request that failed on `failed` goes now: another loaded replica, or the model's
        first replica loaded again after its recovery; None: route it as after a connection failure.

        The failed node is probed first, so the fleet state shows what happened there (poisoned,
        recovering, draining, gone) before anything is picked.
        """
        node = self.nodes.get(failed)
        if node is not None:
            await self.probe(node)
        lease = self.router.pick(model_id, {failed}, prefix)
        if lease is not None or not self._recovering(model_id):
            return lease
        wait = self._recovered(model_id, prefix)
        if keepalive is None:
            return await wait
        return await with_keepalive(wait, self.router.keepalive_interval_s, keepalive)

    def _recovering(self, model_id: str) -> bool:
        """Whether a healthy node is reloading the model (after a device fault, or a load under way)."""
        for node in self.nodes.values():
            replica = node.replicas.get(model_id) if node.healthy else None
            if replica is not None and (replica.status in RECOVERY_STATUSES or replica.status == ModelStatus.LOADING):
                return True
        return False

    async def _recovered(self, model_id: str, prefix: bytes | None) -> Lease | None:
        """A lease on the first replica routable again, within `first_byte_timeout_s`; 503 after it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_byte_timeout_s
        log_event(log, "upstream.await_recovery", model=model_id, within_s=self.first_byte_timeout_s)
        while loop.time() < deadline:
            lease = self.router.pick(model_id, prefix=prefix)
            if lease is not None:
                return lease
            if not self._recovering(model_id):
                return None  # the recovery failed, or its node went away: route as after a failure
            await asyncio.sleep(_RECOVERY_CHECK_S)
        raise ApiError(
            503,
            f"'{model_id}' is still recovering after {self.first_byte_timeout_s:g} s; retry shortly",
            code="model_recovering",
            retry_after=self.router.retry_after_s,
        )

    def _url(self, endpoint: str, path: str) -> URL:
        """Parsed once per neuron and path: parsing a URL string on every request is measurable."""
        key = (endpoint, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL(endpoint + path)
        return url

    async def _route(
        self,
        model_id: str,
        keepalive: KeepAlive | None,
        excluded: set[str],
        failures: list[str],
        prefix: bytes | None,
    ) -> Lease:
        if not failures:
            return await self.router.route(model_id, keepalive=keepalive, prefix=prefix)
        try:
            return await self.router.route(model_id, keepalive=keepalive, exclude=excluded, prefix=prefix)
        except ApiError as err:
            # The client asked a neuron that is gone: say so, with why no other could step in.
            message = f"{'; '.join(failures)}; no other replica could take the request: {err.message}"
            raise ApiError(502, message, code="upstream_unreachable") from None


class UpstreamError(ApiError):
    """A neuron's own error answer: its status, message, type and code, and the body as it was sent."""

    def __init__(self, status: int, raw: bytes, content_type: str | None, **fields: Any) -> None:
        super().__init__(status, fields.pop("message"), **fields)
        self.raw = raw
        self.content_type = content_type or "application/json"


def upstream_error(status: int, raw: bytes, headers: CIMultiDict[str] | Any) -> UpstreamError:
    """A neuron's error response as an ApiError keeping its status, message, type, code and details."""
    body = decode(raw)
    err = body.get("error") if isinstance(body, dict) else None
    retry_after = None
    content_type = None
    if headers is not None:
        content_type = headers.get("Content-Type")
        if headers.get("Retry-After"):
            try:
                retry_after = float(headers["Retry-After"])
            except ValueError:
                retry_after = None
    if isinstance(err, dict):
        return UpstreamError(
            status,
            raw,
            content_type,
            message=str(err.get("message") or f"neuron error {status}"),
            type=err.get("type"),
            param=err.get("param"),
            code=err.get("code"),
            retry_after=retry_after,
            details={k: v for k, v in err.items() if k not in ("message", "type", "param", "code")},
        )
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    return UpstreamError(
        status, raw, content_type, message=text[:500] or f"neuron error {status}", retry_after=retry_after
    )


async def _draining(response: NeuronResponse) -> bool:
    """Whether a 503 is a neuron's drain refusal (hardening/http.py `Drain`); the body is read either way."""
    body = decode(await response.read())
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("code") == "draining"
