"""The client's mark on vendor-run tools it can do without.

Neither OpenAI's Responses API nor Anthropic's Messages API can say "use this hosted tool if you
have it". A tool only the vendor can run (web search, code execution, ...) is therefore refused with
a 400 naming it, on both routes; a client that would rather have it dropped lists its type in this
header (comma-separated; `*` for every such tool; Anthropic types match with or without their date,
`web_search` or `web_search_20250305`). Codex, for one, can send extra headers from its config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from cortex.gateway.bodies import read_json

OPTIONAL_TOOLS_HEADER = "X-Cortex-Optional-Tools"

R = TypeVar("R")


def optional_tools(header: str | None) -> frozenset[str]:
    """The tool types a client marked optional, from the header's value."""
    return frozenset(part.strip() for part in (header or "").split(",") if part.strip())


def is_optional(tool_type: str, optional: frozenset[str], family: str | None = None) -> bool:
    return "*" in optional or tool_type in optional or (family is not None and family in optional)


async def read_request(request: web.Request, parse: Callable[[Any, frozenset[str]], R]) -> R:
    """A dialect route's JSON body parsed by `parse`, with the tool types the client marked optional."""
    payload, _ = await read_json(request)
    return parse(payload, optional_tools(request.headers.get(OPTIONAL_TOOLS_HEADER)))
