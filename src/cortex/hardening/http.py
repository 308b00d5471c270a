"""Everything a request can get wrong before a handler runs, answered as JSON in the caller's dialect.

aiohttp answers some failures itself, in plain text, before any middleware sees the request:
oversized or malformed request lines and headers (400 text), bodies in an encoding it cannot
decode (400 text, or a 500 once the handler reads a corrupt gzip body, which also leaves the
keep-alive connection unusable for the next request). Clients of both daemons parse every error
body as JSON, so:

- `HardenedRunner` serves an app with a request handler whose protocol errors are JSON (431 for
  oversized headers, 400 for malformed requests), turns aiohttp's own body decoding off, and
  keeps the `Server` version banner out of every response.
- `harden(app, render, ...)` adds the outermost middleware: it decodes `gzip`/`deflate` bodies
  itself (bounded by the body limit *after* decompression, so a small bomb cannot expand),
  refuses other encodings with 415, and answers anything a handler let escape as a JSON error
  rendered by the app's own `render` (the route's dialect), never aiohttp's text page.

Decoding in the middleware instead of the parser keeps a corrupt body that request's own 400: the
parser never fails mid-body, so the connection and the next request on it are untouched.

The same middleware counts requests in flight for a graceful stop (`Drain`, `app[DRAIN]`): once a
daemon drains, new requests get 503 + Retry-After (`/health` says `draining`, so a gateway routes
around a draining neuron) while the ones in flight finish, up to the daemon's `drain_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from cortex.core.errors import ApiError, anthropic_error_type

log = logging.getLogger("cortex.hardening")

Render = Callable[[web.Request, ApiError], web.StreamResponse]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What both daemons say in `Server`: the product, never a version an attacker can look up.
SERVER_NAME = "cortex"
# zlib window bits: 32 + 15 accepts a gzip or a zlib header; -15 is raw deflate (some clients send it).
_DECODERS: dict[str, tuple[int, ...]] = {"gzip": (31,), "x-gzip": (31,), "deflate": (47, -15)}
_IDENTITY = frozenset({"", "identity"})
# Deeper JSON is refused up front: orjson cannot re-serialise past 255 levels and chat templates
# recurse per level, so a deep body would fail as a 500 far from where it came in. No API body nests this deep.
MAX_JSON_DEPTH = 128


def any_dialect_error_body(err: ApiError) -> dict[str, Any]:
    """One body that is a valid error in both dialects, for failures that happen before the route is known.

    OpenAI clients read `error.message`/`type`/`code`; Anthropic clients read the top-level
    `type: "error"` and `error.type`/`message`. The type is Anthropic's, which OpenAI clients accept.
    """
    body = err.openai_body()
    body["type"] = "error"
    body["error"]["type"] = anthropic_error_type(err.status)
    return body


def protocol_error(status: int, exc: BaseException | None) -> ApiError:
    """What aiohttp's parser rejected, as an ApiError (the client's input is not echoed back)."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message):
        return ApiError(
            431,
            "Request header fields too large: a request line or header is over the limit, or there are too many",
            code="request_header_fields_too_large",
        )
    if status < 500:
        return ApiError(status, "Malformed HTTP request", code="bad_http_request")
    if status == 504:
        return ApiError(504, "The request timed out in the server", code="timeout")
    return ApiError(500, "Internal error in the server; see its log", code="internal_error")


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler with its text error pages replaced by JSON error bodies."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 and not isinstance(exc, ConnectionError):  # a client that went away is not an error
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            self.log_debug("Bad request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:  # as aiohttp does: an answer already started cannot be replaced
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        err = protocol_error(status, exc)
        response = web.Response(
            body=orjson.dumps(any_dialect_error_body(err)),
            status=err.status,
            content_type="application/json",
            headers={"Server": SERVER_NAME},
        )
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class HardenedRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer protocol errors in JSON and never decode bodies themselves.

    Keyword arguments go to aiohttp as for `AppRunner` (`handler_cancellation`, `access_log`, …).
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("auto_decompress", False)  # harden()'s middleware decodes, bounded and per request
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same state, only the connection handler class differs
        return server


class Drain:
    """Requests in flight, and whether the daemon is stopping (then new ones are refused with 503)."""

    def __init__(self, retry_after_s: float = 5.0) -> None:
        self.draining = False
        self.in_flight = 0
        self.retry_after_s = retry_after_s
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests from now on; True once those in flight finished, False after `timeout_s`."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def refusal(self, request: web.Request, render: Render) -> web.StreamResponse:
        headers = {"Retry-After": str(max(1, round(self.retry_after_s)))}
        if request.path == "/health":  # what load balancers and the gateway's poller read: route elsewhere
            return web.json_response({"status": "draining"}, status=503, headers=headers)
        return render(
            request,
            ApiError(503, "this server is shutting down: retry", code="draining", retry_after=self.retry_after_s),
        )


DRAIN: web.AppKey[Drain] = web.AppKey("drain", Drain)


def harden(app: web.Application, render: Render, *, max_body_bytes: int) -> web.Application:
    """Add body decoding, the last-resort JSON error, draining and the banner removal to `app` (before startup)."""
    app[DRAIN] = Drain()
    app.middlewares.insert(0, _guard(render, max_body_bytes))
    app.on_response_prepare.append(_no_banner)
    return app


async def _no_banner(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


def _guard(render: Render, max_body_bytes: int) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        drain = request.app[DRAIN]
        if drain.draining:
            return drain.refusal(request, render)
        drain.enter()
        try:
            await decode_body(request, max_body_bytes)
            await check_json_depth(request)
            return await handler(request)
        except ApiError as err:
            return render(request, err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return render(request, _from_http_exception(exc, max_body_bytes))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return render(request, ApiError(500, "Internal error in the server; see its log", code="internal_error"))
        finally:
            drain.leave()

    return guard


def _from_http_exception(exc: web.HTTPException, max_body_bytes: int) -> ApiError:
    if exc.status == 413:
        return ApiError(
            413, f"Request body is larger than the limit of {max_body_bytes} bytes", code="request_too_large"
        )
    return ApiError(exc.status, exc.reason or "error")


async def decode_body(request: web.Request, max_body_bytes: int) -> None:
    """Replace a gzip/deflate body by its decoded bytes (what `request.read()` returns from then on)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in _IDENTITY:
        return
    wbits_options = _DECODERS.get(encoding)
    if wbits_options is None:
        raise ApiError(
            415,
            f"Content-Encoding '{encoding[:32]}' is not supported: send the body as identity, gzip or deflate",
            code="unsupported_content_encoding",
        )
    raw = await request.read()  # the compressed size is bounded by client_max_size (413)
    if not raw:
        return
    decoded = _decompress(raw, wbits_options, max_body_bytes, encoding)
    # aiohttp keeps the read body here; `read()`, `text()` and `json()` return it from now on.
    request._read_bytes = decoded


async def check_json_depth(request: web.Request) -> None:
    """400 for a JSON body nested deeper than `MAX_JSON_DEPTH`; other bodies pass untouched.

    Counting brackets is one C-speed pass; only a body with that many brackets is parsed here.
    """
    if request.method not in ("POST", "PUT", "PATCH") or not request.body_exists:
        return
    raw = await request.read()
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # not JSON: the handler says so in its own words
    if json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(400, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep")


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, counted without recursion and stopping past `limit`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _decompress(raw: bytes, wbits_options: tuple[int, ...], limit: int, encoding: str) -> bytes:
    for wbits in wbits_options:
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(raw, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise ApiError(
                413, f"Request body is larger than the limit of {limit} bytes once decoded", code="request_too_large"
            )
        if not decoder.eof:
            raise ApiError(400, f"The {encoding} request body is truncated", code="invalid_content_encoding")
        return out
    raise ApiError(400, f"The request body is not valid {encoding} data", code="invalid_content_encoding")
