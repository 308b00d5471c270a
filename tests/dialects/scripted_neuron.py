"""A neuron whose "model" follows a script written in the conversation, for dialect end-to-end tests.

It speaks the neuron HTTP contract (ARCHITECTURE.md §2) with no model behind it. What it answers
depends on the last user text, so tests need no shared state:

    "[call weather]" -> two tool calls (Oslo, Rome), arguments streamed in pieces (needs tools)
    "[think]"        -> reasoning_content, then text
    "[stop at]"      -> "one two", stopped by the stop string "three"
    "[long]"         -> finish_reason "length"
    "[slow S]"       -> waits S seconds before the text (keep-alive tests)
    "[ponder S]"     -> reasoning_content for S seconds, a piece every 50 ms, then text
    "[die]"          -> a stream that breaks after two chunks (no [DONE])
    "[error NNN]"    -> that HTTP status with an OpenAI error body
    anything else    -> "echo: <the text>"

After tool messages it answers "results: <tool contents joined by '; '>" (closing a tool loop).
Every chat and tokenize body is recorded in full, and streams the gateway cancelled are counted:
`GET /_script/log`.

    python -m tests.dialects.scripted_neuron --port 9001 --spec spec.json

Spec (JSON): `name`, `preloaded` ([model id]), `catalogue_load_delay_s` (for cold loads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

import orjson
from aiohttp import web

LOG = web.AppKey("log", dict)
MODELS = web.AppKey("models", dict)
SPEC = web.AppKey("spec", dict)
TASKS = web.AppKey("tasks", set)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return _json(body, status, {"Retry-After": "2"} if status in (429, 503) else None)


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    return next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")


def plan(body: dict[str, Any]) -> dict[str, Any]:
    """What to answer: reasoning, text, tool calls, finish reason, stop sequence, delays, faults."""
    messages = body.get("messages") or []
    trailing_tools = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        trailing_tools.insert(0, _text(message.get("content")))
    answer: dict[str, Any] = {"reasoning": "", "text": "", "calls": [], "finish": "stop", "stop_sequence": None}
    if trailing_tools:
        answer["text"] = "results: " + "; ".join(trailing_tools)
        return answer
    said = _last_user_text(messages)
    if error := re.search(r"\[error (\d{3})\]", said):
        answer["status"] = int(error.group(1))
    elif "[call weather]" in said and body.get("tools"):
        answer["text"] = "Checking both."
        answer["calls"] = [("call_oslo", "weather", {"city": "Oslo"}), ("call_rome", "weather", {"city": "Rome"})]
        answer["finish"] = "tool_calls"
    elif "[think]" in said:
        answer["reasoning"] = "Let me think. Twice."
        answer["text"] = "Thought it through."
    elif "[stop at]" in said:
        answer["text"] = "one two"
        answer["stop_sequence"] = "three"
    elif "[long]" in said:
        answer["text"] = "cut sho"
        answer["finish"] = "length"
    else:
        answer["text"] = f"echo: {said}"
    if slow := re.search(r"\[slow ([\d.]+)\]", said):
        answer["delay_s"] = float(slow.group(1))
    if ponder := re.search(r"\[ponder ([\d.]+)\]", said):
        answer["reasoning"] = "hmm " * round(float(ponder.group(1)) / 0.05)
        answer["reasoning_piece_s"] = 0.05
    answer["die"] = "[die]" in said
    return answer


def _pieces(text: str, size: int | None = None) -> list[str]:
    """Thirds by default; fixed-size pieces when asked."""
    step = size or max(1, len(text) // 3)
    return [text[i : i + step] for i in range(0, len(text), step)] if text else []


def _usage(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, int]:
    prompt = 10 * len(body.get("messages") or [])
    completion = len(_pieces(answer["text"])) + len(_pieces(answer["reasoning"])) + 3 * len(answer["calls"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer["text"] or None}
    if answer["reasoning"]:
        message["reasoning_content"] = answer["reasoning"]
    if answer["calls"]:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for cid, name, args in answer["calls"]
        ]
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": answer["finish"]}
    if answer["stop_sequence"]:
        choice["stop_sequence"] = answer["stop_sequence"]
    return {
        "id": "chatcmpl-script",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [choice],
        "usage": _usage(body, answer),
    }


def stream_chunks(body: dict[str, Any], answer: dict[str, Any]) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], **choice: Any) -> dict[str, Any]:
        head = {"id": "chatcmpl-script", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None, **choice}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    size = 4 if answer.get("reasoning_piece_s") else None
    chunks += [chunk({"reasoning_content": p}) for p in _pieces(answer["reasoning"], size)]
    chunks += [chunk({"content": p}) for p in _pieces(answer["text"])]
    for index, (call_id, name, args) in enumerate(answer["calls"]):
        head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        chunks.append(chunk({"tool_calls": [head]}))
        for piece in _pieces(json.dumps(args)):
            chunks.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    last = {"finish_reason": answer["finish"]}
    if answer["stop_sequence"]:
        last["stop_sequence"] = answer["stop_sequence"]
    chunks.append(chunk({}, **last))
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(
            {"id": "chatcmpl-script", "object": "chat.completion.chunk", "choices": [], "usage": _usage(body, answer)}
        )
    return chunks


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


def _ready(request: web.Request, body: dict[str, Any]) -> web.Response | None:
    status = request.app[MODELS].get(body.get("model"), {}).get("status")
    if status is None:
        return _error(404, f"The model '{body.get('model')}' does not exist", "model_not_found")
    if status != "loaded":
        return _error(503, "model is not loaded yet", "model_not_ready")
    return None


def _is_reasoning(chunk: dict[str, Any]) -> bool:
    return any("reasoning_content" in choice["delta"] for choice in chunk.get("choices") or [])


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[LOG]["chat"].append(body)
    refused = _ready(request, body)
    if refused is not None:
        return refused
    answer = plan(body)
    if "status" in answer:
        return _error(answer["status"], f"scripted error {answer['status']}", "scripted")
    if not body.get("stream"):
        await asyncio.sleep(answer.get("delay_s", 0))
        return _json(completion(body, answer))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        for position, item in enumerate(stream_chunks(body, answer)):
            if position == 1 and answer.get("delay_s"):
                await asyncio.sleep(answer["delay_s"])
            if position == 3 and answer["die"]:
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(b"data: " + orjson.dumps(item) + b"\n\n")
            if answer.get("reasoning_piece_s") and _is_reasoning(item):
                await asyncio.sleep(answer["reasoning_piece_s"])
        await response.write(b"data: [DONE]\n\n")
    except (asyncio.CancelledError, ConnectionResetError):
        request.app[LOG]["cancelled"] += 1  # the gateway dropped the connection: generation stops
        raise
    return response


async def tokenize(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[LOG]["tokenize"].append(body)
    refused = _ready(request, body)
    if refused is not None:
        return refused
    return _json({"prompt_tokens": len(orjson.dumps(body["messages"])) // 4})


async def version(request: web.Request) -> web.Response:
    return _json({"version": "scripted", "name": request.app[SPEC].get("name", "scripted")})


async def discovery(request: web.Request) -> web.Response:
    device = {"index": 0, "name": "Scripted GPU", "vram_total_mb": 80000, "compute_capability": "9.0", "kind": "cuda"}
    return _json({"hostname": request.app[SPEC].get("name", "scripted"), "devices": [device], "harnesses": ["fake"]})


async def health(request: web.Request) -> web.Response:
    device = {"index": 0, "vram_used_mb": 0, "vram_free_mb": 80000, "vram_total_mb": 80000, "utilization_pct": 0.0}
    models = [
        {
            "id": model_id,
            "status": m["status"],
            "in_flight": 0,
            "queue_depth": 0,
            "max_in_flight": 8,
            "max_queue_depth": 16,
            "rejected_queue_full": 0,
            "rejected_timeout": 0,
            "tok_s_decode": 100.0,
        }
        for model_id, m in request.app[MODELS].items()
    ]
    return _json({"status": "ok", "uptime_s": 1.0, "devices": [device], "models": models})


async def list_models(request: web.Request) -> web.Response:
    return _json(
        [
            {
                "id": model_id,
                "status": m["status"],
                "harness": "fake",
                "devices": [0],
                "vram_used_mb": 100,
                "limit": {"context": 4096},
                "tool_call": True,
            }
            for model_id, m in request.app[MODELS].items()
        ]
    )


async def load(request: web.Request) -> web.Response:
    body = await request.json()
    model_id = body["model_id"]
    request.app[LOG]["loads"].append(model_id)
    models = request.app[MODELS]
    if model_id in models:
        return _json({"model_id": model_id, "status": models[model_id]["status"]}, 202)
    models[model_id] = {"status": "loading"}

    async def finish_load() -> None:
        await asyncio.sleep(float(request.app[SPEC].get("catalogue_load_delay_s", 0.5)))
        models[model_id]["status"] = "loaded"

    request.app[TASKS].add(asyncio.create_task(finish_load()))
    return _json({"model_id": model_id, "status": "loading"}, 202)


async def unload(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[MODELS].pop(body["model_id"], None)
    return _json({"model_id": body["model_id"], "status": "unloaded"})


async def script_log(request: web.Request) -> web.Response:
    return _json(request.app[LOG])


def build_app(spec: dict[str, Any]) -> web.Application:
    app = web.Application()
    app[SPEC] = spec
    app[LOG] = {"chat": [], "tokenize": [], "loads": [], "cancelled": 0}
    app[MODELS] = {model_id: {"status": "loaded"} for model_id in spec.get("preloaded", [])}
    app[TASKS] = set()
    app.router.add_get("/version", version)
    app.router.add_get("/discovery", discovery)
    app.router.add_get("/health", health)
    app.router.add_get("/models", list_models)
    app.router.add_post("/models/load", load)
    app.router.add_post("/models/unload", unload)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/chat/tokenize", tokenize)
    app.router.add_get("/_script/log", script_log)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    with open(args.spec) as fh:
        spec = json.load(fh)
    web.run_app(
        build_app(spec), host="127.0.0.1", port=args.port, print=None, access_log=None, handler_cancellation=True
    )


if __name__ == "__main__":
    main()
