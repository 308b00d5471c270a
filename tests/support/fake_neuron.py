"""The fake neuron: the neuron API (docs/neuron-api.md) with no model behind it, for gateway tests.

Its control answers are built from the contract's own types (core/neuron_api.py), so a change to
the contract reaches it. It shows what tiny real models cannot: 40 GB devices, slow loads,
out-of-memory, recovering models, streams that die half-way or hang. Run it as a process:

    python -m tests.support.fake_neuron --port 9001 --spec spec.json

Spec (JSON): `name`, `devices` ([{vram_total_mb, kind?, name?}]), `sizes` ({model_id: MB}),
`default_size_mb`, `load_delay_s`, `preloaded` ([model_id] or [{model_id, device}]), `fail_loads`
([model_id]), `context` (tokens), `tool_call` (bool), `retry_after_s` (of scripted errors),
`stream_events`, `event_interval_s`, and `replies`: what generation answers,

- `"tokens"` (default): "hello from <name>", or streamed as `stream_events` chunks "tok0 ", …;
  usage 7 prompt tokens, one completion token per event;
- `"script"`: what the last user text asks for (the dialect tests), see `script_answer`.

A request may carry a test-only `fake` object: `{"die_after": k}` cuts the connection after k
chunks, `{"hang_after": k}` stops sending after k chunks until the client goes away,
`{"status": 429}` answers that error status, `{"delay_s": x}` waits before answering.

`GET /_fake/log` reports what the fake saw: load bodies, unloads, defragments, a summary of every
generation request (`requests`), the full chat and tokenize bodies, and streams the client
cancelled. `POST /_fake/set` overrides a model's `status` or its polled `in_flight`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from cortex.core.errors import openai_error_body
from cortex.core.neuron_api import (
    DeviceHealth,
    Discovery,
    DiscoveryDevice,
    Health,
    LoadProgress,
    LoadRequest,
    ModelEntry,
    ModelError,
    ModelHealth,
    ModelLimit,
    ModelStatus,
    TokenCount,
    Unloaded,
    UnloadRequest,
)

_SHOWS_MEMORY = (ModelStatus.LOADED, ModelStatus.RECOVERING, ModelStatus.POISONED)


@dataclass
class FakeModel:
    model_id: str
    size_mb: int
    device: int
    status: ModelStatus = ModelStatus.LOADING
    progress: float = 0.0
    error: ModelError | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    in_flight: int = 0
    forced_in_flight: int | None = None

    def entry(self, spec: dict[str, Any]) -> ModelEntry:
        loading = self.status == ModelStatus.LOADING
        return ModelEntry(
            id=self.model_id,
            status=self.status,
            harness="fake",
            devices=[self.device],
            vram_used_mb=self.size_mb if self.status in _SHOWS_MEMORY else 0,
            limit=ModelLimit(context=int(spec.get("context", 2048))),
            tool_call=bool(spec.get("tool_call", False)),
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            load_progress=LoadProgress(fraction=round(self.progress, 3), stage="weights") if loading else None,
            error=self.error,
        )

    def polled_in_flight(self) -> int:
        return self.in_flight if self.forced_in_flight is None else self.forced_in_flight


@dataclass
class FakeNeuron:
    spec: dict[str, Any]
    models: dict[str, FakeModel] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    log: dict[str, Any] = field(
        default_factory=lambda: {
            "loads": [],
            "unloads": [],
            "defragments": 0,
            "requests": [],
            "chat": [],
            "tokenize": [],
            "cancelled": 0,
        }
    )

    @property
    def name(self) -> str:
        return str(self.spec.get("name", "fake"))

    def devices(self) -> list[DiscoveryDevice]:
        return [
            DiscoveryDevice(
                index=i,
                kind=d.get("kind", "cuda"),
                name=d.get("name") or f"Fake {d.get('kind', 'cuda')}",
                vram_total_mb=d["vram_total_mb"],
                compute_capability="9.0" if d.get("kind", "cuda") == "cuda" else None,
            )
            for i, d in enumerate(self.spec.get("devices") or [{"vram_total_mb": 16000}])
        ]

    def used_mb(self, device: int) -> int:
        return sum(m.size_mb for m in self.models.values() if m.device == device and m.status != ModelStatus.FAILED)

    def size_of(self, model_id: str) -> int:
        return int(self.spec.get("sizes", {}).get(model_id, self.spec.get("default_size_mb", 1000)))


FAKE = web.AppKey("fake", FakeNeuron)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    if hasattr(data, "model_dump"):
        data = data.model_dump(mode="json")
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, code: str | None = None, retry_after: int = 3) -> web.Response:
    body = openai_error_body(message, "invalid_request_error", None, code)
    return _json(body, status, {"Retry-After": str(retry_after)} if status in (429, 503) else None)


# ---- the control API ------------------------------------------------------------------------------
async def version(request: web.Request) -> web.Response:
    return _json({"version": "fake", "name": request.app[FAKE].name})


async def discovery(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    return _json(Discovery(hostname=fake.name, devices=fake.devices(), harnesses=["fake"]))


async def health(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    devices = [
        DeviceHealth(
            index=d.index,
            kind=d.kind,
            vram_used_mb=fake.used_mb(d.index),
            vram_free_mb=d.vram_total_mb - fake.used_mb(d.index),
            vram_total_mb=d.vram_total_mb,
            utilization_pct=7.0,
            temp_c=41.0,
        )
        for d in fake.devices()
    ]
    models = [
        ModelHealth(
            id=m.model_id,
            status=m.status,
            in_flight=m.polled_in_flight(),
            max_in_flight=4,
            max_queue_depth=16,
            tok_s_decode=100.0,
        )
        for m in fake.models.values()
    ]
    return _json(Health(uptime_s=1.0, devices=devices, models=models))


async def list_models(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    return _json([m.entry(fake.spec).model_dump(mode="json") for m in fake.models.values()])


async def load(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    raw = await request.json()
    body = LoadRequest.model_validate(raw)
    fake.log["loads"].append(raw)
    existing = fake.models.get(body.model_id)
    if existing is not None and existing.status in (ModelStatus.LOADING, ModelStatus.LOADED):
        status = 200 if existing.status == ModelStatus.LOADED else 202
        return _json(existing.entry(fake.spec), status)
    model = FakeModel(body.model_id, fake.size_of(body.model_id), (body.devices or [0])[0])
    fake.models[body.model_id] = model
    task = asyncio.create_task(_run_load(fake, model))
    fake.tasks.add(task)
    task.add_done_callback(fake.tasks.discard)
    return _json(model.entry(fake.spec), 202)


async def _run_load(fake: FakeNeuron, model: FakeModel) -> None:
    delay = float(fake.spec.get("load_delay_s", 0.2))
    steps = 5
    for step in range(steps):
        await asyncio.sleep(delay / steps)
        model.progress = (step + 1) / steps
    total = fake.devices()[model.device].vram_total_mb
    if model.model_id in fake.spec.get("fail_loads", []):
        model.status, model.error = ModelStatus.FAILED, ModelError(reason="missing_files", message="no weights found")
    elif fake.used_mb(model.device) > total:
        model.status = ModelStatus.FAILED
        model.error = ModelError(reason="out_of_memory", message="CUDA out of memory")
    else:
        model.status, model.loaded_at = ModelStatus.LOADED, time.time()


async def unload(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = UnloadRequest.model_validate(await request.json())
    fake.log["unloads"].append(body.model_id)
    gone = fake.models.pop(body.model_id, None)
    if gone is None:
        return _error(404, f"model '{body.model_id}' is not loaded", "model_not_found")
    return _json(Unloaded(model_id=body.model_id, freed_mb=gone.size_mb))


async def defragment(request: web.Request) -> web.Response:
    request.app[FAKE].log["defragments"] += 1
    return _json({"devices": []})


def _admit(fake: FakeNeuron, body: dict[str, Any]) -> FakeModel | web.Response:
    model = fake.models.get(body.get("model", ""))
    if model is None or model.status == ModelStatus.FAILED:
        return _error(404, f"The model '{body.get('model')}' does not exist", "model_not_found")
    if model.status in (ModelStatus.RECOVERING, ModelStatus.POISONED):
        return _error(503, "model is recovering", "model_recovering")
    if model.status != ModelStatus.LOADED:
        return _error(503, "model is not loaded yet", "model_not_ready")
    return model


async def tokenize(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.json()
    fake.log["tokenize"].append(body)
    admitted = _admit(fake, body)
    if isinstance(admitted, web.Response):
        return admitted
    messages = body.get("messages") or []
    scripted = fake.spec.get("replies") == "script"
    count = len(orjson.dumps(messages)) // 4 if scripted else 7 * len(messages)
    return _json(TokenCount(model=body["model"], prompt_tokens=count))


# ---- what generation answers ------------------------------------------------------------------------
@dataclass
class Answer:
    """One reply, streamed or not: the pieces the stream sends, and when it misbehaves."""

    text: str = ""
    pieces: list[str] = field(default_factory=list)  # the text as streamed
    reasoning: list[str] = field(default_factory=list)
    calls: list[tuple[str, str, dict[str, Any] | str]] = field(default_factory=list)  # str: a custom tool's input
    finish: str = "stop"
    stop_sequence: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    status: int | None = None  # answer this error status instead
    delay_s: float = 0.0  # before answering at all
    first_gap_s: float = 0.0  # a stream: after its first chunk, before the rest
    piece_gap_s: float = 0.0  # a stream: after each text piece
    reasoning_gap_s: float = 0.0  # a stream: after each reasoning piece
    die_after: int | None = None  # a stream: cut the connection after this many chunks past the first
    hang_after: int | None = None  # a stream: stop sending after this many chunks past the first


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_answer(fake: FakeNeuron) -> Answer:
    events = int(fake.spec.get("stream_events", 5))
    return Answer(
        text=f"hello from {fake.name}",
        pieces=[f"tok{i} " for i in range(events)],
        usage=_usage(7, events),
        piece_gap_s=float(fake.spec.get("event_interval_s", 0.005)),
    )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


def _thirds(text: str, size: int | None = None) -> list[str]:
    """Thirds by default; fixed-size pieces when asked."""
    step = size or max(1, len(text) // 3)
    return [text[i : i + step] for i in range(0, len(text), step)] if text else []


APPLY_PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello from cortex\n*** End Patch\n"


def _call_parts(args: dict[str, Any] | str) -> tuple[str, str, str]:
    """(chat tool call type, the field its text goes in, the text): a str is a custom tool's input."""
    return ("function", "arguments", json.dumps(args)) if isinstance(args, dict) else ("custom", "input", args)


def script_answer(body: dict[str, Any]) -> Answer:
    """What the last user text asks for; after tool messages, "results: <their contents joined by '; '>".

    "[call weather]" -> two tool calls (Oslo, Rome), arguments streamed in pieces (needs tools)
    "[apply_patch]"  -> one call to the custom tool apply_patch adding hello.txt (needs that custom tool: Codex's)
    "[think]"        -> reasoning_content, then text
    "[stop at]"      -> "one two", stopped by the stop string "three"
    "[long]"         -> finish_reason "length"
    "[slow S]"       -> waits S seconds before the text (keep-alive tests)
    "[ponder S]"     -> reasoning_content for S seconds, a piece every 50 ms, then text
    "[die]"          -> a stream that breaks after two chunks (no [DONE])
    "[error NNN]"    -> that HTTP status with an OpenAI error body
    anything else    -> "echo: <the text>"
    """
    messages = body.get("messages") or []
    trailing_tools: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        trailing_tools.insert(0, _text(message.get("content")))
    answer = Answer()
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    said = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if trailing_tools:
        answer.text = "results: " + "; ".join(trailing_tools)
    elif error := re.search(r"\[error (\d{3})\]", said):
        answer.status = int(error.group(1))
    elif "[call weather]" in said and body.get("tools"):
        answer.text = "Checking both."
        answer.calls = [("call_oslo", "weather", {"city": "Oslo"}), ("call_rome", "weather", {"city": "Rome"})]
        answer.finish = "tool_calls"
    elif "[apply_patch]" in said and any((t.get("custom") or {}).get("name") == "apply_patch" for t in tools):
        answer.calls, answer.finish = [("call_patch", "apply_patch", APPLY_PATCH)], "tool_calls"
    elif "[think]" in said:
        answer.reasoning = _thirds("Let me think. Twice.")
        answer.text = "Thought it through."
    elif "[stop at]" in said:
        answer.text, answer.stop_sequence = "one two", "three"
    elif "[long]" in said:
        answer.text, answer.finish = "cut sho", "length"
    else:
        answer.text = f"echo: {said}"
    if not trailing_tools:
        if slow := re.search(r"\[slow ([\d.]+)\]", said):
            answer.first_gap_s = float(slow.group(1))
        if ponder := re.search(r"\[ponder ([\d.]+)\]", said):
            answer.reasoning = _thirds("hmm " * round(float(ponder.group(1)) / 0.05), 4)
            answer.reasoning_gap_s = 0.05
        if "[die]" in said:
            answer.die_after = 2
    answer.pieces = _thirds(answer.text)
    prompt = 10 * len(messages)
    reasoning = len(_thirds("".join(answer.reasoning)))
    answer.usage = _usage(prompt, len(answer.pieces) + reasoning + 3 * len(answer.calls))
    return answer


def plan(fake: FakeNeuron, body: dict[str, Any]) -> Answer:
    answer = script_answer(body) if fake.spec.get("replies") == "script" else token_answer(fake)
    script = body.get("fake") or {}
    if script.get("status"):
        answer.status = int(script["status"])
    answer.delay_s = float(script.get("delay_s") or 0.0)
    if not body.get("stream"):
        answer.delay_s += answer.first_gap_s  # a slow answer is slow either way
    answer.die_after = script.get("die_after", answer.die_after)
    answer.hang_after = script.get("hang_after", answer.hang_after)
    return answer


def completion(body: dict[str, Any], answer: Answer, *, chat: bool) -> dict[str, Any]:
    head = {"created": int(time.time()), "model": body["model"], "usage": answer.usage}
    if not chat:
        choice = {"index": 0, "text": answer.text, "finish_reason": answer.finish}
        return {"id": "cmpl-fake", "object": "text_completion", "choices": [choice], **head}
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
    if answer.reasoning:
        message["reasoning_content"] = "".join(answer.reasoning)
    if answer.calls:
        message["tool_calls"] = []
        for cid, name, args in answer.calls:
            kind, key, text = _call_parts(args)
            message["tool_calls"].append({"id": cid, "type": kind, kind: {"name": name, key: text}})
    chat_choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": answer.finish}
    if answer.stop_sequence:
        chat_choice["stop_sequence"] = answer.stop_sequence
    return {"id": "chatcmpl-fake", "object": "chat.completion", "choices": [chat_choice], **head}


def stream_chunks(body: dict[str, Any], answer: Answer, *, chat: bool) -> list[tuple[dict[str, Any], float]]:
    """Every chunk of the stream with the pause after it; the first is the role chunk of a chat."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": "chatcmpl-fake", "object": obj, "created": 0, "model": body["model"]}

    def chunk(delta: dict[str, Any], **choice: Any) -> dict[str, Any]:
        if chat:
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None, **choice}]}
        text = {"index": 0, "text": delta.get("content", ""), "finish_reason": None, **choice}
        return {**head, "choices": [text]}

    chunks: list[tuple[dict[str, Any], float]] = []
    if chat:
        chunks.append((chunk({"role": "assistant", "content": ""}), answer.first_gap_s))
    chunks += [(chunk({"reasoning_content": p}), answer.reasoning_gap_s) for p in answer.reasoning]
    chunks += [(chunk({"content": p}), answer.piece_gap_s) for p in answer.pieces]
    for index, (call_id, name, args) in enumerate(answer.calls):
        kind, key, text = _call_parts(args)
        call = {"index": index, "id": call_id, "type": kind, kind: {"name": name, key: ""}}
        chunks.append((chunk({"tool_calls": [call]}), 0.0))
        for piece in _thirds(text):
            chunks.append((chunk({"tool_calls": [{"index": index, kind: {key: piece}}]}), 0.0))
    last: dict[str, Any] = {"finish_reason": answer.finish}
    if answer.stop_sequence:
        last["stop_sequence"] = answer.stop_sequence
    chunks.append((chunk({}, **last), 0.0))
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(({**head, "choices": [], "usage": answer.usage}, 0.0))
    return chunks


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    fake = request.app[FAKE]
    body = await request.json()
    summary = {
        "model": body.get("model"),
        "stream": body.get("stream", False),
        "stream_options": body.get("stream_options"),
        "request_id": request.headers.get("x-request-id"),
        "path": request.path,
    }
    fake.log["requests"].append(summary)
    if chat:
        fake.log["chat"].append(body)
    answer = plan(fake, body)
    if answer.status:
        retry_after = int(fake.spec.get("retry_after_s", 3))
        return _error(answer.status, f"scripted error {answer.status}", "scripted", retry_after)
    admitted = _admit(fake, body)
    if isinstance(admitted, web.Response):
        return admitted
    model = admitted
    model.in_flight += 1
    model.last_used = time.time()
    try:
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        if body.get("stream"):
            return await _stream(request, body, answer, chat=chat)
        return _json(completion(body, answer, chat=chat))
    except (asyncio.CancelledError, ConnectionResetError):
        fake.log["cancelled"] += 1  # the client (the gateway) went away: what disconnect propagation must cause
        raise
    finally:
        model.in_flight -= 1


async def _stream(request: web.Request, body: dict[str, Any], answer: Answer, *, chat: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    skip_first = 1 if chat else 0  # die_after and hang_after count the chunks after the role chunk
    for position, (chunk, pause) in enumerate(stream_chunks(body, answer, chat=chat)):
        sent = position - skip_first
        if answer.die_after is not None and sent == answer.die_after:
            assert request.transport is not None
            request.transport.abort()  # the neuron "dies": no terminating chunk, no [DONE]
            return response
        if answer.hang_after is not None and sent == answer.hang_after:
            await asyncio.sleep(3600)
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if pause:
            await asyncio.sleep(pause)
    await response.write(b"data: [DONE]\n\n")
    return response


# ---- test hooks ---------------------------------------------------------------------------------------
async def fake_log(request: web.Request) -> web.Response:
    return _json(request.app[FAKE].log)


async def fake_set(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.json()
    for model_id, status in (body.get("status") or {}).items():
        fake.models[model_id].status = ModelStatus(status)
    for model_id, in_flight in (body.get("in_flight") or {}).items():
        fake.models[model_id].forced_in_flight = in_flight
    return _json({"ok": True})


def build_app(spec: dict[str, Any]) -> web.Application:
    fake = FakeNeuron(spec)
    for entry in spec.get("preloaded", []):
        model_id, device = (entry, 0) if isinstance(entry, str) else (entry["model_id"], entry.get("device", 0))
        fake.models[model_id] = FakeModel(
            model_id, fake.size_of(model_id), device, ModelStatus.LOADED, 1.0, loaded_at=time.time()
        )
    app = web.Application()
    app[FAKE] = fake
    app.router.add_get("/version", version)
    app.router.add_get("/discovery", discovery)
    app.router.add_get("/health", health)
    app.router.add_get("/models", list_models)
    app.router.add_post("/models/load", load)
    app.router.add_post("/models/unload", unload)
    app.router.add_post("/admin/defragment", defragment)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/tokenize", tokenize)
    app.router.add_get("/_fake/log", fake_log)
    app.router.add_post("/_fake/set", fake_set)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", required=True, help="path of a JSON spec")
    args = parser.parse_args()
    with open(args.spec) as fh:
        spec = json.load(fh)
    web.run_app(
        build_app(spec), host="127.0.0.1", port=args.port, print=None, access_log=None, handler_cancellation=True
    )


if __name__ == "__main__":
    main()
