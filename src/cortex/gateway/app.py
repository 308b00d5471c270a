"""The gateway's HTTP applications and process: client/admin API on `listen`, Prometheus on `metrics_listen`.

`build_app` holds the one table of routes: each route class is built with the parts it uses and
nothing more. Every route runs in the request pipeline (pipeline.py:
request id, authentication, errors in the caller's dialect) inside the hardening guard (body
decoding, last-resort JSON errors). Adding a route is one line in that table.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.core.gateway_config import FleetConfig, exposure_warnings, parse_listen
from cortex.core.logs import log_event
from cortex.core.secrets import KeySet
from cortex.gateway import admin, dashboard, listing
from cortex.gateway.client_stream import WRITE_TIMEOUT
from cortex.gateway.dialects.anthropic.routes import COUNT_TOKENS, MESSAGES, AnthropicRoutes
from cortex.gateway.dialects.openai.routes import CHAT, COMPLETIONS, OpenAIRoutes
from cortex.gateway.dialects.responses.routes import RESPONSES, ResponsesRoutes
from cortex.gateway.metrics import CONTENT_TYPE
from cortex.gateway.pipeline import Access, Dialect, endpoint, render_error, request_pipeline
from cortex.gateway.runtime import Gateway
from cortex.hardening.http import DRAIN, HardenedRunner, harden

log = logging.getLogger("cortex.gateway")


def build_app(gw: Gateway) -> web.Application:
    limit = gw.config.max_body_bytes
    app = web.Application(client_max_size=limit, middlewares=[request_pipeline(gw.auth)])
    app[WRITE_TIMEOUT] = gw.config.client_write_timeout_s
    openai, anthropic, responses = OpenAIRoutes(gw.relay), AnthropicRoutes(gw.relay), ResponsesRoutes(gw.relay)
    models = listing.Listing(gw.state, gw.catalogue, gw.started_at)
    operator = admin.Admin(gw.state, gw.catalogue, gw.loader, gw.evictor, gw.eviction, gw.load.timeout_s, gw.started_at)
    # Routes match the path only, so Claude Code's `/v1/messages?beta=true` lands on /v1/messages.
    app.add_routes(
        [
            web.post(CHAT.path, openai.chat_completions),  # OpenAI: passed through
            web.post(COMPLETIONS.path, openai.completions),
            web.post(MESSAGES, anthropic.messages),  # Anthropic and Responses: translated to and from chat
            web.post(COUNT_TOKENS, anthropic.count_tokens),
            web.post(RESPONSES, responses.responses),
            web.get("/v1/models", models.list_models),
            web.get("/v1/models/{model_id:.+}", models.get_model),
            web.get("/health", models.health),
            web.get("/admin/state", operator.get_state),
            web.post("/admin/load", operator.load),
            web.post("/admin/unload", operator.unload),
            web.post("/admin/pin", operator.pin),
        ]
    )
    dashboard.setup(app, gw.metrics.render)  # GET /ui (the fleet page), GET /admin/live (its live figures)
    # Last: anything unmatched gets a 404 in the caller's dialect (a catch-all costs matched routes nothing).
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return harden(app, render_error, max_body_bytes=limit)


@endpoint(access=Access.OPEN, dialect=Dialect.CALLER)
async def _not_found(request: web.Request) -> web.Response:
    raise ApiError(404, f"no route {request.method} {request.path}", code="unknown_route")


def build_metrics_app(gateway: Gateway) -> web.Application:
    # gateway.metrics_key protects /metrics (the admin key opens it too); without it, open (loopback by default).
    keys = KeySet([k for k in (gateway.config.metrics_key, gateway.config.admin_key) if k is not None])
    guarded = gateway.config.metrics_key is not None

    async def metrics(request: web.Request) -> web.Response:
        if guarded:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not keys.matches(given.strip()):
                err = ApiError(401, "/metrics needs 'Authorization: Bearer <metrics_key>'", code="invalid_metrics_key")
                return render_error(request, err)
        return web.Response(body=gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return harden(app, render_error, max_body_bytes=1024 * 1024)


async def _site(app: web.Application, listen: str) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # neuron connection, which stops the generation there.
    runner = HardenedRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    host, port = parse_listen(listen)
    await web.TCPSite(runner, host, port, backlog=2048, reuse_address=True).start()
    return runner


async def serve(
    fleet: FleetConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
) -> None:
    """Run the gateway until `stop` is set or SIGINT/SIGTERM arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(fleet)
    await gateway.start()
    metrics_listen = gateway.config.metrics_listen
    metrics = [await _site(build_metrics_app(gateway), metrics_listen)] if metrics_listen else []
    # The API site starts last, and nothing awaits between it and `gateway.listening` below: no request
    # is answered (or logged) before that line is written.
    runners = [await _site(build_app(gateway), gateway.config.listen), *metrics]
    # Everything built so far lives as long as the process: keep it out of every future GC pass,
    # so a full collection never stalls a request for milliseconds walking startup objects.
    gc.collect()
    gc.freeze()
    log_event(
        log,
        "gateway.listening",
        listen=gateway.config.listen,
        metrics=metrics_listen or "-",
        strategy=gateway.eviction.strategy,
        config=gateway.source,
    )
    for warning in exposure_warnings(fleet.gateway):  # allow_anonymous: said loudly, at every start
        log_event(log, "gateway.exposed", logging.WARNING, warning=warning)
    if on_ready is not None:
        ready = on_ready()
        if ready is not None:
            await ready
    try:
        await stop.wait()
    finally:
        # Drain: new requests 503 + Retry-After, in-flight ones (streams included) finish within the bound.
        drain = runners[0].app[DRAIN]
        log_event(log, "gateway.stopping", in_flight=drain.in_flight, drain_timeout_s=gateway.config.drain_timeout_s)
        if not await drain.drain(gateway.config.drain_timeout_s):
            log_event(log, "gateway.drain_timeout", logging.WARNING, cut=drain.in_flight)
            # What is still running ends with an error in its client's dialect, not a bare close.
            gateway.relay.cut_all(shutting_down)
            await drain.drain(CUT_GRACE_S)
        for runner in runners:
            await runner.cleanup()
        await gateway.stop()
        log_event(log, "gateway.stopped")


# How long the requests still running at the end of the drain have to send their error.
CUT_GRACE_S = 2.0


def shutting_down() -> ApiError:
    """The error a request still running at the end of the drain gets (a stream: in its client's dialect)."""
    return ApiError(503, "the gateway shut down before the answer was complete; retry", code="shutting_down")


def run(fleet: FleetConfig) -> None:
    """Blocking entry point for `cortex serve`: uvloop when installed (faster), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(fleet))
        return
    uvloop.run(serve(fleet))
