"""The gateway's HTTP/1.1 client for inference requests to neurons: pooled keep-alive connections, nothing more.

Every proxied request crosses this client, so its cost is the gateway's cost. aiohttp's
`ClientSession` spent about 240 µs of CPU per request here (cookies, tracing hooks, header
merging, per-request timers and payload objects: general machinery a neuron call never uses),
more than the gateway's own server side and routing together. This client does what the neuron
contract needs and no more: a POST with a byte body; an answer with `Content-Length` or chunked
encoding, parsed by httptools (llhttp, the parser of Node.js, in C); the connection kept for the
next request. About a fifth of the CPU (benchmarks/gateway.py measures the whole gateway).

    response = await client.post(url, body, headers, timeouts)   # once the status line and headers arrived
    event = await response.readuntil(b"\\n\\n", max_size)           # or: body = await response.read()
    response.release()                                            # back to the pool (or close(): abort)

Failures are typed by what they mean to the relay: `NeuronConnectError` (no connection, or it
closed before the answer began: the neuron never answered), `NeuronBodyError` (the answer broke
off mid-way), `NeuronReadTimeout` / `NeuronConnectTimeout` (both `TimeoutError`s), and
`EventTooLarge`. The control routes (`/health`, `/models/load`, …) stay on aiohttp's session:
they are rare, and not worth a second client.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# Buffered body bytes at which reading from the neuron pauses until the relay catches up.
_HIGH_WATER = 1 << 16
# An idle pooled connection older than this is closed rather than reused (aiohttp servers drop them at 75 s).
KEEPALIVE_S = 30.0


class NeuronConnectError(ConnectionError):
    """No connection, or the connection closed before the answer's status line: the neuron never answered."""


class NeuronBodyError(ConnectionError):
    """The answer broke off: the connection closed, or the neuron sent bad HTTP, after the status line."""


class NeuronReadTimeout(TimeoutError):
    """Nothing arrived from the neuron within the read timeout (the headers, or the next bytes of the body)."""


class NeuronConnectTimeout(TimeoutError):
    """No connection within the connect timeout."""


class EventTooLarge(ConnectionError):
    """`readuntil` found no separator within `max_size` bytes."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    read_s: float | None  # the wait for the headers, then for each next piece of the body; None: unbounded


class NeuronResponse:
    """A neuron's answer whose status line and headers arrived; the body is read from it as it comes."""

    __slots__ = ("_conn", "_done", "_error", "_paused", "_waiter", "buffer", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self.buffer = bytearray()
        self._done = False  # the whole body arrived
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- fed by the connection -------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake(None)

    def _finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self._done = True
            if self._paused and self._conn is not None:  # the connection may be reused: reading must go on
                self._paused = False
                self._conn.transport.resume_reading()
        elif not self._done and self._error is None:
            self._error = error
        self._wake(error)

    def _wake(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # -- read by the relay -----------------------------------------------------------------------
    async def _more(self) -> None:
        """Wait for more body bytes, the body's end or a failure, within the read timeout."""
        if self._error is not None:
            raise self._error
        conn = self._conn
        if conn is None:
            raise NeuronBodyError("the response was closed")
        if self._paused:
            self._paused = False
            conn.transport.resume_reading()
        loop = conn.loop
        self._waiter = waiter = loop.create_future()
        timeout = conn.read_timeout_s
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def read(self) -> bytes:
        """The whole body (then the connection goes back to the pool when `release`d)."""
        while not self._done:
            await self._more()
        return bytes(self.buffer)  # kept: a second read returns the same body

    async def readuntil(self, separator: bytes, max_size: int) -> bytes:
        """Bytes up to and including the next `separator`; at the body's end, what is left (possibly b"")."""
        while True:
            chunk = self.take(separator, max_size)
            if chunk is not None:
                return chunk
            if self._done:
                chunk = bytes(self.buffer)
                self.buffer.clear()
                return chunk
            await self._more()

    def take(self, separator: bytes, max_size: int) -> bytes | None:
        """What `readuntil` returns when it is already here, without waiting; else None."""
        found = self.buffer.find(separator)
        if found < 0:
            if len(self.buffer) > max_size:
                raise EventTooLarge(f"an event is longer than {max_size} bytes")
            return None
        end = found + len(separator)
        if end > max_size:
            raise EventTooLarge(f"an event is longer than {max_size} bytes")
        chunk = bytes(self.buffer[:end])
        del self.buffer[:end]
        return chunk

    def release(self) -> None:
        """Done with the answer: its connection is reused when the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(reuse=self._done and self._error is None)

    def close(self) -> None:
        """Abort: close the connection now (the neuron sees its client gone and stops generating)."""
        conn, self._conn = self._conn, None
        self._finish(NeuronBodyError("the response was closed"))
        if conn is not None:
            conn.finished(reuse=False)


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(NeuronReadTimeout(f"nothing from the neuron within {timeout:g} s"))


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to a neuron and its response parser; one request at a time."""

    def __init__(self, pool: NeuronClient, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.read_timeout_s: float | None = None
        self._raw_headers: list[tuple[str, str]] = []
        self._head: asyncio.Future[NeuronResponse] | None = None
        self.response: NeuronResponse | None = None
        self._complete = False
        self._keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the neuron sent bad HTTP: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self._fail("the connection closed")

    def _fail(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
        if self._head is not None and not self._head.done():
            self._head.set_exception(NeuronConnectError(reason))
        if self.response is not None and not self._complete:
            self.response._finish(NeuronBodyError(reason))

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        self._raw_headers = []
        self._keep_alive = self.parser.should_keep_alive()
        self.response = NeuronResponse(self, self.parser.get_status_code(), headers)
        if self._head is not None and not self._head.done():
            self._head.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        self._complete = True
        if self.response is not None:
            self.response._finish()

    # -- one request -----------------------------------------------------------------------------
    async def request(self, head: bytes, body: bytes, read_timeout_s: float | None) -> NeuronResponse:
        self._complete = False
        self.response = None
        self.read_timeout_s = read_timeout_s
        self._head = head_future = self.loop.create_future()
        self.transport.write(head + body)
        timer = None
        if read_timeout_s is not None:
            timer = self.loop.call_later(read_timeout_s, _head_expired, head_future, read_timeout_s)
        try:
            return await head_future
        finally:
            self._head = None
            if timer is not None:
                timer.cancel()

    def finished(self, *, reuse: bool) -> None:
        if reuse and self._complete and self._keep_alive and not self.closed:
            self.response = None
            self.idle_since = time.monotonic()
            self.pool.idle(self)
        elif not self.closed:
            self.closed = True
            self.transport.close()


def _head_expired(future: asyncio.Future[NeuronResponse], timeout: float) -> None:
    if not future.done():
        future.set_exception(NeuronReadTimeout(f"no answer from the neuron within {timeout:g} s"))


class NeuronClient:
    """Keep-alive connections to the neurons, reused most recently idle first."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def post(self, url: URL, body: bytes, headers: dict[str, str], timeouts: Timeouts) -> NeuronResponse:
        """Send; returns once the answer's status line and headers arrived (a non-2xx status is not raised)."""
        key = (url.scheme, url.raw_host or "", url.port or 80)
        for value in headers.values():
            if "\r" in value or "\n" in value:
                raise ValueError("a header value contains a line break")
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        host = f"[{key[1]}]" if ":" in key[1] else key[1]  # an IPv6 address is bracketed in Host
        head = f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {host}:{key[2]}\r\n{lines}Content-Length: {len(body)}\r\n\r\n"
        conn = self._reuse(key)
        if conn is None:
            conn = await self._connect(key, timeouts.connect_s)
        try:
            return await conn.request(head.encode("latin-1"), body, timeouts.read_s)
        except BaseException:
            conn.finished(reuse=False)  # cancelled or failed mid-request: the connection's state is unknown
            raise

    def _reuse(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.finished(reuse=False)
        return None

    async def _connect(self, key: tuple[str, str, int], timeout_s: float) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._tls() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key), host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise NeuronConnectTimeout(f"no connection within {timeout_s:g} s") from None
        except OSError as exc:
            raise NeuronConnectError(exc.strerror or str(exc) or type(exc).__name__) from exc
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def idle(self, conn: _Connection) -> None:
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.finished(reuse=False)
        self._idle.clear()
