"""The gateway's HTTP applications and process: client/admin API on `listen`, Prometheus on `metrics_listen`.

Route modules are listed once, in `ROUTE_MODULES`: each exposes `register(app)` and adds its
routes; adding a module of routes (e.g. a dialect) is one line there. Handlers reach the shared
parts through `request.app[GATEWAY]` (keys.py) or `upstream_of(request)` (upstream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from types import ModuleType

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.core.gateway_config import FleetConfig, parse_listen
from cortex.core.logs import log_event
from cortex.gateway import admin, dialect_routes, listing, proxy, wire
from cortex.gateway.keys import GATEWAY
from cortex.gateway.metrics import CONTENT_TYPE
from cortex.gateway.runtime import Gateway
from cortex.hardening.http import HardenedRunner, harden

log = logging.getLogger("cortex.gateway")

ROUTE_MODULES: tuple[ModuleType, ...] = (
    proxy,  # POST /v1/chat/completions, /v1/completions (OpenAI pass-through)
    listing,  # GET /v1/models, /health
    admin,  # /admin/*
    dialect_routes,  # POST /v1/messages, /v1/messages/count_tokens, /v1/responses (Anthropic, OpenAI Responses)
)


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=gateway.config.gateway.max_body_bytes)
    app[GATEWAY] = gateway
    for module in ROUTE_MODULES:
        module.register(app)
    # Last: anything unmatched gets a 404 in the caller's dialect (a catch-all costs matched routes nothing).
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return harden(app, _error_in_dialect, max_body_bytes=gateway.config.gateway.max_body_bytes)


def _error_in_dialect(request: web.Request, err: ApiError) -> web.Response:
    return wire.error_in_dialect(request, err, wire.request_id(request))


async def _not_found(request: web.Request) -> web.Response:
    err = ApiError(404, f"no route {request.method} {request.path}", code="unknown_route")
    return wire.error_in_dialect(request, err, wire.request_id(request))


def build_metrics_app(gateway: Gateway) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return harden(app, _error_in_dialect, max_body_bytes=1024 * 1024)


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
    runners = [await _site(build_app(gateway), fleet.gateway.gateway.listen)]
    metrics_listen = fleet.gateway.gateway.metrics_listen
    if metrics_listen:
        runners.append(await _site(build_metrics_app(gateway), metrics_listen))
    # Everything built so far lives as long as the process: keep it out of every future GC pass,
    # so a full collection never stalls a request for milliseconds walking startup objects.
    gc.collect()
    gc.freeze()
    log_event(
        log,
        "gateway.listening",
        listen=fleet.gateway.gateway.listen,
        metrics=metrics_listen or "-",
        strategy=fleet.gateway.eviction.strategy,
        config=fleet.source,
    )
    if on_ready is not None:
        ready = on_ready()
        if ready is not None:
            await ready
    try:
        await stop.wait()
    finally:
        log_event(log, "gateway.stopping")
        for runner in runners:
            await runner.cleanup()
        await gateway.stop()
        log_event(log, "gateway.stopped")


def run(fleet: FleetConfig) -> None:
    """Blocking entry point for `cortex serve`: uvloop when installed (faster), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(fleet))
        return
    uvloop.run(serve(fleet))
