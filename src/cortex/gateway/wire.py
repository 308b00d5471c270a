"""Request and response helpers shared by every route module: request ids, JSON bodies, errors.

Route modules (OpenAI pass-through, Anthropic, Responses) use these so that every route reads
bodies with the same size limit and error wording and tags every log line with the request id.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from aiohttp import web

from cortex.core.errors import ApiError, bad_request
from cortex.core.logs import request_id_var
from cortex.gateway.keys import GATEWAY

REQUEST_ID = "x-request-id"
_MAX_REQUEST_ID = 128


def request_id(request: web.BaseRequest) -> str:
    """The client's `x-request-id` (sanitised) or a new one; set for every log line of this request."""
    given = request.headers.get(REQUEST_ID, "")
    rid = given if 0 < len(given) <= _MAX_REQUEST_ID and given.isprintable() and " " not in given else ""
    rid = rid or os.urandom(8).hex()
    request_id_var.set(rid)
    return rid


async def read_json(request: web.BaseRequest) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object plus its raw bytes; 413 over `gateway.max_body_bytes`, 400 if not an object."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY].config.gateway.max_body_bytes
        raise ApiError(
            413, f"request body is larger than the limit of {limit} bytes", code="request_too_large"
        ) from None
    if not raw:
        raise bad_request("request body is empty: expected a JSON object", code="invalid_json")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    return payload, raw


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def openai_error(err: ApiError, rid: str | None = None) -> web.Response:
    headers = err.headers()
    if rid:
        headers[REQUEST_ID] = rid
    return json_response(err.openai_body(), err.status, headers)


def anthropic_error(err: ApiError, rid: str) -> web.Response:
    return json_response(err.anthropic_body(), err.status, {**err.headers(), REQUEST_ID: rid})


def speaks_anthropic(request: web.BaseRequest) -> bool:
    """Anthropic's SDKs and Claude Code send `anthropic-version` on every call; OpenAI clients never do."""
    return "anthropic-version" in request.headers or request.path.startswith("/v1/messages")


def error_in_dialect(request: web.BaseRequest, err: ApiError, rid: str) -> web.Response:
    return anthropic_error(err, rid) if speaks_anthropic(request) else openai_error(err, rid)
