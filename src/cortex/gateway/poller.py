"""Polls every neuron's `/discovery`, `/health` and `/models` into the fleet state.

Each node has its own polling loop, so a slow or dead neuron never delays the others. A node
turns unhealthy after `unhealthy_after` consecutive failed polls (or at once when a request
cannot connect to it) and healthy again at its next answered poll. Discovery is read when a
node is first reached and again whenever it comes back, since a restarted neuron may differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError

from cortex.core.gateway_config import PollSection
from cortex.core.logs import log_event
from cortex.core.neuron_api import Discovery, Health, ModelEntry, parse_models
from cortex.gateway import neuron_client
from cortex.gateway.metrics import Metrics
from cortex.gateway.neuron_client import NeuronRefused, NeuronUnreachable
from cortex.gateway.state import FleetState, Node

log = logging.getLogger("cortex.gateway.poller")

_PROBE_TIMEOUT_S = 2.0


@dataclass
class Poller:
    state: FleetState
    session: aiohttp.ClientSession
    config: PollSection
    metrics: Metrics
    # Called after each answered poll (e.g. to load models pinned on a node that came back).
    after_poll: Callable[[Node], None] | None = None
    # Called when a node stops answering (unreachable, or polls timing out): not for an answered refusal
    # such as a draining neuron's 503, whose requests in flight still finish there.
    on_lost: Callable[[Node], None] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _unreachable: set[str] = field(default_factory=set)  # nodes whose last poll got no answer at all

    async def start(self) -> None:
        """One round for every node (so the first requests see the fleet), then the loops."""
        await self.poll_all()
        self._tasks = [asyncio.create_task(self._loop(node), name=f"poll-{node.name}") for node in self.nodes()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def nodes(self) -> list[Node]:
        return list(self.state.nodes.values())

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll_node(node) for node in self.nodes()))

    async def _loop(self, node: Node) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.poll_node(node)
            except Exception:  # a bug in one poll must not end the loop for good
                log.exception("poll crashed", extra={"fields": {"node": node.name}})

    async def poll_node(self, node: Node, timeout: float | None = None) -> bool:
        """Poll one node; True when it answered."""
        timeout = timeout or self.config.timeout_s
        epoch = node.epoch
        try:
            discovery = None
            if not node.discovered:
                raw = await neuron_client.get_json(self.session, node, "/discovery", timeout=timeout)
                discovery = Discovery.model_validate(raw)
            health, models = await _both(
                neuron_client.get_json(self.session, node, "/health", timeout=timeout),
                neuron_client.get_json(self.session, node, "/models", timeout=timeout),
            )
            parsed_health = Health.model_validate(health)
            parsed_models = parse_models(models)
        except NeuronUnreachable as exc:
            self._unreachable.add(node.name)
            if self._failed(node, str(exc)) and self.on_lost is not None:
                self.on_lost(node)
            return False
        except NeuronRefused as exc:
            self._unreachable.discard(node.name)
            self._failed(node, str(exc))
            return False
        except ValidationError as exc:
            self._unreachable.discard(node.name)
            self._failed(node, f"neuron '{node.name}' answered a poll outside the contract: {_first_error(exc)}")
            return False
        self._unreachable.discard(node.name)
        if discovery is not None:
            self.state.apply_discovery(node, discovery)
        # A load or unload this gateway made while the poll ran is newer than what it read.
        if epoch == node.epoch:
            self.state.apply_models(node, parsed_models)
        self.state.apply_health(node, parsed_health)
        if self.state.mark_ok(node):
            log_event(log, "node.healthy", node=node.name, devices=len(node.devices), models=len(node.replicas))
        self.metrics.observe_node(node)
        if self.after_poll is not None:
            self.after_poll(node)
        return True

    async def probe(self, node: Node) -> bool:
        """A quick poll after a request failed to reach the node; marks it unreachable if it fails."""
        if await self.poll_node(node, timeout=_PROBE_TIMEOUT_S):
            return True
        lost = node.healthy and node.name in self._unreachable
        if self.state.mark_unreachable(node, node.last_error or "unreachable"):
            log_event(log, "node.unhealthy", logging.WARNING, node=node.name, error=node.last_error)
            self.metrics.observe_node(node)
            if lost and self.on_lost is not None:
                self.on_lost(node)
        return False

    async def refresh_models(self, node: Node) -> list[ModelEntry]:
        """Read and apply the node's `/models` now (used while a load runs); raises on failure."""
        raw = await neuron_client.get_json(self.session, node, "/models", timeout=self.config.timeout_s)
        try:
            models = parse_models(raw)
        except ValidationError as exc:
            raise NeuronRefused(node.name, 502, f"/models outside the contract: {_first_error(exc)}") from None
        self.state.apply_models(node, models)
        return models

    def _failed(self, node: Node, error: str) -> bool:
        """Record a failed poll; True when the node just turned unhealthy."""
        unhealthy = self.state.mark_failed(node, error, self.config.unhealthy_after)
        if unhealthy:
            log_event(log, "node.unhealthy", logging.WARNING, node=node.name, error=error, failures=node.failures)
        elif node.failures == 1:
            log_event(log, "node.poll_failed", logging.INFO, node=node.name, error=error)
        self.metrics.observe_node(node)
        return unhealthy


async def _both(first: Any, second: Any) -> tuple[Any, Any]:
    """Await two calls concurrently; raise the first failure only after both ended (no orphans)."""
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    for result in (a, b):
        if isinstance(result, BaseException):
            raise result
    return a, b


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
