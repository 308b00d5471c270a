"""Routing a request to a replica (docs/gateway.md, "Routing a request").

1. Resolve an alias.
2. Loaded on a healthy node → the replica with the fewest in-flight + queued requests, or the one
   that recently served the request's prompt prefix when it is not much busier (affinity.py: its
   prefix cache holds that prompt's beginning).
3. Recovering (or poisoned, which its neuron is recovering) somewhere → 503 with Retry-After, no
   duplicate load.
4. Loading somewhere → wait for that load.
5. In the catalogue → cold-load it (single-flight, see cold_loads.py) and route there.
6. Otherwise 404 `model_not_found`.

Picking a replica and counting the request on it happen without an await in between, so the
evictor, which refuses replicas with requests in flight, can never race a request onto a victim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cortex.core.catalogue import Catalogue
from cortex.core.errors import ApiError, model_not_found
from cortex.core.neuron_api import RECOVERY_STATUSES, ModelStatus
from cortex.gateway.affinity import Affinity
from cortex.gateway.cold_loads import Loader, LoadJob
from cortex.gateway.keepalive import OnIdle, with_keepalive
from cortex.gateway.state import FleetState, Node, Replica

KeepAlive = OnIdle

# After a load finishes, the model can be gone again before we route (evicted, crashed): retry this often.
_ROUTE_ATTEMPTS = 3
# A replica that served a request's prefix is preferred unless it has this many more requests than the least busy.
AFFINITY_SLACK = 4


class Lease:
    """A request counted on a replica; `release()` exactly once when the request ends."""

    __slots__ = ("node", "released", "replica")

    def __init__(self, node: Node, replica: Replica) -> None:
        self.node = node
        self.replica = replica
        self.released = False
        replica.open_ours()
        replica.last_used = time.monotonic()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.replica.close_ours()
            self.replica.last_used = time.monotonic()


@dataclass
class Router:
    state: FleetState
    catalogue: Catalogue
    loader: Loader
    retry_after_s: float
    keepalive_interval_s: float
    affinity: Affinity = field(default_factory=Affinity)

    def __post_init__(self) -> None:
        # Plain dicts: resolving runs on every request, and pydantic attribute access is slow.
        self._aliases = dict(self.catalogue.aliases)
        self._catalogued = set(self.catalogue.ids())

    def resolve(self, name: str) -> str:
        """The model id behind a client's model name; 404 when neither catalogue nor fleet knows it."""
        model_id = self._aliases.get(name, name)
        if model_id in self._catalogued:
            return model_id
        # Known to a neuron, even one that is down right now: the answer is then 503, not 404.
        for node in self.state.nodes.values():
            if model_id in node.replicas:
                return model_id
        raise model_not_found(name)

    def pick(
        self, model_id: str, exclude: frozenset[str] | set[str] = frozenset(), prefix: bytes | None = None
    ) -> Lease | None:
        """A loaded replica on a healthy node, counted; None when there is none.

        The least busy, unless the replica that served this prompt prefix recently (`prefix`, see
        affinity.py) is not much busier: its neuron holds that prefix's KV blocks already.
        """
        best: Replica | None = None
        best_node: Node | None = None
        preferred = self.affinity.node_for(model_id, prefix) if prefix is not None else None
        warm: tuple[Node, Replica] | None = None
        for node in self.state.nodes.values():
            if not node.healthy or node.name in exclude:
                continue
            replica = node.replicas.get(model_id)
            if replica is None or not replica.routable:
                continue
            if node.name == preferred:
                warm = (node, replica)
            if best is None or (replica.busy(), replica.last_used) < (best.busy(), best.last_used):
                best, best_node = replica, node
        if best is None or best_node is None:
            return None
        if warm is not None and warm[1].busy() <= best.busy() + AFFINITY_SLACK:
            best_node, best = warm
        if prefix is not None:
            self.affinity.remember(model_id, prefix, best_node.name)
        return Lease(best_node, best)

    async def route(
        self,
        model_id: str,
        *,
        keepalive: KeepAlive | None = None,
        exclude: frozenset[str] | set[str] = frozenset(),
        prefix: bytes | None = None,
    ) -> Lease:
        """A lease on a replica of `model_id`, cold-loading it first when needed (see module doc)."""
        lease = self.pick(model_id, exclude, prefix)
        if lease is not None:
            return lease
        for _ in range(_ROUTE_ATTEMPTS):
            job = self._load_job(model_id, exclude)
            if keepalive is None:
                await job.wait()
            else:
                # The load goes on when this wait ends early (job.wait is shielded): the next request uses it.
                await with_keepalive(job.wait(), self.keepalive_interval_s, keepalive, at_start=True)
            lease = self.pick(model_id, exclude, prefix)
            if lease is not None:
                return lease
        raise ApiError(
            503,
            f"'{model_id}' was loaded but went away again before it could serve",
            code="model_unavailable",
            retry_after=self.retry_after_s,
        )

    def _load_job(self, model_id: str, exclude: frozenset[str] | set[str]) -> LoadJob:
        """The load to wait for: one already running anywhere, else a new cold load; or the refusal."""
        for node in self.state.nodes.values():
            if not node.healthy or node.name in exclude:
                continue
            replica = node.replicas.get(model_id)
            if replica is None:
                continue
            if replica.status in RECOVERY_STATUSES:
                raise ApiError(
                    503,
                    f"'{model_id}' is recovering on '{node.name}'; retry shortly",
                    code="model_recovering",
                    retry_after=self.retry_after_s,
                )
            if replica.status == ModelStatus.LOADING:
                return self.loader.follow(node, model_id)
        job = self.loader.job(model_id)
        if job is not None:
            return job
        spec = self.catalogue.get(model_id)
        if spec is not None:
            return self.loader.load(spec)
        down = sorted(n.name for n in self.state.nodes.values() if model_id in n.replicas and not n.healthy)
        if down:
            raise ApiError(
                503,
                f"'{model_id}' is served only by neurons that are down ({', '.join(down)}) and is not in the catalogue",
                code="model_unavailable",
                retry_after=self.retry_after_s,
            )
        raise model_not_found(model_id)
