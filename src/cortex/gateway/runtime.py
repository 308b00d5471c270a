"""The running gateway: builds every long-lived part once, from the configuration, and owns their lifecycle.

This is where the parts meet; nothing else holds them all. Each part is built with exactly the
collaborators and the configuration section it uses (app.py hands the route modules theirs), so
each reads its own settings flat (`config.listen`, `load.timeout_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from cortex.core.catalogue import CatalogueModel
from cortex.core.errors import ApiError
from cortex.core.gateway_config import FleetConfig, GatewaySection, parse_listen
from cortex.core.logs import log_event
from cortex.core.secrets import digest, is_loopback
from cortex.gateway.accounting import Accounting
from cortex.gateway.cold_loads import Loader
from cortex.gateway.evictor import EvictionPolicy, Evictor
from cortex.gateway.limits import KeyPolicy, Limiter
from cortex.gateway.metrics import Metrics
from cortex.gateway.neuron_http import NeuronClient
from cortex.gateway.pipeline import Auth
from cortex.gateway.placement import Placer
from cortex.gateway.poller import Poller
from cortex.gateway.relay import Relay
from cortex.gateway.router import Router
from cortex.gateway.state import FleetState, Node
from cortex.gateway.upstream import Upstream

log = logging.getLogger("cortex.gateway")

# The control calls (polls, loads, unloads): a few connections per neuron, kept alive between polls.
# Inference requests go through neuron_http.py's client instead (the hot path).
_KEEPALIVE_S = 30.0
_PINNED_RETRY_S = 60.0


def new_session(connect_timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=256, limit_per_host=0, keepalive_timeout=_KEEPALIVE_S, ttl_dns_cache=300, enable_cleanup_closed=False
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def key_limiter(section: GatewaySection) -> Limiter:
    """Per-key limits from [gateway]: each client_keys entry's own, else the section's defaults."""
    default = KeyPolicy(section.requests_per_minute, section.tokens_per_minute)
    policies = {
        digest(k.key): KeyPolicy(
            k.requests_per_minute or section.requests_per_minute,
            k.tokens_per_minute or section.tokens_per_minute,
            frozenset(k.models) if k.models is not None else None,
        )
        for k in section.client_keys
    }
    return Limiter(policies, default)


class Gateway:
    """Configuration plus every long-lived part; `start()` inside the event loop, `stop()` at exit."""

    def __init__(self, fleet: FleetConfig) -> None:
        self.source = fleet.source
        settings = fleet.gateway
        self.config = settings.gateway  # the [gateway] section: listen, keys, limits, timeouts
        self.poll, self.eviction, self.load = settings.poll, settings.eviction, settings.load
        self.catalogue = fleet.catalogue
        self.started_at = time.time()
        self.state = FleetState(settings.neurons)
        self.metrics = Metrics()
        self.accounting = Accounting(self.metrics)
        self.limiter = key_limiter(self.config)
        self.accounting.charge = self.limiter.charge
        self.auth = Auth(
            self.config.api_keys,
            self.config.admin_key,
            loopback=is_loopback(parse_listen(self.config.listen)[0]),
            limiter=self.limiter,
        )
        self.policy = EvictionPolicy(self.eviction.strategy, self.eviction.min_residency_s)
        self._background: set[asyncio.Task[object]] = set()
        self._pinned_retry_at: dict[tuple[str, str], float] = {}

    async def start(self) -> None:
        cfg = self.config
        self.session = new_session(cfg.connect_timeout_s)
        self.poller = Poller(self.state, self.session, self.poll, self.metrics)
        self.evictor = Evictor(self.state, self.session, self.metrics, self.eviction.defrag_after_cycles)
        self.placer = Placer(self.state, self.catalogue, self.policy)
        self.loader = Loader(
            self.state, self.session, self.placer, self.evictor, self.poller, self.metrics, self.load, cfg.retry_after_s
        )
        self.router = Router(self.state, self.catalogue, self.loader, cfg.retry_after_s, cfg.keepalive_interval_s)
        self.neuron_http = NeuronClient()
        upstream = Upstream(
            self.router,
            self.neuron_http,
            self.poller.probe,
            self.state.nodes,
            cfg.connect_timeout_s,
            first_byte_timeout_s=cfg.first_byte_timeout_s,
            stream_idle_timeout_s=cfg.stream_idle_timeout_s,
        )
        self.relay = Relay(self.router, upstream, self.accounting, cfg.keepalive_interval_s)
        # A node that stops answering ends its silent requests now (retried elsewhere), not at their timeouts.
        self.poller.on_lost = self._node_lost
        if self.load.preload_pinned:
            self.poller.after_poll = self._load_pinned
        await self.poller.start()
        healthy = [n.name for n in self.state.healthy_nodes()]
        log_event(log, "gateway.fleet", neurons=len(self.state.nodes), healthy=",".join(healthy) or "none")

    async def stop(self) -> None:
        await self.poller.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for job in self.loader.jobs:
            if job.task is not None:
                job.task.cancel()
        self.neuron_http.close()
        await self.session.close()

    def _node_lost(self, node: Node) -> None:
        self.relay.node_lost(node.name, silent_for_s=self.poll.timeout_s)

    # ---- pinned models ---------------------------------------------------------------------------
    def _load_pinned(self, node: Node) -> None:
        """After a node answers a poll: load models pinned on it that it lacks (they belong there).

        A model the neuron reports in any state (failed included) is left alone, and a load that
        could not start is retried only after `_PINNED_RETRY_S`, so a bad entry never spins.
        """
        now = time.monotonic()
        for spec in self.catalogue.models:
            if not self.state.is_pinned(spec.id, node.name, spec.pinned_on) or spec.id in node.replicas:
                continue
            if self.loader.job(spec.id) is not None or self._pinned_retry_at.get((spec.id, node.name), 0) > now:
                continue
            self._spawn(self._preload(spec, node))

    async def _preload(self, spec: CatalogueModel, node: Node) -> None:
        try:
            await self.loader.load(spec, node.name).wait()
        except ApiError as exc:
            self._pinned_retry_at[(spec.id, node.name)] = time.monotonic() + _PINNED_RETRY_S
            log_event(log, "pinned.load_failed", logging.WARNING, model=spec.id, node=node.name, error=exc.message)

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
