"""The request pipeline every gateway route runs in: request id, authentication, errors in the caller's dialect.

One aiohttp middleware, so routes hold only what is particular to them:

1. The request id: the client's `x-request-id` when it is safe (letters, digits, `.`, `_`, `-`, at
   most 128), else a new one; set for every log line, sent to the neuron, echoed in the answer.
2. Authentication, by what the route declares with `@endpoint(access=...)`: `CLIENT` routes need
   one of `gateway.api_keys` (when any is set), `ADMIN` routes the `gateway.admin_key` (open only on
   a loopback gateway with no keys at all, as `cortex up` runs), `OPEN` routes nothing. `Auth` is the
   one place keys are checked: SHA-256 digests compared in constant time (core/secrets.py).
3. Errors: an `ApiError` raised anywhere below (or anything unexpected, as a 500) is answered in
   the route's dialect (`@endpoint(dialect=...)`): Anthropic's envelope on `/v1/messages`,
   OpenAI's on the OpenAI routes, the caller's (by `anthropic-version`) where both are spoken. A
   neuron's own error on an OpenAI route passes through as the neuron sent it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, TypeVar

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.core.logs import REQUEST_ID_HEADER, request_id_from, request_id_var
from cortex.core.secrets import KeySet
from cortex.gateway.bodies import json_response
from cortex.gateway.limits import Limiter
from cortex.gateway.upstream import UpstreamError

log = logging.getLogger("cortex.gateway.pipeline")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Callable[..., Any])


class Access(Enum):
    CLIENT = "client"  # one of gateway.api_keys, when any is configured
    ADMIN = "admin"  # gateway.admin_key (open only on a keyless loopback gateway)
    OPEN = "open"  # anyone (health checks)


class Dialect(Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    CALLER = "caller"  # Anthropic's when the caller sends `anthropic-version`, else OpenAI's


def endpoint(*, access: Access = Access.CLIENT, dialect: Dialect = Dialect.OPENAI) -> Callable[[H], H]:
    """Declare who may call a handler and which dialect its errors speak (read by the pipeline)."""

    def mark(handler: H) -> H:
        handler.access = access  # type: ignore[attr-defined]
        handler.dialect = dialect  # type: ignore[attr-defined]
        return handler

    return mark


class Auth:
    """Client keys (`Authorization: Bearer KEY` or `x-api-key: KEY`) and the admin key (Bearer or `x-admin-key`)."""

    def __init__(
        self, api_keys: list[str], admin_key: str | None, *, loopback: bool = True, limiter: Limiter | None = None
    ) -> None:
        self._client_keys = KeySet(api_keys)
        self._limiter = limiter
        self._admin_keys = KeySet([admin_key] if admin_key is not None else [])
        # Without an admin key, /admin/* stays open only where nothing else is guarded: a loopback dev gateway.
        self._admin_open = admin_key is None and not api_keys and loopback

    def check(self, request: web.BaseRequest, access: Access) -> None:
        if access is Access.CLIENT and self._client_keys:
            presented = _bearer(request) or request.headers.get("x-api-key", "")
            key = self._client_keys.match(presented)
            if key is None:
                raise ApiError(401, "a valid API key is required", type="authentication_error", code="invalid_api_key")
            if self._limiter is not None:
                self._limiter.use_key(key)  # 429 over the key's limits; its model allow-list is checked on routing
        elif access is Access.ADMIN and not self._admin_open:
            if not self._admin_keys:
                raise ApiError(
                    403,
                    "the admin API needs gateway.admin_key: set it in cortex.toml (client keys never open /admin)",
                    type="permission_error",
                    code="admin_key_not_configured",
                )
            presented = _bearer(request) or request.headers.get("x-admin-key", "")
            if not self._admin_keys.matches(presented):
                raise ApiError(401, "the admin key is required", type="authentication_error", code="invalid_admin_key")

    def admin(self, request: web.BaseRequest) -> bool:
        """Whether the request carries the admin key (for answers that say more to the operator)."""
        return self._admin_keys.matches(_bearer(request) or request.headers.get("x-admin-key", ""))


def _bearer(request: web.BaseRequest) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def speaks_anthropic(request: web.BaseRequest) -> bool:
    """Anthropic's SDKs and Claude Code send `anthropic-version` on every call; OpenAI clients never do."""
    return "anthropic-version" in request.headers or request.path.startswith("/v1/messages")


def _dialect(request: web.Request) -> Dialect:
    handler = request.match_info.handler
    return getattr(handler, "dialect", Dialect.CALLER)


def render_error(request: web.Request, err: ApiError) -> web.Response:
    """`err` in the dialect of the route it happened on, with the request id and Retry-After."""
    headers = {**err.headers(), REQUEST_ID_HEADER: request_id_var.get()}
    dialect = _dialect(request)
    anthropic = dialect is Dialect.ANTHROPIC or (dialect is Dialect.CALLER and speaks_anthropic(request))
    if anthropic:
        return json_response(err.anthropic_body(), err.status, headers)
    if isinstance(err, UpstreamError):  # the neuron speaks OpenAI: its answer passes through as sent
        return web.Response(body=err.raw, status=err.status, headers={"Content-Type": err.content_type, **headers})
    return json_response(err.openai_body(), err.status, headers)


def internal_error() -> ApiError:
    return ApiError(500, "internal error in the gateway; see its log", code="internal_error")


def request_pipeline(auth: Auth) -> Any:
    @web.middleware
    async def pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        try:
            auth.check(request, getattr(handler, "access", Access.CLIENT))
            response = await handler(request)
        except ApiError as err:
            return render_error(request, err)
        except web.HTTPException:
            raise  # the hardening guard words aiohttp's own refusals (413, …) in the dialect
        except ConnectionError:
            raise  # the client went away: nobody to answer
        except Exception:
            log.exception("route failed: %s %s", request.method, request.path)
            return render_error(request, internal_error())
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = rid
        return response

    return pipeline
