"""Operator API (JSON, for the `cortex` CLI and dashboards), behind `gateway.admin_key` when set.

- `GET  /admin/state`   nodes (health, devices, models), loads in progress, catalogue, aliases
- `POST /admin/load`    `{"model", "node"?}` → 202 once placed (follow progress in /admin/state), 200 if loaded
- `POST /admin/unload`  `{"model", "node"}` → 200 once the neuron has freed it
- `POST /admin/pin`     `{"model", "node", "pinned": true|false}` → pin at run time (not persisted)

A model outside the catalogue may be loaded by id when a node is named: the neuron resolves it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cortex import __version__
from cortex.core.catalogue import CatalogueModel
from cortex.core.errors import ApiError, bad_request, model_not_found
from cortex.core.neuron_api import ModelStatus
from cortex.gateway import wire
from cortex.gateway.keys import GATEWAY
from cortex.gateway.neuron_client import NeuronRefused, NeuronUnreachable
from cortex.gateway.placement import feasible_anywhere
from cortex.gateway.runtime import Gateway
from cortex.gateway.state import Node, Replica

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def register(app: web.Application) -> None:
    app.router.add_get("/admin/state", _guarded(state))
    app.router.add_post("/admin/load", _guarded(load))
    app.router.add_post("/admin/unload", _guarded(unload))
    app.router.add_post("/admin/pin", _guarded(pin))


def _guarded(handler: Callable[[web.Request, Gateway], Awaitable[web.Response]]) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        rid = wire.request_id(request)
        try:
            gw.check_admin_key(request)
            return await handler(request, gw)
        except ApiError as err:
            return wire.openai_error(err, rid)

    return guarded


# ---- state ---------------------------------------------------------------------------------------
async def state(request: web.Request, gw: Gateway) -> web.Response:
    return wire.json_response(fleet_snapshot(gw))


def fleet_snapshot(gw: Gateway) -> dict[str, Any]:
    now = time.monotonic()
    cfg = gw.config
    return {
        "gateway": {
            "version": __version__,
            "uptime_s": round(time.time() - gw.started_at, 1),
            "strategy": cfg.eviction.strategy,
            "min_residency_s": cfg.eviction.min_residency_s,
            "defrag_after_cycles": cfg.eviction.defrag_after_cycles,
        },
        "nodes": [_node(gw, node, now) for node in gw.state.nodes.values()],
        "loads": [
            {"model": job.model_id, "node": job.node, "phase": job.phase, "elapsed_s": round(now - job.started, 1)}
            for job in gw.loader.jobs
        ],
        "catalogue": [_catalogue_entry(gw, spec) for spec in gw.catalogue.models],
        "aliases": dict(gw.catalogue.aliases),
    }


def _node(gw: Gateway, node: Node, now: float) -> dict[str, Any]:
    return {
        "name": node.name,
        "endpoint": node.endpoint,
        "healthy": node.healthy,
        "failures": node.failures,
        "last_error": node.last_error,
        "last_ok_s_ago": None if node.last_ok is None else round(now - node.last_ok, 1),
        "hostname": node.hostname,
        "cycles_since_defrag": node.cycles_since_defrag,
        "devices": [
            {
                "index": d.index,
                "name": d.name,
                "kind": d.kind,
                "vram_total_mb": d.vram_total_mb,
                "vram_used_mb": d.vram_used_mb,
                "vram_free_mb": d.vram_free_mb,
                "reserved_mb": round(node.reserved_mb(d.index)),
                "utilization_pct": d.utilization_pct,
                "temp_c": d.temp_c,
            }
            for d in node.devices.values()
        ],
        "models": [_replica(gw, r, now) for r in node.replicas.values()],
    }


def _replica(gw: Gateway, r: Replica, now: float) -> dict[str, Any]:
    spec = gw.catalogue.get(r.model_id)
    return {
        "id": r.model_id,
        "node": r.node,
        "status": r.status,
        "devices": r.devices,
        "vram_used_mb": r.vram_used_mb,
        "context": r.context,
        "in_flight": r.in_flight,
        "neuron_in_flight": r.polled_in_flight,
        "others_in_flight": r.others_in_flight,
        "queue_depth": r.polled_queue_depth,
        "last_used_s_ago": round(now - r.last_used, 1) if r.last_used else None,
        "resident_for_s": round(now - r.resident_since, 1) if r.resident_since is not None else None,
        "pinned": gw.state.is_pinned(r.model_id, r.node, spec.pinned_on if spec else []),
        "load_progress": r.load_progress,
        "error": r.error,
    }


def _catalogue_entry(gw: Gateway, spec: CatalogueModel) -> dict[str, Any]:
    return {
        "id": spec.id,
        "vram_mb": spec.vram_mb,
        "measured_vram_mb": gw.state.measured_vram_mb.get(spec.id),
        "pinned_on": spec.pinned_on,
        "residency_priority": spec.residency_priority,
        "feasible": feasible_anywhere(spec, gw.state),
    }


# ---- lifecycle -------------------------------------------------------------------------------------
async def _body(request: web.Request) -> dict[str, Any]:
    payload, _ = await wire.read_json(request)
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise bad_request("'model' must be a non-empty string", param="model")
    node = payload.get("node")
    if node is not None and not isinstance(node, str):
        raise bad_request("'node' must be a string", param="node")
    return payload


def _node_named(gw: Gateway, name: str) -> Node:
    node = gw.state.nodes.get(name)
    if node is None:
        known = ", ".join(gw.state.nodes) or "none"
        raise ApiError(404, f"no neuron named '{name}' (configured: {known})", param="node", code="node_not_found")
    return node


async def load(request: web.Request, gw: Gateway) -> web.Response:
    payload = await _body(request)
    model_id = gw.catalogue.resolve(payload["model"])
    node_name: str | None = payload.get("node")
    if node_name is not None:
        node = _node_named(gw, node_name)
        if not node.healthy:
            raise ApiError(503, f"neuron '{node_name}' is not healthy: {node.last_error}", code="node_unhealthy")
    spec = gw.catalogue.get(model_id)
    if spec is None:
        if node_name is None:
            raise model_not_found(model_id)
        spec = CatalogueModel(id=model_id)  # not in the catalogue: the neuron resolves the id itself
    existing = _existing(gw, model_id, node_name)
    if existing is not None and existing.status == ModelStatus.LOADED:
        return wire.json_response({"model": model_id, "node": existing.node, "status": "loaded"})
    if existing is not None and existing.status == ModelStatus.LOADING:
        job = gw.loader.follow(gw.state.nodes[existing.node], model_id)
    else:
        job = gw.loader.load(spec, node_name)
    await _placed(job.placed, job.task)
    return wire.json_response({"model": model_id, "node": job.node, "status": "loading"}, status=202)


def _existing(gw: Gateway, model_id: str, node_name: str | None) -> Replica | None:
    for replica in gw.state.replicas(model_id):
        if (node_name is None or replica.node == node_name) and replica.status in (
            ModelStatus.LOADED,
            ModelStatus.LOADING,
        ):
            return replica
    return None


async def _placed(placed: asyncio.Event, task: asyncio.Task[str] | None) -> None:
    """Wait until the load has a node; a load that failed before that raises its error."""
    waiter = asyncio.ensure_future(placed.wait())
    pending = {waiter} if task is None else {waiter, task}
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task is not None and task.done() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


async def unload(request: web.Request, gw: Gateway) -> web.Response:
    payload = await _body(request)
    node_name = payload.get("node")
    if node_name is None:
        raise bad_request("'node' is required: say which replica to unload", param="node")
    node = _node_named(gw, node_name)
    model_id = gw.catalogue.resolve(payload["model"])
    if model_id not in node.replicas:
        raise ApiError(404, f"'{model_id}' is not on neuron '{node_name}'", param="model", code="model_not_found")
    try:
        await gw.evictor.unload(node, model_id, timeout=gw.config.load.timeout_s)
    except NeuronRefused as exc:
        raise ApiError(exc.status, str(exc), code="unload_refused") from None
    except NeuronUnreachable as exc:
        raise ApiError(502, str(exc), code="upstream_unreachable") from None
    return wire.json_response({"model": model_id, "node": node_name, "status": "unloaded"})


async def pin(request: web.Request, gw: Gateway) -> web.Response:
    payload = await _body(request)
    node_name = payload.get("node")
    if node_name is None:
        raise bad_request("'node' is required", param="node")
    _node_named(gw, node_name)
    model_id = gw.catalogue.resolve(payload["model"])
    pinned = payload.get("pinned", True)
    if not isinstance(pinned, bool):
        raise bad_request("'pinned' must be a boolean", param="pinned")
    key = (model_id, node_name)
    if pinned:
        gw.state.runtime_pins.add(key)
    else:
        gw.state.runtime_pins.discard(key)
    return wire.json_response({"model": model_id, "node": node_name, "pinned": pinned})
