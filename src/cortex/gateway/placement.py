"""Where a cold model should load: ranking nodes and choosing what to evict. Pure: no I/O.

Size: the VRAM last measured for the model (any node, kept after unloads) beats the catalogue's
`vram_mb` estimate; a model of unknown size is placed as if it fits anywhere.

Feasible on a node: at least `min_devices` devices with `min_device_vram_mb` each, and together
enough total memory. A model needing k devices needs size/k on each of k of them.

Ranking (docs/gateway.md, "Placement"): a pinned node where it fits (freely or by evicting) first, then
nodes where it fits in free memory, then nodes where it fits after evicting what it may displace;
most free memory breaks ties. A node where this model's last load failed goes after all others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cortex.core.catalogue import Catalogue, CatalogueModel
from cortex.core.neuron_api import ModelStatus
from cortex.gateway.evictor import EvictionPolicy, eviction_blocker, residency_left, victim_order
from cortex.gateway.state import Device, FleetState, Node, Replica

TIER_PINNED, TIER_FREE, TIER_EVICT = 0, 1, 2
_FAILED_PENALTY = 3


@dataclass(frozen=True)
class Plan:
    node: Node
    devices: list[int]
    victims: list[Replica]
    tier: int
    need_mb: float
    free_mb: float  # free on the chosen devices before evicting

    @property
    def mb_per_device(self) -> float:
        return self.need_mb / max(1, len(self.devices))

    def log_fields(self) -> dict[str, Any]:
        """What the `load.placed` line says about the decision."""
        victims = [v.model_id for v in self.victims]
        return {
            "node": self.node.name,
            "tier": self.tier,
            "devices": self.devices,
            "need_mb": round(self.need_mb),
            "evict": victims,
        }


class NoPlacement(Exception):
    """No node can take the model now. `retry_after` is set when waiting would help."""

    def __init__(
        self, message: str, *, infeasible: bool, retry_after: float | None = None, never_fits: bool = False
    ) -> None:
        super().__init__(message)
        self.infeasible = infeasible
        self.retry_after = retry_after
        # Every node asked is up and known, and none has devices it could ever fit on: waiting cannot help.
        self.never_fits = never_fits


def model_size_mb(spec: CatalogueModel, state: FleetState) -> float:
    measured = state.measured_vram_mb.get(spec.id)
    if measured:
        return float(measured)
    return float(spec.vram_mb or 0)


def eligible_devices(spec: CatalogueModel, node: Node, need_mb: float) -> list[Device] | None:
    """Devices on the node that could ever hold a share of the model; None when too few."""
    k = spec.min_devices
    share = need_mb / k
    devices = [
        d for d in node.devices.values() if d.vram_total_mb >= spec.min_device_vram_mb and d.vram_total_mb >= share
    ]
    return devices if len(devices) >= k else None


def is_feasible(spec: CatalogueModel, node: Node, need_mb: float) -> bool:
    return node.healthy and node.discovered and eligible_devices(spec, node, need_mb) is not None


def feasible_anywhere(spec: CatalogueModel, state: FleetState) -> bool:
    need = model_size_mb(spec, state)
    return any(is_feasible(spec, node, need) for node in state.nodes.values())


def _replica_share(replica: Replica, node: Node) -> dict[int, float]:
    """How much each device gets back when the replica is unloaded."""
    on = [d for d in replica.devices if d in node.devices] or list(node.devices)
    return {d: replica.vram_used_mb / len(on) for d in on} if on else {}


@dataclass
class _NodeView:
    """A node's placement options for one model, with the reasons it is blocked when it is."""

    plan: Plan | None
    blockers: list[str]
    retry_after: float | None


class Placer:
    def __init__(self, state: FleetState, catalogue: Catalogue, policy: EvictionPolicy) -> None:
        self.state = state
        self.catalogue = catalogue
        self.policy = policy

    def plan(self, spec: CatalogueModel, now: float, only_node: str | None = None) -> Plan:
        """The best placement for `spec`, or NoPlacement explaining why there is none."""
        need = model_size_mb(spec, self.state)
        nodes = [n for n in self.state.nodes.values() if only_node is None or n.name == only_node]
        feasible = [n for n in nodes if is_feasible(spec, n, need) and spec.id not in _busy_ids(n, spec.id)]
        if not feasible:
            never_fits = bool(nodes) and all(
                n.healthy and n.discovered and eligible_devices(spec, n, need) is None for n in nodes
            )
            raise NoPlacement(self._infeasible_message(spec, need, nodes), infeasible=True, never_fits=never_fits)
        views = [self._view(spec, node, need, now) for node in feasible]
        plans = [v.plan for v in views if v.plan is not None]
        if plans:
            return min(plans, key=lambda p: (p.tier, -p.free_mb, p.node.name))
        waits = [v.retry_after for v in views if v.retry_after is not None]
        reasons = "; ".join(b for v in views for b in v.blockers)
        raise NoPlacement(
            f"no neuron has room for '{spec.id}' ({need:.0f} MB) now: {reasons}",
            infeasible=False,
            retry_after=min(waits) if waits else None,
        )

    def _view(self, spec: CatalogueModel, node: Node, need: float, now: float) -> _NodeView:
        devices = eligible_devices(spec, node, need) or []
        k = spec.min_devices
        share = need / k
        penalty = _FAILED_PENALTY if _last_load_failed(node, spec.id) else 0
        pinned = self.state.is_pinned(spec.id, node.name, spec.pinned_on)
        by_free = sorted(devices, key=lambda d: node.free_mb(d.index), reverse=True)[:k]
        if all(node.free_mb(d.index) >= share for d in by_free):
            tier = (TIER_PINNED if pinned else TIER_FREE) + penalty
            return _NodeView(self._make_plan(node, by_free, [], tier, need), [], None)
        return self._evict_view(spec, node, devices, need, now, pinned, penalty)

    def _evict_view(
        self,
        spec: CatalogueModel,
        node: Node,
        devices: list[Device],
        need: float,
        now: float,
        pinned: bool,
        penalty: int,
    ) -> _NodeView:
        k = spec.min_devices
        share = need / k
        evictable: list[Replica] = []
        blockers: list[str] = []
        waits: list[float] = []
        for replica in node.replicas.values():
            if replica.model_id == spec.id or replica.vram_used_mb <= 0:
                continue
            reason = eviction_blocker(replica, self.state, self.catalogue, self.policy, spec.residency_priority, now)
            if reason is None:
                evictable.append(replica)
                continue
            blockers.append(f"{node.name}: {reason}")
            left = residency_left(replica, self.policy, now)
            if left is not None or replica.has_requests():
                waits.append(left if left is not None else 1.0)
        freeable = {d.index: node.free_mb(d.index) for d in devices}
        for replica in evictable:
            for index, mb in _replica_share(replica, node).items():
                if index in freeable:
                    freeable[index] += mb
        chosen = sorted(devices, key=lambda d: freeable[d.index], reverse=True)[:k]
        if not chosen or any(freeable[d.index] < share for d in chosen):
            blockers.append(f"{node.name}: not enough memory even after evicting every evictable model")
            return _NodeView(None, blockers, min(waits) if waits else None)
        victims = self._victims(node, chosen, evictable, share)
        tier = (TIER_PINNED if pinned else TIER_EVICT) + penalty
        return _NodeView(self._make_plan(node, chosen, victims, tier, need), blockers, None)

    def _victims(self, node: Node, chosen: list[Device], evictable: list[Replica], share: float) -> list[Replica]:
        """Evict in strategy order until every chosen device has room for its share."""
        free = {d.index: node.free_mb(d.index) for d in chosen}
        victims: list[Replica] = []
        for replica in victim_order(evictable, self.catalogue, self.policy):
            if all(mb >= share for mb in free.values()):
                break
            gains = {i: mb for i, mb in _replica_share(replica, node).items() if i in free}
            if not gains or all(free[i] >= share for i in gains):
                continue  # frees nothing where it is short
            victims.append(replica)
            for index, mb in gains.items():
                free[index] += mb
        return victims

    @staticmethod
    def _make_plan(node: Node, devices: list[Device], victims: list[Replica], tier: int, need: float) -> Plan:
        indexes = sorted(d.index for d in devices)
        free = sum(node.free_mb(i) for i in indexes)
        return Plan(node, indexes, victims, tier, need, free)

    def _infeasible_message(self, spec: CatalogueModel, need: float, nodes: list[Node]) -> str:
        healthy = [n for n in nodes if n.healthy]
        if not healthy:
            return f"no healthy neuron can load '{spec.id}' now"
        sizes = ", ".join(f"{n.name}: {len(n.devices)} device(s), largest {_largest_mb(n)} MB" for n in healthy)
        return (
            f"no healthy neuron can host '{spec.id}' (needs {need:.0f} MB on {spec.min_devices} device(s)"
            f" of at least {spec.min_device_vram_mb} MB): {sizes}"
        )


def _largest_mb(node: Node) -> int:
    return max((d.vram_total_mb for d in node.devices.values()), default=0)


def _last_load_failed(node: Node, model_id: str) -> bool:
    replica = node.replicas.get(model_id)
    return replica is not None and replica.status == ModelStatus.FAILED


def _busy_ids(node: Node, model_id: str) -> set[str]:
    """The model's id when the node has it (not failed) or a load of it is under way there: no second copy."""
    replica = node.replicas.get(model_id)
    present = replica is not None and replica.status != ModelStatus.FAILED
    return {model_id} if present or model_id in node.reservations else set()
