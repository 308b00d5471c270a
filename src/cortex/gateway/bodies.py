"""JSON in and out of the gateway's routes: one body reader (same limits and wording everywhere), one writer."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from cortex.core.errors import bad_request


async def read_json(request: web.BaseRequest) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object plus its raw bytes; 400 if it is not one (413 over the limit, from aiohttp)."""
    raw = await request.read()
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
