"""`GET /v1/models` (one merged list over the fleet) and the gateway's own `GET /health`.

A model is listed when some healthy neuron has it loaded, loading or recovering, or when it is in
the catalogue and feasible on some healthy node (it would be cold-loaded on request). Aliases are
listed too, each with `alias_of` and its target's fleet fields. The OpenAI shape is kept; the
fleet fields (`status`, `loaded_on`, `replicas`, `context_length`, …) are extras clients ignore.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from cortex.core.errors import ApiError, model_not_found
from cortex.core.neuron_api import RECOVERY_STATUSES, ModelStatus
from cortex.gateway import wire
from cortex.gateway.keys import GATEWAY
from cortex.gateway.placement import feasible_anywhere
from cortex.gateway.runtime import Gateway
from cortex.gateway.state import Replica

_HIDDEN = frozenset({ModelStatus.FAILED, ModelStatus.UNLOADING})


def register(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/health", health)


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    rid = wire.request_id(request)
    try:
        gw.check_client_key(request)
    except ApiError as err:
        return wire.error_in_dialect(request, err, rid)
    entries = model_entries(gw)
    if wire.speaks_anthropic(request):
        return wire.json_response(anthropic_model_list(entries))
    return wire.json_response({"object": "list", "data": entries})


async def get_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{id}` (the SDKs' `models.retrieve`), in the caller's dialect."""
    gw = request.app[GATEWAY]
    rid = wire.request_id(request)
    model_id = request.match_info["model_id"]
    try:
        gw.check_client_key(request)
        entry = next((e for e in model_entries(gw) if e["id"] == model_id), None)
        if entry is None:
            raise model_not_found(model_id)
    except ApiError as err:
        return wire.error_in_dialect(request, err, rid)
    return wire.json_response(anthropic_model(entry) if wire.speaks_anthropic(request) else entry)


def anthropic_model(entry: dict[str, Any]) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["created"]))
    return {"type": "model", "id": entry["id"], "display_name": entry["id"], "created_at": created}


def anthropic_model_list(entries: list[dict[str, Any]]) -> dict[str, Any]:
    data = [anthropic_model(e) for e in entries]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"data": data, "has_more": False, "first_id": first, "last_id": last}


def model_entries(gw: Gateway) -> list[dict[str, Any]]:
    state, catalogue = gw.state, gw.catalogue
    ids = catalogue.ids() + sorted(state.served_ids() - set(catalogue.ids()))
    entries: dict[str, dict[str, Any]] = {}
    for model_id in ids:
        replicas = [r for r in state.replicas(model_id) if r.status not in _HIDDEN]
        spec = catalogue.get(model_id)
        if replicas or (spec is not None and feasible_anywhere(spec, state)):
            entries[model_id] = _entry(gw, model_id, replicas)
    aliases = [
        {**entries[target], "id": alias, "alias_of": target}
        for alias, target in catalogue.aliases.items()
        if target in entries
    ]
    return [*entries.values(), *aliases]


def _entry(gw: Gateway, model_id: str, replicas: list[Replica]) -> dict[str, Any]:
    spec = gw.catalogue.get(model_id)
    contexts = [r.context for r in replicas if r.context]
    return {
        "id": model_id,
        "object": "model",
        "created": int(gw.started_at),
        "owned_by": "cortex",
        "status": _overall_status(replicas),
        "loaded_on": [r.node for r in replicas if r.status == ModelStatus.LOADED],
        "replicas": [
            {"node": r.node, "status": r.status, "devices": r.devices, "load_progress": r.load_progress}
            for r in replicas
        ],
        "context_length": max(contexts) if contexts else None,
        "in_catalogue": spec is not None,
        "pinned_on": spec.pinned_on if spec is not None else [],
        "alias_of": None,
    }


def _overall_status(replicas: list[Replica]) -> str:
    statuses = {r.status for r in replicas}
    if ModelStatus.LOADED in statuses:
        return "loaded"
    if statuses & RECOVERY_STATUSES:
        return "recovering"
    if ModelStatus.LOADING in statuses:
        return "loading"
    return "available"


async def health(request: web.Request) -> web.Response:
    """Always 200 while the gateway runs; `status` says whether any neuron can serve."""
    gw = request.app[GATEWAY]
    neurons = {
        node.name: {"healthy": node.healthy, "error": node.last_error, "models": len(node.replicas)}
        for node in gw.state.nodes.values()
    }
    healthy = sum(1 for n in neurons.values() if n["healthy"])
    return wire.json_response(
        {"status": "ok" if healthy else "degraded", "healthy_neurons": healthy, "neurons": neurons}
    )
