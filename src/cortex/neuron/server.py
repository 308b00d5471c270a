"""Run a neuron: build the engine and app, start loading the configured models, serve until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.core.logs import log_event
from cortex.hardening.http import DRAIN, HardenedRunner, harden
from cortex.neuron.app import NeuronState, build_app, error_response
from cortex.neuron.config import NeuronConfig, parse_listen
from cortex.neuron.engine import Engine, KVBudget
from cortex.neuron.engine.loader import import_libraries
from cortex.neuron.hardware import Hardware
from cortex.neuron.versions import version_info

log = logging.getLogger("cortex.neuron")

# After the drain ran out: how long the requests it cut have to send their error.
CUT_GRACE_S = 2.0


def start_default_models(state: NeuronState) -> None:
    for model in state.config.models_to_load():
        try:
            state.lifecycle.request_load(model)
        except ApiError as exc:  # a bad entry must not stop the others or the daemon
            log_event(log, "model.load.refused", logging.ERROR, model=model.model_id, message=exc.message)


async def serve(config: NeuronConfig) -> None:
    hardware = Hardware(config.devices)
    cpu = next((d for d in hardware.devices if d.kind == "cpu"), None)  # its KV pool is a share of this budget
    kv_budget = KVBudget(
        cuda_fraction=config.engine.kv_memory_fraction,
        cuda_max_bytes=config.engine.kv_memory_max_mb * 2**20,
        cpu_budget_bytes=cpu.vram_total_mb * 2**20 if cpu is not None else None,
    )
    engine = Engine(
        [d.torch_name for d in hardware.devices],
        kv_budget=kv_budget,
        cuda_graphs=config.engine.cuda_graphs,
        cpu_onednn=config.engine.cpu_onednn,
        cpu_compile=config.engine.cpu_compile,
        cuda_compile=config.engine.cuda_compile,
    )
    state = NeuronState(config, hardware, engine)
    version_info()  # imports torch now, not inside the first /version request
    import_libraries()  # and transformers' loaders, not on the device worker while a first load holds the GIL
    host, port = parse_listen(config.listen)
    # handler_cancellation: a client that goes away cancels its handler, and so its generation.
    app = harden(build_app(state), lambda _, err: error_response(err), max_body_bytes=config.max_request_bytes)
    runner = HardenedRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log_event(
        log,
        "neuron.started",
        listen=f"{host}:{port}",
        devices=",".join(d.torch_name for d in hardware.devices),
        cuda_reason=hardware.cuda_reason or "-",
    )
    start_default_models(state)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        # Drain: new requests 503 (and /health says draining, so gateways route around), in-flight ones finish.
        log_event(log, "neuron.stopping", in_flight=app[DRAIN].in_flight, drain_timeout_s=config.drain_timeout_s)
        if not await app[DRAIN].drain(config.drain_timeout_s):
            log_event(log, "neuron.drain_timeout", logging.WARNING, cut=app[DRAIN].in_flight)
            # What still runs ends with a 503 `shutting_down` (an error event for a stream), not a bare close.
            state.inference.cut_all()
            await app[DRAIN].drain(CUT_GRACE_S)
        await runner.cleanup()
        await state.lifecycle.close()
        state.requests.close()
        log_event(log, "neuron.stopped")


def run(config: NeuronConfig) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
