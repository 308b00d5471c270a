"""A fake neuron: the ARCHITECTURE.md §2 HTTP contract with no model behind it, for gateway tests.

It shows what tiny real models cannot: 40 GB devices, slow loads, out-of-memory, recovering
models, streams that die half-way or hang. Run it as a process:

    python -m tests.gateway.fake_neuron --port 9001 --spec spec.json

Spec (JSON): `name`, `devices` ([{vram_total_mb, kind?, name?}]), `sizes` ({model_id: MB}),
`default_size_mb`, `load_delay_s`, `preloaded` ([model_id] or [{model_id, device}]),
`fail_loads` ([model_id]), `stream_events`, `event_interval_s`.

A chat request may carry a test-only `fake` object: `{"die_after": k}` cuts the connection after
k content events, `{"hang_after": k}` stops sending after k events until the client goes away,
`{"status": 429}` answers that error status, `{"delay_s": x}` waits before answering.
`GET /_fake/log` reports what the fake saw (loads, unloads, defragments, requests, cancelled
streams); `POST /_fake/set` overrides a model's `status` or its polled `in_flight`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class FakeModel:
    model_id: str
    size_mb: int
    device: int
    status: str = "loading"
    progress: float = 0.0
    error: dict[str, str] | None = None
    loaded_at: float | None = None
    last_used: float | None = None
    in_flight: int = 0
    forced_in_flight: int | None = None

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": self.model_id,
            "status": self.status,
            "harness": "fake",
            "devices": [self.device],
            "vram_used_mb": self.size_mb if self.status in ("loaded", "recovering", "poisoned") else 0,
            "limit": {"context": 2048},
            "tool_call": False,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
        }
        if self.status == "loading":
            entry["load_progress"] = {"fraction": round(self.progress, 3), "stage": "weights"}
        if self.error:
            entry["error"] = self.error
        return entry

    def polled_in_flight(self) -> int:
        return self.in_flight if self.forced_in_flight is None else self.forced_in_flight


@dataclass
class FakeNeuron:
    spec: dict[str, Any]
    models: dict[str, FakeModel] = field(default_factory=dict)
    log: dict[str, Any] = field(
        default_factory=lambda: {"loads": [], "unloads": [], "defragments": 0, "requests": [], "cancelled": 0}
    )

    @property
    def name(self) -> str:
        return str(self.spec.get("name", "fake"))

    def devices(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "vram_total_mb": d["vram_total_mb"], "kind": d.get("kind", "cuda"), "name": d.get("name")}
            for i, d in enumerate(self.spec.get("devices") or [{"vram_total_mb": 16000}])
        ]

    def used_mb(self, device: int) -> int:
        return sum(m.size_mb for m in self.models.values() if m.device == device and m.status != "failed")

    def size_of(self, model_id: str) -> int:
        return int(self.spec.get("sizes", {}).get(model_id, self.spec.get("default_size_mb", 1000)))


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return _json(body, status, {"Retry-After": "3"} if status in (429, 503) else None)


FAKE = web.AppKey("fake", FakeNeuron)
TASKS = web.AppKey("tasks", set)


async def version(request: web.Request) -> web.Response:
    return _json({"version": "fake", "name": request.app[FAKE].name})


async def discovery(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    devices = [
        {
            "index": d["index"],
            "name": d["name"] or f"Fake {d['kind']}",
            "vram_total_mb": d["vram_total_mb"],
            "compute_capability": "9.0" if d["kind"] == "cuda" else None,
            "kind": d["kind"],
        }
        for d in fake.devices()
    ]
    return _json({"hostname": fake.name, "devices": devices, "harnesses": ["fake"]})


async def health(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    devices = []
    for d in fake.devices():
        used = fake.used_mb(d["index"])
        devices.append(
            {
                "index": d["index"],
                "vram_used_mb": used,
                "vram_free_mb": d["vram_total_mb"] - used,
                "vram_total_mb": d["vram_total_mb"],
                "utilization_pct": 7.0,
                "temp_c": 41.0,
            }
        )
    models = [
        {
            "id": m.model_id,
            "status": m.status,
            "in_flight": m.polled_in_flight(),
            "queue_depth": 0,
            "max_in_flight": 4,
            "max_queue_depth": 16,
            "rejected_queue_full": 0,
            "rejected_timeout": 0,
            "tok_s_decode": 100.0,
        }
        for m in fake.models.values()
    ]
    return _json({"status": "ok", "uptime_s": 1.0, "devices": devices, "models": models})


async def list_models(request: web.Request) -> web.Response:
    return _json([m.describe() for m in request.app[FAKE].models.values()])


async def load(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.json()
    model_id = body["model_id"]
    fake.log["loads"].append(body)
    existing = fake.models.get(model_id)
    if existing is not None and existing.status in ("loading", "loaded"):
        return _json({"model_id": model_id, "status": existing.status}, 200 if existing.status == "loaded" else 202)
    device = (body.get("devices") or [0])[0]
    model = FakeModel(model_id, fake.size_of(model_id), device)
    fake.models[model_id] = model
    request.app[TASKS].add(asyncio.create_task(_run_load(fake, model)))
    return _json({"model_id": model_id, "status": "loading"}, 202)


async def _run_load(fake: FakeNeuron, model: FakeModel) -> None:
    delay = float(fake.spec.get("load_delay_s", 0.2))
    steps = 5
    for step in range(steps):
        await asyncio.sleep(delay / steps)
        model.progress = (step + 1) / steps
    total = fake.devices()[model.device]["vram_total_mb"]
    if model.model_id in fake.spec.get("fail_loads", []):
        model.status, model.error = "failed", {"reason": "missing_files", "message": "no weights found"}
    elif fake.used_mb(model.device) > total:
        model.status, model.error = "failed", {"reason": "out_of_memory", "message": "CUDA out of memory"}
    else:
        model.status, model.loaded_at = "loaded", time.time()


async def unload(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.json()
    model_id = body["model_id"]
    fake.log["unloads"].append(model_id)
    if fake.models.pop(model_id, None) is None:
        return _error(404, f"model '{model_id}' is not loaded", "model_not_found")
    return _json({"model_id": model_id, "status": "unloaded"})


async def defragment(request: web.Request) -> web.Response:
    request.app[FAKE].log["defragments"] += 1
    return _json({"status": "ok"})


def _admit(fake: FakeNeuron, body: dict[str, Any]) -> FakeModel | web.Response:
    model = fake.models.get(body.get("model", ""))
    if model is None or model.status == "failed":
        return _error(404, f"The model '{body.get('model')}' does not exist", "model_not_found")
    if model.status in ("recovering", "poisoned"):
        return _error(503, "model is recovering", "model_recovering")
    if model.status != "loaded":
        return _error(503, "model is not loaded yet", "model_not_ready")
    return model


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    fake = request.app[FAKE]
    body = await request.json()
    script = body.get("fake") or {}
    fake.log["requests"].append(
        {
            "model": body.get("model"),
            "stream": body.get("stream", False),
            "stream_options": body.get("stream_options"),
            "request_id": request.headers.get("x-request-id"),
            "path": request.path,
        }
    )
    if script.get("status"):
        return _error(int(script["status"]), f"scripted error {script['status']}", "scripted")
    admitted = _admit(fake, body)
    if isinstance(admitted, web.Response):
        return admitted
    model = admitted
    model.in_flight += 1
    model.last_used = time.time()
    try:
        if script.get("delay_s"):
            await asyncio.sleep(float(script["delay_s"]))
        if body.get("stream"):
            return await _stream(request, fake, body, script, chat)
        return _json(_completion(fake, body, chat))
    except (asyncio.CancelledError, ConnectionResetError):
        fake.log["cancelled"] += 1  # the client (the gateway) went away: what disconnect propagation must cause
        raise
    finally:
        model.in_flight -= 1


def _completion(fake: FakeNeuron, body: dict[str, Any], chat: bool) -> dict[str, Any]:
    text = f"hello from {fake.name}"
    tokens = int(fake.spec.get("stream_events", 5))
    usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": body["model"],
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": usage,
    }


def _chunk(body: dict[str, Any], chat: bool, delta_text: str | None, finish: str | None = None) -> bytes:
    if chat:
        delta: dict[str, Any] = {} if delta_text is None else {"content": delta_text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta_text or "", "finish_reason": finish}
        obj = "text_completion"
    data = {"id": "fake", "object": obj, "created": 0, "model": body["model"], "choices": [choice]}
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _stream(
    request: web.Request, fake: FakeNeuron, body: dict[str, Any], script: dict[str, Any], chat: bool
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    events = int(fake.spec.get("stream_events", 5))
    interval = float(fake.spec.get("event_interval_s", 0.005))
    if chat:
        await response.write(_chunk(body, chat, None).replace(b'"delta":{}', b'"delta":{"role":"assistant"}'))
    for i in range(events):
        if script.get("die_after") == i:
            request.transport.abort()  # the neuron "dies": no terminating chunk, no [DONE]
            return response
        if script.get("hang_after") == i:
            await asyncio.sleep(3600)
        await response.write(_chunk(body, chat, f"tok{i} "))
        await asyncio.sleep(interval)
    await response.write(_chunk(body, chat, None, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 7, "completion_tokens": events, "total_tokens": 7 + events}
        obj = "chat.completion.chunk" if chat else "text_completion"
        data = {"id": "fake", "object": obj, "created": 0, "model": body["model"], "choices": [], "usage": usage}
        await response.write(b"data: " + orjson.dumps(data) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


async def tokenize(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.json()
    admitted = _admit(fake, body)
    if isinstance(admitted, web.Response):
        return admitted
    return _json({"prompt_tokens": 7 * len(body.get("messages") or [])})


async def fake_log(request: web.Request) -> web.Response:
    return _json(request.app[FAKE].log)


async def fake_set(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    body = await request.json()
    for model_id, status in (body.get("status") or {}).items():
        fake.models[model_id].status = status
    for model_id, in_flight in (body.get("in_flight") or {}).items():
        fake.models[model_id].forced_in_flight = in_flight
    return _json({"ok": True})


def build_app(spec: dict[str, Any]) -> web.Application:
    fake = FakeNeuron(spec)
    for entry in spec.get("preloaded", []):
        model_id, device = (entry, 0) if isinstance(entry, str) else (entry["model_id"], entry.get("device", 0))
        fake.models[model_id] = FakeModel(
            model_id, fake.size_of(model_id), device, "loaded", 1.0, loaded_at=time.time()
        )
    app = web.Application()
    app[FAKE] = fake
    app[TASKS] = set()
    app.router.add_get("/version", version)
    app.router.add_get("/discovery", discovery)
    app.router.add_get("/health", health)
    app.router.add_get("/models", list_models)
    app.router.add_post("/models/load", load)
    app.router.add_post("/models/unload", unload)
    app.router.add_post("/admin/defragment", defragment)
    app.router.add_post("/v1/chat/completions", chat)
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
