"""Fleet state: what each neuron reported at its last poll, plus what this gateway just did.

Neurons are the source of truth. This is a cache rebuilt from polling `/discovery`, `/health` and
`/models` (their bodies are core/neuron_api.py, described in docs/neuron-api.md); the only facts
it adds are the gateway's own (requests it has in flight on a replica, when it last used one, when
it first saw one loaded, VRAM it reserved for loads it started, pins set at run time). Nothing
here survives a restart, and nothing needs to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cortex.core.gateway_config import NeuronEntry
from cortex.core.neuron_api import Discovery, Health, ModelEntry, ModelStatus


@dataclass
class Device:
    index: int
    name: str = ""
    kind: str = "cuda"
    vram_total_mb: int = 0
    vram_used_mb: int = 0
    vram_free_mb: int = 0
    utilization_pct: float | None = None
    temp_c: float | None = None


@dataclass
class Replica:
    """One model on one node, as polled, plus the gateway's own bookkeeping about it."""

    model_id: str
    node: str
    status: ModelStatus
    devices: list[int] = field(default_factory=list)
    vram_used_mb: int = 0
    context: int | None = None
    harness: str | None = None
    tool_call: bool = False
    tool_call_format: str | None = None  # the neuron's tool mode: "native:<syntax>" or "generic"
    load_progress: float | None = None  # 0..1 while loading
    load_stage: str | None = None
    error: str | None = None
    # From the neuron's /health: its own view, which includes other gateways' requests.
    polled_in_flight: int = 0
    polled_queue_depth: int = 0
    # Requests of others (other gateway replicas) at the last poll: the neuron's count less ours then.
    others_in_flight: int = 0
    # The gateway's own facts.
    in_flight: int = 0  # requests this gateway has open on this replica right now
    # The most this gateway had open here since the last poll was applied: the poll's snapshot was taken
    # somewhere in that window, so it can count any of those, even one that has finished since.
    ours_since_poll: int = 0
    last_used: float = 0.0  # monotonic; 0 = not used since this gateway started
    resident_since: float | None = None  # monotonic time it was first seen loaded
    evicting: bool = False  # chosen as an eviction victim: route nothing new to it

    @property
    def routable(self) -> bool:
        return self.status == ModelStatus.LOADED and not self.evicting

    def busy(self) -> int:
        """Requests ahead of a new one: ours (exact, now) plus others' (as of the last poll)."""
        return self.in_flight + self.others_in_flight

    def has_requests(self) -> bool:
        return self.in_flight > 0 or self.others_in_flight > 0

    def open_ours(self) -> None:
        """One more request of ours here: counted now, and remembered until the next poll is applied."""
        self.in_flight += 1
        self.ours_since_poll = max(self.ours_since_poll, self.in_flight)

    def close_ours(self) -> None:
        self.in_flight -= 1


@dataclass
class Reservation:
    """VRAM promised to a load this gateway started, until a poll shows the model's real usage."""

    devices: list[int]
    mb_per_device: float


@dataclass
class Node:
    name: str
    endpoint: str
    token: str | None = None
    healthy: bool = False
    failures: int = 0  # consecutive failed polls
    last_error: str | None = None
    last_ok: float | None = None  # monotonic time of the last successful poll
    discovered: bool = False
    hostname: str | None = None
    devices: dict[int, Device] = field(default_factory=dict)
    replicas: dict[str, Replica] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    cycles_since_defrag: int = 0  # unloads this gateway made here since the last defragment
    # Bumped by every load/unload this gateway makes here: a poll that started before one is stale.
    epoch: int = 0

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def reserved_mb(self, device: int) -> float:
        return sum(r.mb_per_device for r in self.reservations.values() if device in r.devices)

    def free_mb(self, device: int) -> float:
        """Free memory on a device as last polled, less what loads in progress will take."""
        dev = self.devices.get(device)
        return 0.0 if dev is None else dev.vram_free_mb - self.reserved_mb(device)


def _wall_to_monotonic(wall: float | None, now: float) -> float | None:
    """A neuron's wall-clock timestamp (seconds since the epoch) on this process's monotonic clock."""
    if wall is None or wall < 1e9:
        return None
    return now - max(0.0, time.time() - wall)


class FleetState:
    def __init__(self, neurons: list[NeuronEntry]) -> None:
        self.nodes: dict[str, Node] = {n.name: Node(n.name, n.endpoint, n.token) for n in neurons}
        # Last measured VRAM of each model id, kept after unloads: it beats the catalogue's estimate.
        self.measured_vram_mb: dict[str, int] = {}
        self.runtime_pins: set[tuple[str, str]] = set()  # (model_id, node) pinned by an operator

    # ---- queries -------------------------------------------------------------------------
    def healthy_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.healthy]

    def replicas(self, model_id: str, *, healthy_only: bool = True) -> Iterator[Replica]:
        for node in self.nodes.values():
            if healthy_only and not node.healthy:
                continue
            replica = node.replicas.get(model_id)
            if replica is not None:
                yield replica

    def replica(self, model_id: str, node: str) -> Replica | None:
        owner = self.nodes.get(node)
        return None if owner is None else owner.replicas.get(model_id)

    def served_ids(self) -> set[str]:
        """Every model id some healthy neuron reports, whatever its status."""
        return {m for node in self.healthy_nodes() for m in node.replicas}

    # ---- updates from polling ------------------------------------------------------------
    def apply_discovery(self, node: Node, discovery: Discovery) -> None:
        node.hostname = discovery.hostname
        seen: set[int] = set()
        for raw in discovery.devices:
            if raw.index < 0:
                continue
            seen.add(raw.index)
            dev = node.devices.setdefault(raw.index, Device(raw.index))
            dev.name = raw.name or ""
            dev.kind = raw.kind
            dev.vram_total_mb = raw.vram_total_mb
            if not dev.vram_free_mb and not dev.vram_used_mb:
                dev.vram_free_mb = dev.vram_total_mb  # until /health says otherwise
        for index in set(node.devices) - seen:
            del node.devices[index]
        node.discovered = True

    def apply_health(self, node: Node, health: Health) -> None:
        for raw in health.devices:
            dev = node.devices.get(raw.index)
            if dev is None:
                continue
            if raw.vram_used_mb is not None:
                dev.vram_used_mb = raw.vram_used_mb
            if raw.vram_free_mb is not None:
                dev.vram_free_mb = raw.vram_free_mb
            if raw.vram_total_mb is not None:
                dev.vram_total_mb = raw.vram_total_mb
            dev.utilization_pct = raw.utilization_pct
            dev.temp_c = raw.temp_c
        for model in health.models:
            replica = node.replicas.get(model.id)
            if replica is not None:
                replica.polled_in_flight = model.in_flight
                replica.polled_queue_depth = model.queue_depth
                # Ours finish without waiting for the next poll, so only the excess counts as others'.
                total = replica.polled_in_flight + replica.polled_queue_depth
                replica.others_in_flight = max(0, total - replica.ours_since_poll)  # ours_since_poll >= in_flight
                replica.ours_since_poll = replica.in_flight

    def apply_models(self, node: Node, models: list[ModelEntry], now: float | None = None) -> None:
        """Replace the node's model list; keep the gateway's own facts about models still there."""
        now = time.monotonic() if now is None else now
        fresh: dict[str, Replica] = {}
        for entry in models:
            replica = node.replicas.get(entry.id) or Replica(entry.id, node.name, entry.status)
            self._update_replica(replica, entry, now)
            fresh[entry.id] = replica
        node.replicas = fresh

    def _update_replica(self, replica: Replica, entry: ModelEntry, now: float) -> None:
        replica.status = entry.status
        replica.devices = list(entry.devices)
        replica.vram_used_mb = entry.vram_used_mb
        replica.context = entry.limit.context or None
        replica.harness = entry.harness
        replica.tool_call = entry.tool_call
        replica.tool_call_format = entry.tool_call_format
        replica.load_progress, replica.load_stage = entry.progress()
        replica.error = entry.error_text()
        if replica.last_used == 0.0:
            # After a gateway restart, the neuron's own record keeps LRU order meaningful.
            replica.last_used = _wall_to_monotonic(entry.last_used, now) or 0.0
        if replica.status == ModelStatus.LOADED:
            if replica.resident_since is None:
                replica.resident_since = _wall_to_monotonic(entry.loaded_at, now) or now
            if replica.vram_used_mb > 0:
                self.measured_vram_mb[replica.model_id] = replica.vram_used_mb
        elif replica.status != ModelStatus.UNLOADING:
            replica.resident_since = None
        if replica.status != ModelStatus.LOADED:
            replica.evicting = False

    def mark_ok(self, node: Node, now: float | None = None) -> bool:
        """Record a successful poll; True when the node just became healthy."""
        was = node.healthy
        node.healthy = True
        node.failures = 0
        node.last_error = None
        node.last_ok = time.monotonic() if now is None else now
        return not was

    def mark_failed(self, node: Node, error: str, unhealthy_after: int) -> bool:
        """Record a failed poll; True when the node just became unhealthy."""
        node.failures += 1
        node.last_error = error
        if node.healthy and node.failures >= unhealthy_after:
            node.healthy = False
            return True
        return False

    def mark_unreachable(self, node: Node, error: str) -> bool:
        """A request could not connect: stop routing there at once; polling brings it back."""
        was = node.healthy
        node.healthy = False
        node.failures = max(node.failures, 1)
        node.last_error = error
        # Rediscover on return: a restarted neuron may report other hardware.
        node.discovered = False
        return was

    # ---- pins ----------------------------------------------------------------------------
    def is_pinned(self, model_id: str, node: str, pinned_on: list[str]) -> bool:
        return node in pinned_on or (model_id, node) in self.runtime_pins
