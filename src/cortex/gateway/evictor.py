"""Eviction policy and execution: which loaded models may make room, in what order, and unloading them.

Never evicted: a model pinned on that node, a model with requests in flight or queued (ours or,
as polled, anyone's), a model loaded less than `min_residency_s` ago (two models fighting over one
device must not thrash), or — under strategy `priority` — a model of higher residency priority
than the one that needs the room. Order: `lru` takes the least recently used first; `priority`
the lowest priority first, least recently used among equals.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import aiohttp

from cortex.core.catalogue import Catalogue
from cortex.core.logs import log_event
from cortex.core.neuron_api import ModelStatus
from cortex.gateway import neuron_client
from cortex.gateway.metrics import Metrics
from cortex.gateway.state import FleetState, Node, Replica

log = logging.getLogger("cortex.gateway.evictor")


@dataclass(frozen=True)
class EvictionPolicy:
    strategy: str  # "lru" | "priority"
    min_residency_s: float


def priority_of(catalogue: Catalogue, model_id: str) -> int:
    spec = catalogue.get(model_id)
    return spec.residency_priority if spec is not None else 0


def eviction_blocker(
    replica: Replica,
    state: FleetState,
    catalogue: Catalogue,
    policy: EvictionPolicy,
    requester_priority: int,
    now: float,
) -> str | None:
    """Why this replica may not be evicted now, or None when it may."""
    if replica.status != ModelStatus.LOADED or replica.evicting:
        return f"{replica.model_id} is {replica.status if not replica.evicting else 'being evicted'}"
    spec = catalogue.get(replica.model_id)
    if state.is_pinned(replica.model_id, replica.node, spec.pinned_on if spec else []):
        return f"{replica.model_id} is pinned"
    if replica.has_requests():
        return f"{replica.model_id} has requests in flight"
    if replica.resident_since is not None and now - replica.resident_since < policy.min_residency_s:
        age = now - replica.resident_since
        return f"{replica.model_id} loaded {age:.0f}s ago (min residency {policy.min_residency_s:.0f}s)"
    if policy.strategy == "priority" and priority_of(catalogue, replica.model_id) > requester_priority:
        return f"{replica.model_id} has a higher residency priority"
    return None


def residency_left(replica: Replica, policy: EvictionPolicy, now: float) -> float | None:
    if replica.resident_since is None:
        return None
    left = policy.min_residency_s - (now - replica.resident_since)
    return left if left > 0 else None


def victim_order(replicas: list[Replica], catalogue: Catalogue, policy: EvictionPolicy) -> list[Replica]:
    if policy.strategy == "priority":
        return sorted(replicas, key=lambda r: (priority_of(catalogue, r.model_id), r.last_used))
    return sorted(replicas, key=lambda r: r.last_used)


@dataclass
class Evictor:
    """Unloads victims chosen by placement, counts evictions, defragments after enough cycles."""

    state: FleetState
    session: aiohttp.ClientSession
    metrics: Metrics
    defrag_after_cycles: int

    async def evict(self, node: Node, replica: Replica, *, timeout: float) -> None:
        """Unload one victim (already marked `evicting` by placement) and count it."""
        log_event(log, "evict.start", model=replica.model_id, node=node.name, idle_s=_idle(replica))
        try:
            await self.unload(node, replica.model_id, timeout=timeout)
        except Exception:
            replica.evicting = False
            raise
        self.metrics.evictions.labels(replica.model_id, node.name).inc()
        log_event(log, "evict.done", model=replica.model_id, node=node.name)

    async def unload(self, node: Node, model_id: str, *, timeout: float) -> None:
        """`POST /models/unload` (the neuron verifies the memory is freed), then maybe defragment."""
        await neuron_client.post_json(self.session, node, "/models/unload", {"model_id": model_id}, timeout=timeout)
        node.replicas.pop(model_id, None)
        node.epoch += 1
        node.cycles_since_defrag += 1
        if self.defrag_after_cycles and node.cycles_since_defrag >= self.defrag_after_cycles:
            await self.defragment(node, timeout=timeout)

    async def defragment(self, node: Node, *, timeout: float) -> None:
        """Ask the neuron to return freed device memory (`POST /admin/defragment`); loaded models stay."""
        node.cycles_since_defrag = 0
        try:
            await neuron_client.post_json(self.session, node, "/admin/defragment", {}, timeout=timeout)
        except (neuron_client.NeuronUnreachable, neuron_client.NeuronRefused) as exc:
            # Defragmenting is an optimisation: a neuron that cannot do it still serves.
            log_event(log, "defragment.failed", logging.WARNING, node=node.name, error=str(exc))
            return
        self.metrics.defragmentations.labels(node.name).inc()
        log_event(log, "defragment.done", node=node.name)


def _idle(replica: Replica) -> str:
    return "never-used" if not replica.last_used else f"{time.monotonic() - replica.last_used:.1f}"
