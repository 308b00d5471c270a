"""Send fuzz requests concurrently over one session and judge every answer against the route's contract.

The contract, for every request whatever it carries:
- an answer arrives (within `REQUEST_TIMEOUT_S`) and its status is below 500;
- an error body is JSON in the route's dialect: `{"error": {"message": ...}}` on OpenAI routes,
  `{"type": "error", "error": {"type": ..., "message": ...}}` on Anthropic routes;
- a stream that starts ends normally, without an error event (an error mid-stream is what a
  request that poisons a model looks like to its client);
- no `Server` header names a version.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.fuzz.strategies import FuzzRequest

# Generous: the machine is shared and slow; a hang is an answer that never comes, not a slow one.
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Outcome:
    request: FuzzRequest
    status: int | None
    headers: dict[str, str]
    body: bytes
    problem_sending: str | None = None


async def send(session: aiohttp.ClientSession, base: dict[str, str], req: FuzzRequest) -> Outcome:
    url = base[req.daemon] + req.path
    data = json.dumps(req.json).encode() if req.use_json else req.body
    try:
        async with (
            asyncio.timeout(REQUEST_TIMEOUT_S),
            session.request(req.method, url, data=data, headers=req.headers) as resp,
        ):
            body = await resp.read()
            return Outcome(req, resp.status, dict(resp.headers), body)
    except TimeoutError:
        return Outcome(req, None, {}, b"", f"no answer within {REQUEST_TIMEOUT_S}s (hang)")
    except aiohttp.ClientError as exc:
        return Outcome(req, None, {}, b"", f"connection failed: {type(exc).__name__}: {exc}")


async def send_all(
    session: aiohttp.ClientSession, base: dict[str, str], requests: Iterable[FuzzRequest], concurrency: int
) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)

    async def one(req: FuzzRequest) -> Outcome:
        async with gate:
            return await send(session, base, req)

    return await asyncio.gather(*(one(r) for r in requests))


def dialect(req: FuzzRequest) -> str:
    """Which envelope the route answers in: "anthropic", "openai", or "either" (no route to say)."""
    if req.daemon == "gateway" and req.path.startswith("/v1/messages"):
        return "anthropic"
    if req.daemon == "gateway" and "anthropic-version" in {k.lower() for k in req.headers}:
        return "either"  # routes outside the dialects answer a client that speaks Anthropic in Anthropic
    return "openai"


def envelope_problem(body: Any, expected: str) -> str | None:
    openai_ok = isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]
    anthropic_ok = (
        isinstance(body, dict)
        and body.get("type") == "error"
        and isinstance(body.get("error"), dict)
        and isinstance(body["error"].get("type"), str)
        and isinstance(body["error"].get("message"), str)
    )
    if expected == "openai" and not openai_ok:
        return "error body outside the OpenAI envelope"
    if expected == "anthropic" and not anthropic_ok:
        return "error body outside the Anthropic envelope"
    if expected == "either" and not (openai_ok or anthropic_ok):
        return "error body outside both envelopes"
    return None


def stream_problem(req: FuzzRequest, body: bytes) -> str | None:
    """A stream must end the dialect's normal way and carry no error event."""
    text = body.decode(errors="replace")
    events = [block for block in text.split("\n\n") if block.strip()]
    datas = []
    for block in events:
        lines = block.split("\n")
        if any(line.startswith("event: error") or line.startswith("event: response.failed") for line in lines):
            return f"error event in the stream: {block[:300]}"
        for line in lines:
            if line.startswith("data: "):
                datas.append(line[6:])
    for data in datas:
        if data == "[DONE]":
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            return f"stream event is not JSON: {data[:200]}"
        if isinstance(payload, dict) and ("error" in payload and "choices" not in payload):
            return f"error event in the stream: {data[:300]}"
    if req.path.startswith("/v1/messages"):
        ok = "event: message_stop" in text
    elif req.path.startswith("/v1/responses"):
        ok = "response.completed" in text or "response.incomplete" in text  # incomplete: max_output_tokens reached
    else:
        ok = bool(datas) and datas[-1] == "[DONE]"
    return None if ok else f"stream did not end normally: ...{text[-300:]}"


def problems(outcome: Outcome) -> list[str]:
    req = outcome.request
    if outcome.problem_sending is not None:
        return [outcome.problem_sending]
    found: list[str] = []
    assert outcome.status is not None
    server = outcome.headers.get("Server", "")
    if any(ch.isdigit() for ch in server):
        found.append(f"Server header names a version: {server!r}")
    if outcome.status >= 500:
        found.append(f"status {outcome.status}: {outcome.body[:300]!r}")
    content_type = outcome.headers.get("Content-Type", "")
    if outcome.status >= 400:
        try:
            body = json.loads(outcome.body)
        except ValueError:
            return [*found, f"status {outcome.status} with a body that is not JSON: {outcome.body[:200]!r}"]
        problem = envelope_problem(body, dialect(req))
        if problem:
            found.append(f"{problem}: {outcome.body[:300]!r}")
    elif content_type.startswith("text/event-stream"):
        problem = stream_problem(req, outcome.body)
        if problem:
            found.append(problem)
    elif req.daemon != "metrics" and req.method != "HEAD":
        try:
            json.loads(outcome.body)
        except ValueError:
            found.append(f"status {outcome.status} with a body that is not JSON: {outcome.body[:200]!r}")
    return found


def report(outcomes: list[Outcome], limit: int = 12) -> tuple[list[str], dict[int | None, int]]:
    """The failures, one example of each kind first (kind: the problem's first words), and the statuses seen."""
    statuses: dict[int | None, int] = {}
    by_kind: dict[str, list[str]] = {}
    for outcome in outcomes:
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        for problem in problems(outcome):
            kind = problem[:70]
            by_kind.setdefault(kind, []).append(f"{problem}\n    request: {outcome.request.describe()}")
    if not by_kind:
        return [], statuses
    lines = [f"{len(items)} x {kind}" for kind, items in sorted(by_kind.items(), key=lambda kv: -len(kv[1]))]
    lines.append("examples:")
    lines += [items[0] for items in by_kind.values()][:limit]
    return lines, statuses
