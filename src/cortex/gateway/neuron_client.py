"""Calls to a neuron's control routes (`/health`, `/models`, `/models/load`, …) over the shared session.

Two failure kinds, because callers treat them differently: `NeuronUnreachable` (no answer at all:
connection refused, reset, timed out — the node may be down) and `NeuronRefused` (it answered
with an error status — the node is up and said no).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from cortex.gateway.neuron_http import NeuronBodyError
from cortex.gateway.state import Node


class NeuronUnreachable(Exception):
    def __init__(self, node: str, detail: str, *, timed_out: bool = False, refused: bool = False) -> None:
        super().__init__(f"neuron '{node}' unreachable: {detail}")
        self.node = node
        self.detail = detail
        self.timed_out = timed_out  # no answer in time: a busy node looks the same as a gone one
        self.refused = refused  # nothing listens there: the node is gone


class NeuronRefused(Exception):
    def __init__(self, node: str, status: int, body: Any) -> None:
        self.node = node
        self.status = status
        self.body = body
        super().__init__(f"neuron '{node}' answered {status}: {error_message(body)}")


def error_message(body: Any) -> str:
    """The human message in an error body, whichever shape the neuron used."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("message"):
            return str(body["message"])
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    return str(body)[:500]


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def plain_reason(exc: BaseException) -> str:
    """What a client is told about a failure reaching a neuron: its kind, never an address or a raw error
    (`describe` has those, for the log under the request id)."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientPayloadError | NeuronBodyError):
        return "its answer broke off"
    return "the connection was lost"


def decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


async def call(
    session: aiohttp.ClientSession,
    node: Node,
    method: str,
    path: str,
    *,
    body: Any = None,
    timeout: float,
) -> tuple[int, Any]:
    """One request; returns (status, decoded body) for 2xx, raises for anything else."""
    headers = node.auth_headers()
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    try:
        async with session.request(
            method, node.endpoint + path, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            raw = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise NeuronUnreachable(
            node.name,
            describe(exc),
            timed_out=isinstance(exc, asyncio.TimeoutError | TimeoutError),
            refused=isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError),
        ) from exc
    decoded = decode(raw)
    if status >= 400:
        raise NeuronRefused(node.name, status, decoded)
    return status, decoded


async def get_json(session: aiohttp.ClientSession, node: Node, path: str, *, timeout: float) -> Any:
    return (await call(session, node, "GET", path, timeout=timeout))[1]


async def post_json(
    session: aiohttp.ClientSession, node: Node, path: str, body: Any, *, timeout: float
) -> tuple[int, Any]:
    return await call(session, node, "POST", path, body=body, timeout=timeout)
