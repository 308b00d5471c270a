"""The neuron's HTTP API: info, lifecycle and OpenAI inference routes (docs/neuron-api.md).

Every control answer is a typed body from core/neuron_api.py, the contract the gateway parses.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel

from cortex.core.errors import ApiError, bad_request
from cortex.core.logs import REQUEST_ID_HEADER, log_event, request_id_from
from cortex.core.neuron_api import (
    Defragmented,
    Discovery,
    FaultArmed,
    FaultRequest,
    Health,
    ModelEndpoint,
    ModelHealth,
    ModelStatus,
    TokenCount,
    UnloadRequest,
)
from cortex.core.openai import ChatCompletionRequest, CompletionRequest
from cortex.core.secrets import KeySet
from cortex.core.validation import parse_request
from cortex.neuron.config import ModelConfig, NeuronConfig
from cortex.neuron.engine import Engine
from cortex.neuron.hardware import Hardware
from cortex.neuron.inference import Inference
from cortex.neuron.lifecycle import Lifecycle
from cortex.neuron.requests import RequestMapper
from cortex.neuron.versions import version_info

log = logging.getLogger("cortex.neuron.app")

M = TypeVar("M", bound=BaseModel)
H = TypeVar("H", bound=Callable[..., Any])
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATE = web.AppKey("state", "NeuronState")


class NeuronState:
    def __init__(self, config: NeuronConfig, hardware: Hardware, engine: Engine) -> None:
        self.config = config
        self.hardware = hardware
        self.lifecycle = Lifecycle(config, hardware, engine)
        self.requests = RequestMapper(self.lifecycle)
        self.inference = Inference(self.lifecycle, config.stream_keepalive_s)
        self.started = time.monotonic()


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    elif isinstance(payload, list):
        payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in payload]
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json")


def error_response(exc: ApiError) -> web.Response:
    return json_response(exc.openai_body(), exc.status, exc.headers())


async def parse_body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    return parse_request(model, data)


def lifecycle_call(handler: H) -> H:
    """Mark a route that changes what the neuron holds: it needs the neuron's token, when one is set."""
    handler.needs_token = True  # type: ignore[attr-defined]
    return handler


# What anyone may call when a token is set: liveness and version (load balancers, a gateway's first contact).
OPEN_PATHS = frozenset({"/health", "/version"})


@functools.lru_cache(maxsize=4)
def _token_keys(token: str) -> KeySet:
    return KeySet([token])


def check_token(request: web.Request, token: str | None) -> None:
    """Every route but OPEN_PATHS needs `Authorization: Bearer <token>` (compared as digests, in constant time)."""
    if token is None or request.path in OPEN_PATHS:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _token_keys(token).matches(given.strip()):
        raise ApiError(
            401,
            "This neuron needs 'Authorization: Bearer <token>' (its neuron.toml token) on every route but /health",
            type="authentication_error",
            code="invalid_token",
        )


@web.middleware
async def request_pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route: the request id, the token of lifecycle calls, errors as OpenAI error bodies."""
    request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    try:
        check_token(request, request.app[STATE].config.token)
        response = await handler(request)
    except ApiError as exc:
        if exc.status >= 500:
            log_event(log, "request.error", logging.WARNING, status=exc.status, code=exc.code, message=exc.message)
        response = error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        response = error_response(ApiError(413, f"Request body too large: {exc.text}", code="request_too_large"))
    except web.HTTPException as exc:
        response = error_response(ApiError(exc.status, exc.reason or "error"))
    except Exception:
        log.exception("unhandled error")
        response = error_response(ApiError(500, "Internal error in the neuron; see its log", type="server_error"))
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


# --- info ------------------------------------------------------------------------------------


async def get_version(request: web.Request) -> web.Response:
    return json_response(version_info())


async def get_discovery(request: web.Request) -> web.Response:
    return json_response(Discovery.model_validate(request.app[STATE].hardware.discovery()))


async def get_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    models = []
    for slot in state.lifecycle.slots.values():
        counters = slot.admission.counters
        models.append(
            ModelHealth(
                id=slot.model_id,
                status=slot.status,
                in_flight=slot.admission.in_flight,
                queue_depth=slot.admission.queue_depth,
                max_in_flight=slot.admission.max_in_flight,
                max_queue_depth=slot.admission.limits.max_queue_depth,
                admitted=counters.admitted,
                rejected_queue_full=counters.rejected_queue_full,
                rejected_timeout=counters.rejected_timeout,
                tok_s_decode=round(slot.loaded.tok_s_decode, 2) if slot.loaded else 0.0,
                faults=slot.faults,
            )
        )
    health = Health(
        status="ok",
        uptime_s=round(time.monotonic() - state.started, 3),
        devices=state.hardware.device_health(state.lifecycle.cpu_used_mb()),
        models=models,
    )
    return json_response(health)


async def get_models(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].lifecycle.describe())


async def get_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    state.lifecycle.ready(model_id)
    base = f"{request.scheme}://{request.host}"
    return json_response(
        ModelEndpoint(
            model_id=model_id,
            base_url=f"{base}/v1",
            chat_completions=f"{base}/v1/chat/completions",
            completions=f"{base}/v1/completions",
        )
    )


# --- lifecycle -------------------------------------------------------------------------------


@lifecycle_call
async def post_load(request: web.Request) -> web.Response:
    model = await parse_body(request, ModelConfig)
    slot = request.app[STATE].lifecycle.request_load(model)
    return json_response(slot.describe(), 200 if slot.status == ModelStatus.LOADED else 202)


@lifecycle_call
async def post_unload(request: web.Request) -> web.Response:
    body = await parse_body(request, UnloadRequest)
    return json_response(await request.app[STATE].lifecycle.unload(body.model_id))


@lifecycle_call
async def post_defragment(request: web.Request) -> web.Response:
    return json_response(Defragmented(devices=await request.app[STATE].lifecycle.defragment()))


async def post_fault(request: web.Request) -> web.Response:
    """Test hook: the model's next forwards raise a simulated device fault."""
    state = request.app[STATE]
    if not state.config.fault_injection:
        raise ApiError(404, "Fault injection is disabled (fault_injection = false)", type="not_found_error")
    body = await parse_body(request, FaultRequest)
    _, model = state.lifecycle.ready(body.model_id)
    model.inject_fault(body.count)
    return json_response(FaultArmed(model_id=body.model_id, faults_armed=body.count))


# --- inference -------------------------------------------------------------------------------


async def post_chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = await parse_body(request, ChatCompletionRequest)
    return await state.inference.run(await state.requests.chat_job(req), request)


async def post_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = await parse_body(request, CompletionRequest)
    return await state.inference.run(await state.requests.text_job(req), request)


async def post_tokenize(request: web.Request) -> web.Response:
    """Prompt tokens of a chat request, with the model's own tokenizer and template."""
    state = request.app[STATE]
    req = await parse_body(request, ChatCompletionRequest)
    return json_response(TokenCount(model=req.model, prompt_tokens=await state.requests.count_chat_tokens(req)))


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(404, f"No route {request.method} {request.path}", type="not_found_error")


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/version", get_version),
    ("GET", "/discovery", get_discovery),
    ("GET", "/health", get_health),
    ("GET", "/models", get_models),
    ("POST", "/models/load", post_load),
    ("POST", "/models/unload", post_unload),
    ("GET", "/models/{model_id:.+}/endpoint", get_endpoint),
    ("POST", "/admin/defragment", post_defragment),
    ("POST", "/admin/fault", post_fault),
    ("POST", "/v1/chat/completions", post_chat),
    ("POST", "/v1/completions", post_completions),
    ("POST", "/v1/chat/tokenize", post_tokenize),
    ("*", "/{tail:.*}", not_found),  # last: anything unmatched is a 404
)


def build_app(state: NeuronState) -> web.Application:
    app = web.Application(middlewares=[request_pipeline], client_max_size=state.config.max_request_bytes)
    app[STATE] = state
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
