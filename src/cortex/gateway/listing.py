"""`GET /v1/models` (one merged list over the fleet) and the gateway's own `GET /health`.

A model is listed when some healthy neuron has it loaded, loading or recovering, or when it is in
the catalogue and feasible on some healthy node (it would be cold-loaded on request). Aliases are
listed too, each with `alias_of` and its target's fleet fields. The OpenAI shape is kept; the
fleet fields (`status`, `loaded_on`, `replicas`, `context_length`, …) are extras clients ignore.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cortex.core.catalogue import Catalogue
from cortex.core.errors import model_not_found
from cortex.core.neuron_api import RECOVERY_STATUSES, ModelStatus
from cortex.gateway.bodies import json_response
from cortex.gateway.pipeline import Access, Dialect, endpoint, speaks_anthropic
from cortex.gateway.placement import feasible_anywhere
from cortex.gateway.state import FleetState, Replica

_HIDDEN = frozenset({ModelStatus.FAILED, ModelStatus.UNLOADING})
_SUPPORTED = ["max_tokens", "temperature", "top_p", "stop", "seed", "response_format"]
_TOOLS = ["tools", "tool_choice"]


@dataclass
class Listing:
    state: FleetState
    catalogue: Catalogue
    started_at: float

    @endpoint(dialect=Dialect.CALLER)
    async def list_models(self, request: web.Request) -> web.Response:
        entries = self.model_entries()
        if speaks_anthropic(request):
            return json_response(anthropic_model_list(entries))
        return json_response({"object": "list", "data": entries})

    @endpoint(dialect=Dialect.CALLER)
    async def get_model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{id}` (the SDKs' `models.retrieve`), in the caller's dialect."""
        model_id = request.match_info["model_id"]
        entry = next((e for e in self.model_entries() if e["id"] == model_id), None)
        if entry is None:
            raise model_not_found(model_id)
        return json_response(anthropic_model(entry) if speaks_anthropic(request) else entry)

    @endpoint(access=Access.OPEN, dialect=Dialect.CALLER)
    async def health(self, request: web.Request) -> web.Response:
        """Always 200 while the gateway runs; `status` says whether any neuron can serve.

        Anyone may ask, so it names no address and no raw error: /admin/state has those for operators.
        """
        neurons = {
            node.name: {"healthy": node.healthy, "models": len(node.replicas)} for node in self.state.nodes.values()
        }
        healthy = sum(1 for n in neurons.values() if n["healthy"])
        return json_response(
            {"status": "ok" if healthy else "degraded", "healthy_neurons": healthy, "neurons": neurons}
        )

    def model_entries(self) -> list[dict[str, Any]]:
        state, catalogue = self.state, self.catalogue
        ids = catalogue.ids() + sorted(state.served_ids() - set(catalogue.ids()))
        entries: dict[str, dict[str, Any]] = {}
        for model_id in ids:
            replicas = [r for r in state.replicas(model_id) if r.status not in _HIDDEN]
            spec = catalogue.get(model_id)
            if replicas or (spec is not None and feasible_anywhere(spec, state)):
                entries[model_id] = self._entry(model_id, replicas)
        aliases = [
            {**entries[target], "id": alias, "alias_of": target}
            for alias, target in catalogue.aliases.items()
            if target in entries
        ]
        return [*entries.values(), *aliases]

    def _entry(self, model_id: str, replicas: list[Replica]) -> dict[str, Any]:
        spec = self.catalogue.get(model_id)
        contexts = [r.context for r in replicas if r.context]
        return {
            "id": model_id,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "cortex",
            "status": _overall_status(replicas),
            "loaded_on": [r.node for r in replicas if r.status == ModelStatus.LOADED],
            "replicas": [
                {"node": r.node, "status": r.status, "devices": r.devices, "load_progress": r.load_progress}
                for r in replicas
            ],
            "context_length": max(contexts) if contexts else None,
            # Where clients look: vLLM's `max_model_len`, OpenRouter's `supported_parameters` (docs/clients.md).
            "max_model_len": max(contexts) if contexts else None,
            "tool_call": any(r.tool_call for r in replicas),
            # How tools reach the model: its template's own format, or the neuron's generic one (docs/dialects.md).
            "tool_call_format": next((r.tool_call_format for r in replicas if r.tool_call_format), None),
            "supported_parameters": _SUPPORTED + (_TOOLS if any(r.tool_call for r in replicas) else []),
            "in_catalogue": spec is not None,
            "pinned_on": spec.pinned_on if spec is not None else [],
            "alias_of": None,
        }


def anthropic_model(entry: dict[str, Any]) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["created"]))
    return {"type": "model", "id": entry["id"], "display_name": entry["id"], "created_at": created}


def anthropic_model_list(entries: list[dict[str, Any]]) -> dict[str, Any]:
    data = [anthropic_model(e) for e in entries]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"data": data, "has_more": False, "first_id": first, "last_id": last}


def _overall_status(replicas: list[Replica]) -> str:
    statuses = {r.status for r in replicas}
    if ModelStatus.LOADED in statuses:
        return "loaded"
    if statuses & RECOVERY_STATUSES:
        return "recovering"
    if ModelStatus.LOADING in statuses:
        return "loading"
    return "available"
