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
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cortex import __version__
from cortex.core.catalogue import Catalogue, CatalogueModel
from cortex.core.errors import ApiError, bad_request, model_not_found
from cortex.core.gateway_config import EvictionSection
from cortex.core.neuron_api import ModelStatus
from cortex.gateway.bodies import json_response, read_json
from cortex.gateway.cold_loads import Loader
from cortex.gateway.evictor import Evictor
from cortex.gateway.neuron_client import NeuronRefused, NeuronUnreachable
from cortex.gateway.pipeline import Access, endpoint
from cortex.gateway.placement import feasible_anywhere
from cortex.gateway.state import FleetState, Node, Replica


@dataclass
class Admin:
    """The operator routes, over the parts they read and drive."""

    state: FleetState
    catalogue: Catalogue
    loader: Loader
    evictor: Evictor
    eviction: EvictionSection
    load_timeout_s: float
    started_at: float

    # ---- state -------------------------------------------------------------------------------
    @endpoint(access=Access.ADMIN)
    async def get_state(self, request: web.Request) -> web.Response:
        return json_response(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """The fleet as this gateway sees it (the JSON of `GET /admin/state`, for the CLI and dashboards)."""
        now = time.monotonic()
        return {
            "gateway": {
                "version": __version__,
                "uptime_s": round(time.time() - self.started_at, 1),
                "strategy": self.eviction.strategy,
                "min_residency_s": self.eviction.min_residency_s,
                "defrag_after_cycles": self.eviction.defrag_after_cycles,
            },
            "nodes": [self._node(node, now) for node in self.state.nodes.values()],
            "loads": [
                {"model": job.model_id, "node": job.node, "phase": job.phase, "elapsed_s": round(now - job.started, 1)}
                for job in self.loader.jobs
            ],
            "catalogue": [self._catalogue_entry(spec) for spec in self.catalogue.models],
            "aliases": dict(self.catalogue.aliases),
        }

    def _node(self, node: Node, now: float) -> dict[str, Any]:
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
            "models": [self._replica(r, now) for r in node.replicas.values()],
        }

    def _replica(self, r: Replica, now: float) -> dict[str, Any]:
        spec = self.catalogue.get(r.model_id)
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
            "pinned": self.state.is_pinned(r.model_id, r.node, spec.pinned_on if spec else []),
            "load_progress": r.load_progress,
            "error": r.error,
        }

    def _catalogue_entry(self, spec: CatalogueModel) -> dict[str, Any]:
        return {
            "id": spec.id,
            "vram_mb": spec.vram_mb,
            "measured_vram_mb": self.state.measured_vram_mb.get(spec.id),
            "pinned_on": spec.pinned_on,
            "residency_priority": spec.residency_priority,
            "feasible": feasible_anywhere(spec, self.state),
        }

    # ---- lifecycle -----------------------------------------------------------------------------
    def _node_named(self, name: str) -> Node:
        node = self.state.nodes.get(name)
        if node is None:
            known = ", ".join(self.state.nodes) or "none"
            raise ApiError(404, f"no neuron named '{name}' (configured: {known})", param="node", code="node_not_found")
        return node

    @endpoint(access=Access.ADMIN)
    async def load(self, request: web.Request) -> web.Response:
        payload = await _body(request)
        model_id = self.catalogue.resolve(payload["model"])
        node_name: str | None = payload.get("node")
        if node_name is not None:
            node = self._node_named(node_name)
            if not node.healthy:
                raise ApiError(503, f"neuron '{node_name}' is not healthy: {node.last_error}", code="node_unhealthy")
        spec = self.catalogue.get(model_id)
        if spec is None:
            if node_name is None:
                raise model_not_found(model_id)
            spec = CatalogueModel(id=model_id)  # not in the catalogue: the neuron resolves the id itself
        existing = self._existing(model_id, node_name)
        if existing is not None and existing.status == ModelStatus.LOADED:
            return json_response({"model": model_id, "node": existing.node, "status": "loaded"})
        if existing is not None and existing.status == ModelStatus.LOADING:
            job = self.loader.follow(self.state.nodes[existing.node], model_id)
        else:
            job = self.loader.load(spec, node_name)
        await _placed(job.placed, job.task)
        return json_response({"model": model_id, "node": job.node, "status": "loading"}, status=202)

    def _model_on_node(self, payload: dict[str, Any], missing_node: str) -> tuple[Node, str]:
        """The node a request names (required) and the model id it names (an alias resolved)."""
        node_name = payload.get("node")
        if node_name is None:
            raise bad_request(missing_node, param="node")
        return self._node_named(node_name), self.catalogue.resolve(payload["model"])

    def _existing(self, model_id: str, node_name: str | None) -> Replica | None:
        for replica in self.state.replicas(model_id):
            placed = node_name is None or replica.node == node_name
            if placed and replica.status in (ModelStatus.LOADED, ModelStatus.LOADING):
                return replica
        return None

    @endpoint(access=Access.ADMIN)
    async def unload(self, request: web.Request) -> web.Response:
        payload = await _body(request)
        node, model_id = self._model_on_node(payload, "'node' is required: say which replica to unload")
        node_name = node.name
        if model_id not in node.replicas:
            raise ApiError(404, f"'{model_id}' is not on neuron '{node_name}'", param="model", code="model_not_found")
        try:
            await self.evictor.unload(node, model_id, timeout=self.load_timeout_s)
        except NeuronRefused as exc:
            raise ApiError(exc.status, str(exc), code="unload_refused") from None
        except NeuronUnreachable as exc:
            raise ApiError(502, str(exc), code="upstream_unreachable") from None
        return json_response({"model": model_id, "node": node_name, "status": "unloaded"})

    @endpoint(access=Access.ADMIN)
    async def pin(self, request: web.Request) -> web.Response:
        payload = await _body(request)
        node, model_id = self._model_on_node(payload, "'node' is required")
        node_name = node.name
        pinned = payload.get("pinned", True)
        if not isinstance(pinned, bool):
            raise bad_request("'pinned' must be a boolean", param="pinned")
        key = (model_id, node_name)
        if pinned:
            self.state.runtime_pins.add(key)
        else:
            self.state.runtime_pins.discard(key)
        return json_response({"model": model_id, "node": node_name, "pinned": pinned})


async def _body(request: web.Request) -> dict[str, Any]:
    payload, _ = await read_json(request)
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise bad_request("'model' must be a non-empty string", param="model")
    node = payload.get("node")
    if node is not None and not isinstance(node, str):
        raise bad_request("'node' must be a string", param="node")
    return payload


async def _placed(placed: asyncio.Event, task: asyncio.Task[str] | None) -> None:
    """Wait until the load has a node; a load that failed before that raises its error."""
    waiter = asyncio.ensure_future(placed.wait())
    pending = {waiter} if task is None else {waiter, task}
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task is not None and task.done() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
